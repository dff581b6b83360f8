"""The replication source against a real PostgreSQL 15: exported snapshot, stream, feedback, slot care."""

from __future__ import annotations

import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pgbridge.cdc.pgoutput import Begin, Commit, Insert, Message, Relation, StreamCommit, StreamStart, StreamStop
from pgbridge.cdc.source import (
    ReplicationStream,
    SlotMissingError,
    SourceError,
    StreamOptions,
    create_slot,
    drop_slot,
    slot_exists,
    slot_status,
)
from pgbridge.errors import PgbridgeError
from pgbridge.types import LSN
from tests.pgserver import Server, bare_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg() -> Iterator[Server]:
    with bare_server("src") as server:
        yield server


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@dataclass
class Table:
    name: str
    publication: str
    slot: str

    @property
    def options(self) -> StreamOptions:
        return StreamOptions((self.publication,))


@pytest.fixture
def table(pg: Server) -> Iterator[Table]:
    """A fresh table in its own publication, and a slot name; the slot is dropped afterwards."""
    t = Table(_name("t"), _name("pub"), _name("slot"))
    pg.sql(f"CREATE TABLE {t.name} (id integer PRIMARY KEY, note text)")
    pg.sql(f"CREATE PUBLICATION {t.publication} FOR TABLE {t.name}")
    try:
        yield t
    finally:
        drop_slot(pg.dsn, t.slot, terminate_active=True)


def insert(pg: Server, table: Table, ids: range) -> None:
    pg.sql(f"INSERT INTO {table.name} SELECT g, 'row ' || g FROM generate_series({ids.start}, {ids.stop - 1}) g")


def start(pg: Server, table: Table, start_lsn: LSN | None = None) -> ReplicationStream:
    """Start streaming; retry while the previous walsender of the slot is still going away."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return ReplicationStream.start(pg.dsn, table.slot, table.options, start_lsn=start_lsn, status_interval=1.0)
        except SourceError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def read_until(
    stream: ReplicationStream, done: Callable[[list[tuple[LSN, Message]]], bool], timeout: float = 20
) -> list[tuple[LSN, Message]]:
    got: list[tuple[LSN, Message]] = []
    deadline = time.monotonic() + timeout
    while not done(got):
        assert time.monotonic() < deadline, f"timed out; got {[type(m).__name__ for _, m in got]}"
        got.extend(stream.read_batch(1000, 0.2))
    return got


def commits(got: list[tuple[LSN, Message]]) -> list[Commit]:
    return [m for _, m in got if isinstance(m, Commit)]


def inserted_ids(got: list[tuple[LSN, Message]]) -> list[int]:
    return [int(m.new.values[0] or b"") for _, m in got if isinstance(m, Insert)]


def wait_for(check: Callable[[], bool], timeout: float = 15, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# --------------------------------------------------------------------------------------------


def test_snapshot_and_stream_meet_without_gap_or_duplicate(pg: Server, table: Table) -> None:
    insert(pg, table, range(1, 101))
    with create_slot(pg.dsn, table.slot) as slot, psycopg.connect(pg.dsn) as reader:
        reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        reader.execute(f"SET TRANSACTION SNAPSHOT '{slot.snapshot_name}'")
        insert(pg, table, range(101, 151))  # committed after the slot, before the read starts
        with reader.cursor(name="load") as cur:
            cur.execute(f"SELECT id FROM {table.name} ORDER BY id")
            loaded = [row[0] for row in cur.fetchmany(30)]
            insert(pg, table, range(151, 201))  # committed while the read is under way
            pg.sql(f"UPDATE {table.name} SET note = 'changed' WHERE id <= 10")
            loaded += [row[0] for row in cur.fetchall()]
        reader.commit()
        consistent = slot.consistent_lsn
    insert(pg, table, range(201, 251))  # after the snapshot is gone

    with start(pg, table, start_lsn=consistent) as stream:
        got = read_until(stream, lambda got: 250 in inserted_ids(got))
    streamed = inserted_ids(got)

    assert loaded == list(range(1, 101))
    assert len(streamed) == len(set(streamed))
    assert set(loaded) | set(streamed) == set(range(1, 251))
    assert set(loaded) & set(streamed) == set()
    assert all(lsn >= consistent for lsn, _ in got)


def test_messages_decode_in_order(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    with start(pg, table) as stream:
        insert(pg, table, range(1, 4))
        got = read_until(stream, lambda got: bool(commits(got)))
    kinds = [type(m) for _, m in got]
    assert kinds == [Begin, Relation, Insert, Insert, Insert, Commit]
    begin, relation, commit = got[0][1], got[1][1], got[-1][1]
    assert isinstance(begin, Begin) and isinstance(relation, Relation) and isinstance(commit, Commit)
    assert relation.name == table.name and [c.name for c in relation.columns] == ["id", "note"]
    assert begin.final_lsn == commit.commit_lsn
    assert got[-1][0] == commit.end_lsn  # a Commit's position is its end_lsn: what gets confirmed
    assert got[1][0] == got[0][0]  # Relation (sent with 0/0) takes the position before it
    positions = [lsn for lsn, _ in got]
    assert positions == sorted(positions)
    assert inserted_ids(got) == [1, 2, 3]
    assert [m.new.values[1] for _, m in got if isinstance(m, Insert)] == [b"row 1", b"row 2", b"row 3"]


def test_confirm_advances_confirmed_flush_lsn(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    with start(pg, table) as stream:
        insert(pg, table, range(1, 11))
        got = read_until(stream, lambda got: bool(commits(got)))
        end = commits(got)[-1].end_lsn
        stream.read_batch(10, 1.5)  # a status message goes out meanwhile: it must not confirm anything
        before = slot_status(pg.dsn, table.slot)
        assert before.confirmed_flush_lsn is not None and before.confirmed_flush_lsn < end
        assert bool(stream.in_flight) and stream.confirm_idle() is None

        stream.confirm(end)
        assert stream.confirmed_lsn == end and not stream.in_flight

        def confirmed() -> bool:
            flushed = slot_status(pg.dsn, table.slot).confirmed_flush_lsn
            return flushed is not None and flushed >= end

        wait_for(confirmed, what="confirmed_flush_lsn to reach the commit")
        stream.confirm(LSN(end.value - 1))  # backwards: ignored
        with pytest.raises(ValueError):
            stream.confirm(LSN(end.value + 10**9))  # beyond anything the server sent
    status = slot_status(pg.dsn, table.slot)
    assert status.exists and status.plugin == "pgoutput" and status.wal_status == "reserved"
    assert status.retained_bytes is not None and status.retained_bytes >= 0


def test_status_messages_carry_only_what_was_confirmed(pg: Server, table: Table) -> None:
    """Keepalives and the periodic status messages never move the slot past the caller's confirm
    (psycopg2 moved the flush position to a keepalive's WAL end by itself: a pipeline restarted
    after that found its slot beyond the position recorded in the warehouse)."""
    other = _name("quiet")
    pg.sql(f"CREATE TABLE {other} (id serial PRIMARY KEY, payload text)")  # not in the publication
    with create_slot(pg.dsn, table.slot):
        pass
    with ReplicationStream.start(pg.dsn, table.slot, table.options, status_interval=1.0) as stream:
        insert(pg, table, range(1, 4))
        got = read_until(stream, lambda got: bool(commits(got)))
        end = commits(got)[-1].end_lsn
        stream.confirm(end)
        for _ in range(5):
            pg.sql(f"INSERT INTO {other} (payload) SELECT repeat('x', 200) FROM generate_series(1, 500)")
        target = pg.lsn()
        deadline = time.monotonic() + 15
        while stream.server_wal_end < target:  # keepalives report the WAL beyond the commit ...
            assert time.monotonic() < deadline, f"no keepalive reported {target}"
            stream.send_status(reply=True)
            assert not stream.read_batch(100, 0.3)
        assert not stream.read_batch(100, 2.5)  # ... and status messages go out meanwhile
        assert not stream.in_flight and stream.idle_position() is not None
        assert slot_status(pg.dsn, table.slot).confirmed_flush_lsn == end


def test_a_busy_consumer_neither_stalls_the_server_nor_times_it_out(pg: Server, table: Table) -> None:
    """The reader thread drains the socket while the consumer is away, up to its bound, and keeps
    the walsender from timing out meanwhile (here 3 s: far shorter than the consumer's absence)."""
    with create_slot(pg.dsn, table.slot):
        pass
    dsn = f"{pg.dsn} options='-c wal_sender_timeout=3s'"
    with ReplicationStream.start(dsn, table.slot, table.options, status_interval=1.0) as stream:
        stream.inbox_bytes = 1 << 20
        insert(pg, table, range(1, 100_001))  # about 3 MB of pgoutput messages
        time.sleep(7)  # busy elsewhere: nothing is read by the consumer
        first = stream.read_raw(max_messages=1_000_000, max_wait_s=0)
        held = sum(map(len, first.payloads))
        # More than a socket holds (a few hundred messages): the reader kept the server sending ...
        assert held >= 512 << 10, held
        # ... and stopped at its bound (plus at most one gulp of the socket).
        assert held < 2 << 20, held
        rows = sum(1 for p in first.payloads if p[:1] == b"I")
        done = False
        deadline = time.monotonic() + 60
        while not done:
            assert time.monotonic() < deadline
            chunk = stream.read_raw(max_wait_s=1.0)
            rows += sum(1 for p in chunk.payloads if p[:1] == b"I")
            done = b"C" in chunk.tags
    assert rows == 100_000


def test_idle_stream_confirming_wal_end_advances_the_slot(pg: Server, table: Table) -> None:
    other = _name("other")
    pg.sql(f"CREATE TABLE {other} (id serial PRIMARY KEY, payload text)")  # not in the publication
    with create_slot(pg.dsn, table.slot):
        pass
    before = slot_status(pg.dsn, table.slot)
    assert before.restart_lsn is not None and before.confirmed_flush_lsn is not None
    # Status messages carry only what was confirmed: the slot moves only through confirm_idle().
    with ReplicationStream.start(pg.dsn, table.slot, table.options, status_interval=60) as stream:
        assert not stream.read_batch(100, 0.5)
        for _ in range(20):
            pg.sql(f"INSERT INTO {other} (payload) SELECT repeat('x', 200) FROM generate_series(1, 500)")
        target = pg.lsn()
        confirmed: list[LSN | None] = []

        def advanced() -> bool:
            pg.sql("CHECKPOINT")  # logs a running-xacts record: the slot's next restart point
            assert not stream.read_batch(100, 0.5)  # nothing relevant arrives ...
            if stream.confirm_idle() is not None:  # ... so the position the server reports may be confirmed
                confirmed.append(stream.confirmed_lsn)
            now = slot_status(pg.dsn, table.slot)
            assert now.confirmed_flush_lsn is not None and now.restart_lsn is not None
            return now.confirmed_flush_lsn >= target and now.restart_lsn > before.restart_lsn

        wait_for(advanced, timeout=25, what="the idle slot to advance")
        assert confirmed and not stream.in_flight
        assert stream.server_wal_end >= target
        assert stream.confirmed_lsn is not None and stream.confirmed_lsn >= target


def test_reconnect_from_confirmed_lsn_does_not_redeliver(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    with start(pg, table) as stream:
        insert(pg, table, range(1, 4))
        got = read_until(stream, lambda got: bool(commits(got)))
        stream.confirm(commits(got)[-1].end_lsn)
        insert(pg, table, range(4, 7))  # read but never confirmed: must come again
        got = read_until(stream, lambda got: bool(commits(got)))
        assert inserted_ids(got) == [4, 5, 6]
    insert(pg, table, range(7, 10))

    with start(pg, table) as stream:
        got = read_until(stream, lambda got: 9 in inserted_ids(got))
    assert inserted_ids(got) == [4, 5, 6, 7, 8, 9]
    assert [type(m) for _, m in got[:2]] == [Begin, Relation]


def test_dropped_slot_gives_slot_missing_error(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    assert slot_exists(pg.dsn, table.slot)
    assert drop_slot(pg.dsn, table.slot) is True
    assert drop_slot(pg.dsn, table.slot) is False
    assert not slot_exists(pg.dsn, table.slot)
    assert not slot_status(pg.dsn, table.slot).exists
    with pytest.raises(SlotMissingError, match="does not exist"):
        ReplicationStream.start(pg.dsn, table.slot, table.options)


def test_active_slot_is_busy_until_terminated(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    with start(pg, table) as stream:
        status = slot_status(pg.dsn, table.slot)
        assert status.active and status.active_pid
        with pytest.raises(SourceError):  # transient: the other walsender may go away
            ReplicationStream.start(pg.dsn, table.slot, table.options)
        with pytest.raises(SourceError):
            drop_slot(pg.dsn, table.slot)
        assert drop_slot(pg.dsn, table.slot, terminate_active=True)
        with pytest.raises(SourceError):
            stream.read_batch(10, 5)


def test_large_transaction_streams_in_bounded_batches(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    insert(pg, table, range(1, 200_001))
    sizes: list[int] = []
    rows = 0
    tracemalloc.start()
    try:
        with start(pg, table) as stream:
            deadline = time.monotonic() + 120
            done = False
            while not done:
                assert time.monotonic() < deadline
                batch = stream.read_batch(5_000, 2.0)
                sizes.append(len(batch))
                rows += sum(1 for m in batch.messages if isinstance(m, Insert))
                done = any(isinstance(m, Commit) for m in batch.messages)
                del batch
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == 200_000
    assert max(sizes) <= 5_000 and len(sizes) >= 40
    assert peak < 32 * 1024 * 1024, f"peak traced memory {peak / 1e6:.1f} MB"


def test_protocol_v2_streams_in_progress_transactions(pg: Server, table: Table) -> None:
    with create_slot(pg.dsn, table.slot):
        pass
    opts = StreamOptions((table.publication,), proto_version=2, streaming=True)
    with ReplicationStream.start(pg.dsn, table.slot, opts, status_interval=1.0) as stream:
        insert(pg, table, range(1, 20_001))  # far above logical_decoding_work_mem (64kB)
        got = read_until(stream, lambda got: any(isinstance(m, StreamCommit) for _, m in got), timeout=60)
        kinds = {type(m) for _, m in got}
        assert {StreamStart, StreamStop, StreamCommit} <= kinds and Begin not in kinds
        inserts = [m for _, m in got if isinstance(m, Insert)]
        assert len(inserts) == 20_000 and all(m.xid is not None for m in inserts)
        commit = next(m for _, m in got if isinstance(m, StreamCommit))
        assert stream.in_flight
        stream.confirm(commit.end_lsn)
        assert not stream.in_flight


def test_temporary_slot_streams_on_the_snapshot_connection(pg: Server, table: Table) -> None:
    insert(pg, table, range(1, 6))
    with create_slot(pg.dsn, table.slot, temporary=True) as slot:
        with psycopg.connect(pg.dsn) as reader:
            reader.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            reader.execute(f"SET TRANSACTION SNAPSHOT '{slot.snapshot_name}'")
            insert(pg, table, range(6, 9))
            loaded = [r[0] for r in reader.execute(f"SELECT id FROM {table.name} ORDER BY id")]
        assert slot_status(pg.dsn, table.slot).temporary
        stream = slot.start_stream(table.options)
    with stream:
        got = read_until(stream, lambda got: 8 in inserted_ids(got))
    assert loaded == [1, 2, 3, 4, 5] and inserted_ids(got) == [6, 7, 8]
    with pytest.raises(RuntimeError):
        _ = slot.snapshot_name
    wait_for(lambda: not slot_exists(pg.dsn, table.slot), what="the temporary slot to go with its connection")


def test_failed_initial_load_drops_the_new_slot(pg: Server, table: Table) -> None:
    with pytest.raises(RuntimeError, match="load failed"), create_slot(pg.dsn, table.slot):
        raise RuntimeError("load failed")
    assert not slot_exists(pg.dsn, table.slot)


def test_errors_never_show_the_password(pg: Server, tmp_path: Path) -> None:
    dsn = f"host={tmp_path} port=1 dbname=postgres user=postgres password=hunter2secret"
    for call in (
        lambda: ReplicationStream.start(dsn, "any_slot", StreamOptions(("pub",))),
        lambda: create_slot(dsn, "any_slot"),
        lambda: slot_status(dsn, "any_slot"),
    ):
        with pytest.raises(SourceError) as info:
            call()
        assert "hunter2secret" not in str(info.value)
        assert info.value.__cause__ is None and info.value.__suppress_context__


def test_replication_over_the_loopback_with_scram_and_a_password_file(tmp_path: Path) -> None:
    """As a deployment's daemon connects: TCP on 127.0.0.1, SCRAM required, the password from a
    pgpass file, read again at each connection. The password holds what pgpass escapes and what
    SASLprep changes (a soft hyphen, a non-ASCII space, a character NFKC rewrites), so the server's
    own hashing decides whether the client prepared it the same way."""
    with bare_server("scram", "-c listen_addresses=127.0.0.1") as pg:
        hba = pg.data / "pg_hba.conf"
        hba.write_text("local all postgres trust\nhost postgres cdc 127.0.0.1/32 scram-sha-256\n")
        password = "pä:ss\\wörd ✓ I\u00adX\u00a0\u2168"
        with psycopg.connect(pg.dsn, autocommit=True) as c:
            c.execute("SELECT pg_reload_conf()")
            c.execute(sql.SQL("CREATE ROLE cdc LOGIN REPLICATION PASSWORD {}").format(sql.Literal(password)))
            c.execute("CREATE TABLE t (id integer PRIMARY KEY, note text)")
            c.execute("GRANT SELECT ON t TO cdc")
            c.execute("CREATE PUBLICATION pub FOR TABLE t")
        passfile = tmp_path / "pgpass"
        escaped = password.replace("\\", "\\\\").replace(":", "\\:")
        passfile.write_text(f"127.0.0.1:*:postgres:cdc:{escaped}\n")
        passfile.chmod(0o600)
        dsn = (
            f"host=127.0.0.1 port={pg.port} dbname=postgres user=cdc passfile={passfile} sslmode=disable"
            " require_auth=scram-sha-256"
        )
        with create_slot(dsn, "s") as slot:
            assert slot.snapshot_name
        pg.sql("INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 500) g")
        with ReplicationStream.start(dsn, "s", StreamOptions(("pub",)), status_interval=1.0) as stream:
            got = read_until(stream, lambda g: len(inserted_ids(g)) == 500)
            assert inserted_ids(got) == list(range(1, 501))
            rows = pg.sql("SELECT client_addr::text, usename FROM pg_stat_replication")
            assert rows == [("127.0.0.1/32", "cdc")]
        # A new password reaches the next connection through the file; a wrong one is refused
        # with the server's reason and without the password.
        pg.sql("ALTER ROLE cdc PASSWORD 'rotated-secret'")
        with pytest.raises(PgbridgeError, match="password authentication failed") as info:
            ReplicationStream.start(dsn, "s", StreamOptions(("pub",)))
        assert "rotated" not in str(info.value) and "wörd" not in str(info.value)
        passfile.write_text("127.0.0.1:*:postgres:cdc:rotated-secret\n")
        with ReplicationStream.start(dsn, "s", StreamOptions(("pub",)), status_interval=1.0) as stream:
            pg.sql("INSERT INTO t VALUES (501, 'after the rotation')")
            assert inserted_ids(read_until(stream, lambda g: 501 in inserted_ids(g)))[-1] == 501
        # Whatever lets the client in without SCRAM (here: trust) is refused, as libpq refuses it.
        hba.write_text("local all postgres trust\nhost postgres cdc 127.0.0.1/32 trust\n")
        pg.sql("SELECT pg_reload_conf()")
        with pytest.raises(PgbridgeError, match=r'requirement "scram-sha-256" failed'):
            ReplicationStream.start(dsn, "s", StreamOptions(("pub",)))
        drop_slot(pg.dsn, "s", terminate_active=True)
