"""The workload's pure parts: mix, schedule, percentiles, scale sizes, packs, dashboard rendering."""

from __future__ import annotations

import random
from io import StringIO

import pytest
import yaml
from rich.console import Console

from pgbridge.cli.dashboard import dashboard, status_line
from pgbridge.errors import UsageError
from pgbridge.ops.demo import Snapshot, write_default_spec
from pgbridge.spec.load import parse_spec
from pgbridge.workload.analytics import QueryResult, load_pack, pack_names, parse_query, run
from pgbridge.workload.load import sizes
from pgbridge.workload.mix import DEFAULT_MIX, Mix, Schedule, check_rate
from pgbridge.workload.schema import TABLES, ddl
from pgbridge.workload.stats import Recorder, percentile


def test_mix_follows_its_weights() -> None:
    mix, rng = Mix(), random.Random(1)
    picks = [mix.pick(rng) for _ in range(50_000)]
    for kind, _ in DEFAULT_MIX:
        assert abs(picks.count(kind) / len(picks) - mix.share(kind)) < 0.01, kind
    with pytest.raises(ValueError):
        Mix((("a", 0),))


def test_schedule_paces_and_drops_a_backlog_instead_of_bursting() -> None:
    s = Schedule(start=100.0, rate=10.0)
    assert [s.due(100.0) for _ in range(3)] == [100.0, 100.1, 100.2]
    late = s.due(105.0)  # 4.7 s behind: the missed slots are dropped
    assert 104.0 <= late <= 105.0 and s.dropped > 30


def test_rate_and_duration_checks() -> None:
    check_rate(1, 1)
    check_rate(100, None)
    for rate, duration in [(0, 1), (-1, 1), (float("nan"), 1), (1e9, 1), (1, 0), (1, -3)]:
        with pytest.raises(UsageError):
            check_rate(rate, duration)


def test_percentiles_and_recorder() -> None:
    assert percentile([], 50) is None
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    now = [0.0]
    rec = Recorder(clock=lambda: now[0])
    for i in range(100):
        now[0] = i / 10
        rec.record("search" if i % 2 else "place_order", 0.001 * (i + 1))
    rec.record("place_order", 0.5, "rejected", at=9.95)
    rec.error("pay", "deadlock detected\nDETAIL: ...")
    now[0] = 10.0
    s = rec.summary()
    assert s.transactions == 101 and s.tps == pytest.approx(10.1)
    assert s.outcomes == {"committed": 100, "rejected": 1, "error": 1}
    assert s.errors == {"pay: deadlock detected": 1}
    assert s.by_kind["search"]["count"] == 50
    w = rec.window(1.0)
    assert w.transactions == 10 and w.p99_ms == 500.0  # ends after 9.0: 9.1 ... 9.9 and 9.95
    assert rec.totals()["transactions"] == 101


def test_scale_sizes() -> None:
    one = sizes(1)
    assert one.orders == 100_000 and sizes(10).orders == 1_000_000
    tiny = sizes(0.0001)
    assert tiny.orders >= 100 and tiny.products >= 20 and tiny.customers >= 50
    for bad in (0, -1, float("inf"), 1000):
        with pytest.raises(UsageError):
            sizes(bad)


def test_schema_names_every_table_and_quotes_the_schema() -> None:
    statements = ddl('we"ird')
    text = "\n".join(statements)
    assert '"we""ird".orders' in text
    for t in TABLES:
        assert f'CREATE TABLE IF NOT EXISTS "we""ird".{t} (' in text
    assert "CHECK (stock >= 0)" in text


def test_packs_ship_with_the_package_and_substitute_the_schema() -> None:
    assert "shop" in pack_names()
    queries = load_pack("shop")
    names = [q.name for q in queries]
    assert names[:5] == ["revenue_per_minute", "orders_by_status", "top_products", "search_conversion", "stock_at_risk"]
    for q in queries:
        assert q.title and not q.title.startswith("-")
        assert "{schema}" not in q.sql("app") and '"app".' in q.sql("app")
        assert ";" not in q.sql("app")  # one statement each: the warehouse takes one at a time
    with pytest.raises(UsageError, match="unknown analytics pack"):
        load_pack("nope")
    with pytest.raises(ValueError):
        parse_query("query.sql", "SELECT 1")
    assert parse_query("2_x_y.sql", "SELECT 1;\n").title == "x y"


def test_run_reports_a_failing_query_and_runs_the_rest() -> None:
    def execute(sql: str) -> tuple[list[str], list[list[object]]]:
        if "orders_by" in sql or "GROUP BY status" in sql:
            raise UsageError("query failed: table missing")
        return ["n"], [[1]]

    results = run(load_pack("shop"), "shop", execute)
    failed = [r.name for r in results if r.error]
    assert failed == ["orders_by_status"] and all(r.rows == [[1]] for r in results if not r.error)


def test_default_demo_spec_is_valid_and_has_a_pipeline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "pgbridge.yaml"
    write_default_spec(path)
    spec = parse_spec(yaml.safe_load(path.read_text()), str(path))
    assert spec.pipeline is not None and spec.pipeline.name == "analytics"


def test_dashboard_renders_a_snapshot() -> None:
    rec = Recorder()
    rec.record("search", 0.004)
    snap = Snapshot(
        elapsed_s=12,
        window=rec.window(5),
        totals=rec.totals(),
        pipeline={"state": "running", "phase": "streaming", "lag_bytes": 2048, "lag_seconds": 0.25},
        pack=[
            QueryResult("orders_by_status", "Orders by status", ["status", "orders"], [["paid", 3]], 0.01),
            QueryResult("top_products", "Top products", error="table shop.orders does not exist yet"),
        ],
        pack_age_s=0.5,
    )
    line = status_line(snap)
    assert "cdc running/streaming lag 0.2 s / 2.0 kB" in line and "1 committed" in line
    buf = StringIO()
    Console(file=buf, width=140, color_system=None).print(dashboard(snap, "shop"))
    text = buf.getvalue()
    for words in ("transactions/s", "p50 / p99", "0.2 s / 2.0 kB", "orders_by_status", "paid", "does not exist yet"):
        assert words in text, words
