"""The shop on pgbridge, through the CLI: the workload's invariants hold in PostgreSQL and, once the
pipeline has caught up, in the warehouse; the analytics pack agrees on both; the demo runs headless.

One small deployment (scale 0.01) serves every test, so the module stays around a minute.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.conftest import Env, deployed

pytestmark = pytest.mark.integration

PIPELINE = """\
pipeline:
  name: analytics
  batch: {max_wait_ms: 100}
"""

# Invariants as SQL both PostgreSQL and DuckDB run: every row should be zero.
INVARIANTS = {
    "negative stock": "SELECT count(*) FROM shop.inventory WHERE stock < 0",
    "orders whose total is not the sum of their items": """
        SELECT count(*) FROM shop.orders o
        LEFT JOIN (SELECT order_id, sum(qty * unit_price) AS s FROM shop.order_items GROUP BY order_id) i
               ON i.order_id = o.id
        WHERE o.total <> coalesce(i.s, 0)""",
    "payments that disagree with their order": """
        SELECT count(*) FROM shop.payments p JOIN shop.orders o ON o.id = p.order_id
        WHERE p.amount <> o.total OR (o.status IN ('paid', 'shipped') AND p.status <> 'captured')""",
}
REVENUE = "SELECT coalesce(sum(total), 0) FROM shop.orders WHERE status IN ('paid', 'shipped')"
COUNTS = "SELECT " + ", ".join(
    f"(SELECT count(*) FROM shop.{t})"
    for t in ("customers", "orders", "order_items", "payments", "search_log", "cart_items", "inventory")
)


@pytest.fixture(scope="module")
def shop() -> Iterator[Env]:
    with deployed("wl", PIPELINE) as e:
        yield e


def source(e: Env, sql: str) -> list[Any]:
    with psycopg.connect(e.dsn(), autocommit=True, connect_timeout=5) as c:
        row = c.execute(sql.encode()).fetchone()
    assert row is not None
    return [str(v) for v in row]


def warehouse(e: Env, sql: str) -> list[Any] | None:
    r = e.run("query", sql, "--json", check=False)
    if r.returncode != 0:
        return None
    rows = json.loads(r.stdout)
    return [str(v) for v in rows[0].values()]


def pack(e: Env, *extra: str) -> dict[str, list[dict[str, Any]]]:
    results = json.loads(e.run("query", "--pack", "shop", "--json", *extra).stdout)
    assert all(r["error"] is None for r in results), results
    return {r["name"]: r["rows"] for r in results}


def test_bad_input_is_refused_clearly(shop: Env, scratch: Env) -> None:
    for args, code, words in [
        (("workload", "run", "--rate", "-5"), 2, "--rate must be above 0"),
        (("workload", "run", "--duration", "0"), 2, "--duration must be a positive"),
        (("workload", "load", "--scale", "0"), 2, "--scale must be above 0"),
        (("query", "--pack", "nope"), 2, "unknown analytics pack 'nope'"),
        (("query", "--pack", "shop", "SELECT 1"), 2, "either SQL or --pack"),
        (("demo", "--rate", "0", "--duration", "1"), 2, "--rate must be above 0"),
    ]:
        r = shop.run(*args, check=False)
        assert r.returncode == code and words in r.stderr, (args, r.returncode, r.stderr)
    r = shop.run("workload", "run", "--duration", "1", check=False)  # nothing loaded yet
    assert r.returncode == 2 and "no catalogue yet" in r.stderr and "--scale" in r.stderr
    r = scratch.run("workload", "run", "--scale", "0.01", "--duration", "1", check=False)
    assert r.returncode == 6 and "no deployment at" in r.stderr
    assert "shop" in shop.run("query", "--pack", "list").stdout


def test_workload_keeps_its_invariants_in_the_source_and_the_warehouse(shop: Env) -> None:
    r = shop.run("workload", "run", "--scale", "0.01", "--rate", "120", "--duration", "8", "--seed", "7", "--json")
    s = json.loads(r.stdout)
    assert s["errors"] == {}, s["errors"]  # an oversell would be a CHECK violation here
    assert s["outcomes"]["committed"] > 500, s
    for kind in ("register", "search", "place_order", "pay", "cancel", "refund"):
        assert s["by_kind"][kind]["count"] > 0, kind
    assert s["p99_ms"] is not None and s["tps"] > 50
    for what, sql in INVARIANTS.items():
        assert source(shop, sql) == ["0"], what
    want_counts = source(shop, COUNTS)
    deadline = time.monotonic() + 90
    while warehouse(shop, COUNTS) != want_counts:
        assert time.monotonic() < deadline, shop.run("pipeline", "status").stdout
        time.sleep(0.5)
    for what, sql in INVARIANTS.items():
        assert warehouse(shop, sql) == ["0"], f"warehouse: {what}"
    revenue = source(shop, REVENUE)
    assert float(revenue[0]) > 0
    assert warehouse(shop, REVENUE) == revenue
    # The same pack on both sides, same data: the same answers (the workload has stopped). Exact
    # columns only: averages and percentages are floating point in DuckDB, numeric in PostgreSQL.
    on_warehouse, on_source = pack(shop), pack(shop, "--source")
    exact = {
        "orders_by_status": ("status", "orders", "amount"),
        "search_conversion": ("category", "searches", "converted"),
        "revenue_per_day": ("day", "orders", "revenue"),
    }
    for name, cols in exact.items():
        want = [[str(row[c]) for c in cols] for row in on_source[name]]
        assert [[str(row[c]) for c in cols] for row in on_warehouse[name]] == want, name
    captured = sum(float(r["amount"]) for r in on_warehouse["orders_by_status"] if r["status"] in ("paid", "shipped"))
    assert round(captured, 2) == float(revenue[0])


def test_demo_runs_headless_for_a_bounded_time_and_leaves_the_deployment_up(shop: Env) -> None:
    started = time.monotonic()
    r = shop.run("demo", "--scale", "0.01", "--rate", "50", "--duration", "5", "--every", "1", timeout=300)
    assert time.monotonic() - started < 120
    lines = [ln for ln in r.stdout.splitlines() if "oltp" in ln and "tps" in ln]
    assert len(lines) >= 3, r.stdout
    assert "cdc running/streaming" in lines[-1], lines[-1]
    for name in ("revenue_per_minute", "orders_by_status", "top_products", "search_conversion", "stock_at_risk"):
        assert name in r.stdout, name
    assert "the deployment keeps running" in r.stdout
    assert json.loads(shop.run("status", "--json").stdout)["status"] == "available"
