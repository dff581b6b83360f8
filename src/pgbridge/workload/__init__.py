"""The e-commerce platform on pgbridge: schema, loader, workload generator and analytics packs."""
