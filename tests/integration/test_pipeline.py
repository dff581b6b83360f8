"""The pipeline daemon end to end on a bare server: initial load under the snapshot, then the
stream; queries answered by the process that owns the warehouse while it writes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgbridge.cdc.pipeline import Pipeline, query
from tests.integration.daemon import pipeline_config
from tests.pgserver import Server, bare_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    with bare_server("pipe") as server:
        yield server


def wait_equal(pg: Server, sock: Path, schema: str, timeout: float = 60) -> None:
    sql = f"SELECT count(*), sum(id), sum(qty), sum(length(note)), max(id) FROM {schema}.items"
    deadline = time.monotonic() + timeout
    want: list[list[object]] = []
    got: dict[str, object] = {}
    while time.monotonic() < deadline:
        want = [[int(v) if v is not None else None for v in r] for r in pg.sql(sql)]  # type: ignore[call-overload]
        got = query(sock, sql)
        if "error" in got:
            assert "does not exist" in str(got["error"]), got  # not created by the load yet
            time.sleep(0.2)
            continue
        if [[int(v) if v is not None else None for v in r] for r in got["rows"]] == want:  # type: ignore[attr-defined]
            return
        time.sleep(0.2)
    raise AssertionError(f"warehouse did not converge: {got.get('rows')} vs {want}")


def test_load_then_stream_and_query_while_writing(pg: Server, tmp_path: Path) -> None:
    schema = f"s_{uuid.uuid4().hex[:6]}"
    pg.sql(f"CREATE SCHEMA {schema}")
    pg.sql(f"CREATE TABLE {schema}.items (id bigint PRIMARY KEY, qty int, note text)")
    pg.sql(f"CREATE TABLE {schema}.skipme (id int PRIMARY KEY)")
    pg.sql(f"INSERT INTO {schema}.items SELECT g, mod(g, 7), 'n' || g FROM generate_series(1, 20000) g")
    pg.sql(f"CREATE PUBLICATION pub_{schema} FOR TABLES IN SCHEMA {schema}")
    cfg = pipeline_config(pg, schema, tmp_path, "t", exclude=(f"{schema}.skip*",), max_wait_ms=100)
    p = Pipeline(cfg)
    t = threading.Thread(target=p.run)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not Path(cfg.socket).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        wait_equal(pg, Path(cfg.socket), schema)  # the initial load
        for i in range(30):  # the stream, queried while it applies
            pg.sql(f"UPDATE {schema}.items SET qty = qty + 1 WHERE mod(id, 10) = {i % 10}")
            pg.sql(f"INSERT INTO {schema}.items VALUES ({100000 + i}, 1, 'new')")
            pg.sql(f"DELETE FROM {schema}.items WHERE id = {i + 1}")
            r = query(Path(cfg.socket), f"SELECT count(*) FROM {schema}.items")
            assert "error" not in r, r
        wait_equal(pg, Path(cfg.socket), schema)
        assert "error" in query(Path(cfg.socket), f"DELETE FROM {schema}.items")  # read-only
        assert query(Path(cfg.socket), f"SELECT count(*) FROM {schema}.skipme").get("error")  # not replicated
    finally:
        p.stop.set()
        t.join(30)
        p.close()
    assert not t.is_alive()
