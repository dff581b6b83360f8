"""Warehouse sinks: one module per target behind the small `Sink` protocol in `base`."""
