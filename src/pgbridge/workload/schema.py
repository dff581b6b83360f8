"""The e-commerce schema, created in the deployment's application schema by the application user.

It is what a small shop's OLTP database holds, with the constraints that make the workload's
invariants checkable in the database itself: stock can never go below zero (a CHECK, so an oversell
is an error, not a silent bug), every order line refers to a real product and order, payments
belong to one order. A few columns are large on purpose (product descriptions, JSON attributes)
so the CDC path meets TOAST values. Every table has a primary key, which the pipeline needs.
"""

from __future__ import annotations

from pgbridge.types import quote_ident

TABLES = (
    "customers", "products", "inventory", "carts", "cart_items", "orders", "order_items", "payments", "search_log",
)  # fmt: skip

ORDER_STATUSES = ("pending", "paid", "shipped", "cancelled", "refunded")
PAYMENT_STATUSES = ("pending", "captured", "failed", "refunded", "voided")
# Revenue counts orders whose money was taken and kept.

_DDL = """
CREATE TABLE IF NOT EXISTS {s}.customers (
    id          bigserial PRIMARY KEY,
    email       text NOT NULL UNIQUE CHECK (position('@' IN email) > 1),
    full_name   text NOT NULL,
    country     char(2) NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    profile     jsonb NOT NULL DEFAULT '{{}}'
);
CREATE TABLE IF NOT EXISTS {s}.products (
    id          bigserial PRIMARY KEY,
    sku         text NOT NULL UNIQUE,
    name        text NOT NULL,
    category    text NOT NULL,
    price       numeric(10,2) NOT NULL CHECK (price > 0),
    description text NOT NULL,
    attributes  jsonb NOT NULL DEFAULT '{{}}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS products_category_idx ON {s}.products (category);
CREATE TABLE IF NOT EXISTS {s}.inventory (
    product_id  bigint PRIMARY KEY REFERENCES {s}.products (id),
    stock       integer NOT NULL CHECK (stock >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.carts (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL UNIQUE REFERENCES {s}.customers (id),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {s}.cart_items (
    cart_id     bigint NOT NULL REFERENCES {s}.carts (id) ON DELETE CASCADE,
    product_id  bigint NOT NULL REFERENCES {s}.products (id),
    qty         integer NOT NULL CHECK (qty > 0),
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cart_id, product_id)
);
CREATE TABLE IF NOT EXISTS {s}.orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES {s}.customers (id),
    status      text NOT NULL CHECK (status IN ({order_statuses})),
    total       numeric(12,2) NOT NULL CHECK (total >= 0),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    shipping    jsonb NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS orders_customer_idx ON {s}.orders (customer_id);
CREATE INDEX IF NOT EXISTS orders_created_idx ON {s}.orders (created_at);
-- The workload's queues: the oldest pending payment, the oldest paid order to ship.
CREATE INDEX IF NOT EXISTS orders_pending_idx ON {s}.orders (id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS orders_paid_idx ON {s}.orders (id) WHERE status = 'paid';
CREATE TABLE IF NOT EXISTS {s}.order_items (
    order_id    bigint NOT NULL REFERENCES {s}.orders (id) ON DELETE CASCADE,
    line_no     smallint NOT NULL CHECK (line_no > 0),
    product_id  bigint NOT NULL REFERENCES {s}.products (id),
    qty         integer NOT NULL CHECK (qty > 0),
    unit_price  numeric(10,2) NOT NULL CHECK (unit_price > 0),
    PRIMARY KEY (order_id, line_no)
);
CREATE INDEX IF NOT EXISTS order_items_product_idx ON {s}.order_items (product_id);
CREATE TABLE IF NOT EXISTS {s}.payments (
    id          bigserial PRIMARY KEY,
    order_id    bigint NOT NULL UNIQUE REFERENCES {s}.orders (id) ON DELETE CASCADE,
    amount      numeric(12,2) NOT NULL CHECK (amount >= 0),
    method      text NOT NULL,
    status      text NOT NULL CHECK (status IN ({payment_statuses})),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    gateway     jsonb
);
CREATE INDEX IF NOT EXISTS payments_pending_idx ON {s}.payments (id) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS {s}.search_log (
    id          bigserial PRIMARY KEY,
    customer_id bigint REFERENCES {s}.customers (id),
    query       text NOT NULL,
    results     integer NOT NULL CHECK (results >= 0),
    product_id  bigint REFERENCES {s}.products (id),
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS search_log_created_idx ON {s}.search_log (created_at);
"""


def _in_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def ddl(schema: str) -> list[str]:
    """The CREATE statements for `schema`, one per element, safe to run again."""
    text = _DDL.format(
        s=quote_ident(schema),
        order_statuses=_in_list(ORDER_STATUSES),
        payment_statuses=_in_list(PAYMENT_STATUSES),
    )
    return [st.strip() for st in text.split(";") if st.strip()]
