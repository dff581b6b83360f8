"""The initial catalogue and history for `--scale S`, generated inside PostgreSQL.

Rows are made by `INSERT ... SELECT` over `generate_series`, so nothing crosses the network but
the statements: scale 1 (100k orders) is a few seconds of server time rather than minutes of
client round trips. Everything goes in one transaction, so a failed or interrupted load leaves
nothing behind, and a table that has products is "loaded". Order totals are computed from the
same generated lines that become `order_items` (one statement, a data-modifying CTE), so the
invariant `orders.total = sum(items)` holds from the first row.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgbridge.errors import UsageError
from pgbridge.types import quote_ident
from pgbridge.workload.schema import ddl

BASE = {"customers": 20_000, "products": 5_000, "orders": 100_000, "searches": 150_000, "carts": 2_000}
MAX_SCALE = 100.0


@dataclass(frozen=True)
class Sizes:
    customers: int
    products: int
    orders: int
    searches: int  # searches that did not lead to an order; converted ones come with the orders
    carts: int


def sizes(scale: float) -> Sizes:
    """Row counts for a scale factor (scale 1 = 100k orders); every table gets at least a few rows."""
    if not math.isfinite(scale) or scale <= 0 or scale > MAX_SCALE:
        raise UsageError(f"--scale must be above 0 and at most {MAX_SCALE:g}, got {scale:g}")
    n = {k: max(minimum, round(v * scale)) for (k, v), minimum in zip(BASE.items(), (50, 20, 100, 100, 5), strict=True)}
    return Sizes(**n)


@dataclass
class LoadResult:
    scale: float
    loaded: bool  # False: the schema already held a catalogue, nothing was added
    seconds: float = 0.0
    rows: dict[str, int] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)


def _statements(schema: str, z: Sizes) -> list[tuple[str, str]]:
    s = quote_ident(schema)
    v = {"s": s, "nc": z.customers, "np": z.products, "no": z.orders, "ns": z.searches, "nk": z.carts}
    steps = [
        (
            "customers",
            """INSERT INTO {s}.customers (id, email, full_name, country, created_at, profile)
            SELECT g, 'customer' || g || '@example.com', 'Customer ' || g,
                   (ARRAY['US','DE','FR','GB','JP','BR','IN','CA'])[1 + mod(g, 8)],
                   now() - interval '90 days' + (g::float8 / {nc}) * interval '60 days',
                   jsonb_build_object('newsletter', mod(g, 3) = 0,
                                      'segment', (ARRAY['new','regular','vip'])[1 + mod(g, 3)])
            FROM generate_series(1::bigint, {nc}) g""",
        ),
        (
            "products",
            # Descriptions of very different lengths and little redundancy: some stay inline,
            # some are TOASTed, which is what the CDC path has to carry unchanged.
            """INSERT INTO {s}.products (id, sku, name, category, price, description, attributes, created_at)
            SELECT g, 'SKU-' || lpad(g::text, 7, '0'),
                   (ARRAY['Classic','Ultra','Eco','Smart','Mini','Pro'])[1 + mod(g, 6)] || ' '
                     || (ARRAY['Kettle','Lamp','Backpack','Headphones','Chair','Notebook','Sneakers',
                               'Watch','Blender','Jacket'])[1 + mod(g / 6, 10)] || ' ' || g,
                   (ARRAY['kitchen','home','outdoor','audio','furniture','office','fashion','sport'])
                     [1 + mod(abs(hashint8(g)), 8)],
                   round((4.99 + mod(g * 7919, 50000) / 100.0)::numeric, 2),
                   'Product ' || g || '. ' || (SELECT string_agg(md5(g::text || ':' || i), ' ')
                                               FROM generate_series(0, mod(g, 90)) i),
                   jsonb_build_object('color', (ARRAY['red','blue','black','white','green'])[1 + mod(g, 5)],
                                      'weight_g', 100 + mod(g * 13, 5000), 'tags',
                                      jsonb_build_array('tag' || mod(g, 17), 'tag' || mod(g, 23))),
                   now() - interval '120 days'
            FROM generate_series(1::bigint, {np}) g""",
        ),
        (
            "inventory",
            """INSERT INTO {s}.inventory (product_id, stock)
            SELECT g, CASE WHEN mod(g, 20) = 0 THEN 1 + mod(g, 7) ELSE 40 + mod(g * 37, 400) END
            FROM generate_series(1::bigint, {np}) g""",
        ),
        (
            "orders and items",
            """WITH lines AS MATERIALIZED (
                SELECT o AS order_id, l AS line_no, 1 + mod(abs(hashint8(o * 4 + l)), {np}) AS product_id,
                       1 + mod(o + l, 3) AS qty
                FROM generate_series(1::bigint, {no}) o, generate_series(1, 1 + mod(o * 13, 4)) l
            ), priced AS (
                SELECT l.*, p.price FROM lines l JOIN {s}.products p ON p.id = l.product_id
            ), made AS (
                INSERT INTO {s}.orders (id, customer_id, status, total, created_at, updated_at, shipping)
                SELECT order_id, 1 + mod(abs(hashint8(-order_id)), {nc}),
                       CASE WHEN mod(order_id, 20) = 0 THEN 'cancelled'
                            WHEN mod(order_id, 20) = 1 THEN 'refunded'
                            WHEN order_id > {no} * 0.98 THEN 'pending'
                            WHEN order_id > {no} * 0.95 THEN 'paid'
                            ELSE 'shipped' END,
                       sum(qty * price),
                       now() - interval '30 days' + (order_id::float8 / {no}) * interval '30 days'
                         - interval '5 minutes',
                       now() - interval '30 days' + (order_id::float8 / {no}) * interval '30 days',
                       jsonb_build_object('city', 'City ' || mod(order_id, 997),
                                          'zip', lpad(mod(order_id, 99999)::text, 5, '0'))
                FROM priced GROUP BY order_id
                RETURNING id
            )
            INSERT INTO {s}.order_items (order_id, line_no, product_id, qty, unit_price)
            SELECT order_id, line_no, product_id, qty, price FROM priced""",
        ),
        (
            "payments",
            """INSERT INTO {s}.payments (order_id, amount, method, status, updated_at, gateway)
            SELECT id, total, (ARRAY['card','paypal','bank'])[1 + mod(id, 3)],
                   CASE status WHEN 'pending' THEN 'pending' WHEN 'refunded' THEN 'refunded' ELSE 'captured' END,
                   updated_at, jsonb_build_object('ref', md5(id::text))
            FROM {s}.orders WHERE status <> 'cancelled'""",
        ),
        (
            "search log",
            # Half the order lines were preceded by a search for the product (they converted),
            # plus searches that led nowhere, some anonymous, some without a click.
            """INSERT INTO {s}.search_log (customer_id, query, results, product_id, created_at)
            SELECT o.customer_id, lower(split_part(p.name, ' ', 2)), 5 + mod(i.product_id, 40), i.product_id,
                   o.created_at - (1 + mod(i.order_id, 30)) * interval '1 minute'
            FROM {s}.order_items i JOIN {s}.orders o ON o.id = i.order_id JOIN {s}.products p ON p.id = i.product_id
            WHERE mod(i.order_id + i.line_no, 2) = 0
            UNION ALL
            SELECT CASE WHEN mod(g, 4) = 0 THEN NULL ELSE 1 + mod(abs(hashint8(g * 3)), {nc}) END,
                   (ARRAY['kettle','lamp','backpack','headphones','chair','notebook','sneakers','watch','blender',
                          'jacket','gift','sale'])[1 + mod(g, 12)],
                   mod(g, 60),
                   CASE WHEN mod(g, 3) = 0 THEN NULL ELSE 1 + mod(abs(hashint8(g * 5)), {np}) END,
                   now() - interval '30 days' + (g::float8 / {ns}) * interval '30 days'
            FROM generate_series(1::bigint, {ns}) g""",
        ),
        (
            "carts",
            """WITH c AS (
                INSERT INTO {s}.carts (customer_id, updated_at)
                SELECT 1 + mod(abs(hashint8(g * 7)), {nc}), now() - mod(g, 600) * interval '1 minute'
                FROM generate_series(1::bigint, {nk}) g
                ON CONFLICT (customer_id) DO NOTHING
                RETURNING id
            )
            INSERT INTO {s}.cart_items (cart_id, product_id, qty)
            SELECT c.id, 1 + mod(c.id * 17 + l * 101, {np}), 1 + mod(l, 2)
            FROM c, generate_series(1, 1 + mod(c.id, 3)) l
            ON CONFLICT DO NOTHING""",
        ),
    ]
    out = [(label, text.format(**v)) for label, text in steps]
    for t in ("customers", "products", "orders"):
        setval = f"SELECT setval(pg_get_serial_sequence('{s}.{t}', 'id'), max(id)) FROM {s}.{t}"
        out.append((f"{t} id sequence", setval))
    return out


def ensure_schema(conn: psycopg.Connection[Any], schema: str) -> None:
    with conn.transaction():
        for st in ddl(schema):
            conn.execute(st.encode())  # rendered by us from fixed text and a quoted identifier


def loaded(conn: psycopg.Connection[Any], schema: str) -> bool:
    row = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {quote_ident(schema)}.products)".encode()).fetchone()
    return bool(row and row[0])


def load(conn: psycopg.Connection[Any], schema: str, scale: float) -> LoadResult:
    """Create the schema if needed and load `scale` unless a catalogue is already there."""
    z = sizes(scale)
    ensure_schema(conn, schema)
    result = LoadResult(scale=scale, loaded=False)
    started = time.perf_counter()
    with conn.transaction():
        # One loader at a time: a second one waits here, then finds the catalogue and stops.
        conn.execute(f"LOCK TABLE {quote_ident(schema)}.products IN EXCLUSIVE MODE".encode())
        if loaded(conn, schema):
            return result
        for label, text in _statements(schema, z):
            t0 = time.perf_counter()
            conn.execute(text.encode())
            result.steps[label] = round(time.perf_counter() - t0, 3)
    with conn.transaction():
        for t in ("customers", "products", "inventory", "orders", "order_items", "payments", "search_log"):
            conn.execute(f"ANALYZE {quote_ident(schema)}.{t}".encode())
    for t in ("customers", "products", "orders", "order_items", "payments", "search_log", "cart_items"):
        row = conn.execute(f"SELECT count(*) FROM {quote_ident(schema)}.{t}".encode()).fetchone()
        result.rows[t] = int(row[0]) if row else 0
    result.loaded = True
    result.seconds = round(time.perf_counter() - started, 2)
    return result
