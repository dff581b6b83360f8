"""DuckDB sink: applies a batch of changes set-based, with the checkpoint in the same transaction.

Raw PostgreSQL text is staged through Arrow as VARCHAR and cast in SQL (the typemap's exact
casts), which is several times faster than converting in Python. Per table and batch: resolve
unchanged TOAST columns from the warehouse row at each row's origin key, clear the affected keys,
insert the final rows. The commit LSN is written by the same transaction, so after a crash the
pipeline skips exactly what the warehouse already holds.

A batch comes in one of two forms. :meth:`DuckDBSink.apply_staged` takes the changes themselves,
columnar and in stream order (:class:`~pgbridge.cdc.sinks.base.StagedChanges`), and folds them in
SQL: the last change of each key wins, and an unchanged TOAST column takes the last value sent for
that key in the batch (or the warehouse row's, when none was). :meth:`DuckDBSink.apply` takes a
:class:`~pgbridge.cdc.reduce.TableDelta` folded in Python: the form for batches in which a change
moves a row to another key. A table without a unique key (:attr:`SinkTable.bag`) is staged as
signed copies of whole rows and applied as a multiset (:meth:`DuckDBSink._apply_bag`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from pgbridge.cdc.ddl import DropColumn, RenameColumn, RetypeColumn, Step
from pgbridge.cdc.reduce import UNCHANGED, TableDelta, text_of
from pgbridge.cdc.sinks.base import SinkCapabilities, SinkTable, StagedChanges
from pgbridge.cdc.typemap import duckdb_cast_expr
from pgbridge.errors import PgbridgeError
from pgbridge.types import LSN, quote_ident

META_SCHEMA = "_pgbridge"


class SinkError(PgbridgeError):
    """The warehouse refused a write (a value it cannot hold, a damaged file, ...)."""


qi = quote_ident


class DuckDBSink:
    capabilities = SinkCapabilities(transactions=True, set_based_apply=True, schema_changes=True)

    def __init__(self, path: Path | str, pipeline: str) -> None:
        self.pipeline = pipeline
        try:
            self.con = duckdb.connect(str(path))
        except duckdb.Error as e:
            raise SinkError(f"cannot open the warehouse {path}: {e}") from None
        self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {META_SCHEMA}")
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS {META_SCHEMA}.checkpoint"
            " (pipeline VARCHAR PRIMARY KEY, lsn UBIGINT NOT NULL, updated_at TIMESTAMPTZ NOT NULL)"
        )
        # The highest position ever confirmed to the slot (the end of the last applied commit, or
        # a keepalive's position while idle), written before it is confirmed: a slot whose
        # confirmed position lies beyond it was not this pipeline's (recreated after a failover).
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS {META_SCHEMA}.slot_position"
            " (pipeline VARCHAR PRIMARY KEY, lsn UBIGINT NOT NULL)"
        )
        # The shape of each replicated table, as of the checkpoint: written in the same transaction
        # as the data, so a restart resumes with the shapes the stream expects at that position.
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS {META_SCHEMA}.tables (pipeline VARCHAR NOT NULL,"
            " schema_name VARCHAR NOT NULL, table_name VARCHAR NOT NULL, definition VARCHAR NOT NULL)"
        )
        # The WAL position up to which rows copied outside the stream may reach (Sink.note_copy).
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS {META_SCHEMA}.copy_horizon"
            " (pipeline VARCHAR PRIMARY KEY, lsn UBIGINT NOT NULL)"
        )
        self._horizon = self._lsn_of("copy_horizon")
        # Tables whose changes are not applied until a resync, and why: kept with the data, so a
        # restart past the change that stopped one does not stream onto it again.
        self.con.execute(
            f"CREATE TABLE IF NOT EXISTS {META_SCHEMA}.stopped_tables"
            " (pipeline VARCHAR NOT NULL, qualified VARCHAR NOT NULL, reason VARCHAR NOT NULL)"
        )
        self._in_tx = False

    # -- transactions ---------------------------------------------------------------------
    def _lsn_of(self, table: str) -> LSN | None:
        """The pipeline's LSN in a meta table, if it has a row there."""
        row = self.con.execute(f"SELECT lsn FROM {META_SCHEMA}.{table} WHERE pipeline = ?", [self.pipeline]).fetchone()
        return LSN(int(row[0])) if row else None

    def checkpoint(self) -> LSN | None:
        return self._lsn_of("checkpoint")

    def begin(self) -> None:
        self.con.execute("BEGIN TRANSACTION")
        self._in_tx = True

    def commit(self, lsn: LSN, confirm: LSN | None = None) -> None:
        # An UPDATE of the existing row costs DuckDB about 1.5 ms less than an upsert (2 vCPUs), once
        # per batch; the INSERT runs once, for the pipeline's first batch.
        self._set_row("checkpoint", "lsn = ?, updated_at = now()", "?, ?, now()", lsn)
        if confirm is not None:
            self.note_position(confirm)
        self.con.execute("COMMIT")
        self._in_tx = False

    def note_position(self, lsn: LSN) -> None:
        """Record that the slot is about to be confirmed up to ``lsn`` (in a batch, or outside one)."""
        self._set_row("slot_position", "lsn = greatest(lsn, ?)", "?, ?", lsn)

    def _set_row(self, table: str, assignments: str, values: str, lsn: LSN) -> None:
        """UPDATE the pipeline's row of a meta table with ``lsn``; INSERT it when there is none yet."""
        sql = f"UPDATE {META_SCHEMA}.{table} SET {assignments} WHERE pipeline = ?"
        row = self.con.execute(sql, [int(lsn), self.pipeline]).fetchone()
        if not (row and row[0]):
            self.con.execute(f"INSERT INTO {META_SCHEMA}.{table} VALUES ({values})", [self.pipeline, int(lsn)])

    def position(self) -> LSN | None:
        return self._lsn_of("slot_position")

    def note_copy(self, lsn: LSN) -> None:
        self._set_row("copy_horizon", "lsn = greatest(lsn, ?)", "?, ?", lsn)
        # Taken at once: a rollback leaves it higher than the record, which only costs a DELETE.
        self._horizon = max(lsn, self._horizon) if self._horizon is not None else lsn

    def copy_horizon(self) -> LSN | None:
        return self._horizon

    def commit_meta(self) -> None:
        """Commit without moving the checkpoint (bookkeeping, a re-copy outside the stream)."""
        self.con.execute("COMMIT")
        self._in_tx = False

    def rollback(self) -> None:
        if self._in_tx:
            self.con.execute("ROLLBACK")
            self._in_tx = False

    def close(self) -> None:
        self.rollback()
        self.con.close()

    # -- tables -----------------------------------------------------------------------------
    def target(self, t: SinkTable) -> str:
        return f"{qi(t.schema)}.{qi(t.name)}"

    @staticmethod
    def column_list(t: SinkTable) -> str:
        return ", ".join(qi(c.name) for c in t.columns)

    @staticmethod
    def column_defs(t: SinkTable) -> str:
        """``t``'s columns as a CREATE TABLE lists them (name and warehouse type)."""
        return ", ".join(f"{qi(c.name)} {c.ctype.sql_type}" for c in t.columns)

    def ensure_table(self, t: SinkTable) -> None:
        self.con.execute(f"CREATE SCHEMA IF NOT EXISTS {qi(t.schema)}")
        self.con.execute(f"CREATE TABLE IF NOT EXISTS {self.target(t)} ({self.column_defs(t)})")

    def alter_table(self, old: SinkTable, steps: Sequence[Step]) -> bool:
        """Apply ``steps`` (from :func:`~pgbridge.cdc.ddl.plan_alter`) inside the open transaction.

        Returns True when the caller must re-copy the table's rows: a changed column type is taken
        to NULL in place (keeping its position), because only the source knows how PostgreSQL
        converted each value (``USING`` expressions, rounding, ...).
        """
        target, recopy = self.target(old), False
        try:
            for step in steps:
                if isinstance(step, DropColumn):
                    self.con.execute(f"ALTER TABLE {target} DROP COLUMN {qi(step.name)}")
                elif isinstance(step, RenameColumn):
                    self.con.execute(f"ALTER TABLE {target} RENAME COLUMN {qi(step.old)} TO {qi(step.new)}")
                elif isinstance(step, RetypeColumn):
                    c, recopy = step.column, True
                    self.con.execute(
                        f"ALTER TABLE {target} ALTER COLUMN {qi(c.name)} TYPE {c.ctype.sql_type} USING NULL"
                    )
                else:
                    c = step.column
                    self.con.execute(f"ALTER TABLE {target} ADD COLUMN {qi(c.name)} {c.ctype.sql_type}")
                    if step.missing is not None:
                        value = duckdb_cast_expr(c.ctype, "?::VARCHAR")
                        self.con.execute(f"UPDATE {target} SET {qi(c.name)} = {value}", [step.missing])
        except duckdb.Error as e:
            raise SinkError(f"changing the shape of {old.schema}.{old.name} in the warehouse failed: {e}") from None
        return recopy

    def drop_table(self, t: SinkTable) -> None:
        self.con.execute(f"DROP TABLE IF EXISTS {self.target(t)}")

    def rename_table(self, t: SinkTable, name: str) -> None:
        self.con.execute(f"ALTER TABLE {self.target(t)} RENAME TO {qi(name)}")

    def clear_rows(self, t: SinkTable) -> None:
        """Empty ``t`` before a re-copy (inside the open transaction)."""
        self.con.execute(f"DELETE FROM {self.target(t)}")

    # -- the registry of table shapes -----------------------------------------------------------
    def definitions(self) -> dict[tuple[str, str], str]:
        rows = self.con.execute(
            f"SELECT schema_name, table_name, definition FROM {META_SCHEMA}.tables WHERE pipeline = ?", [self.pipeline]
        ).fetchall()
        return {(r[0], r[1]): r[2] for r in rows}

    def save_definition(self, schema: str, name: str, definition: str | None) -> None:
        """Record (or with None, forget) a table's source shape; call inside the open transaction."""
        self.con.execute(
            f"DELETE FROM {META_SCHEMA}.tables WHERE pipeline = ? AND schema_name = ? AND table_name = ?",
            [self.pipeline, schema, name],
        )
        if definition is not None:
            self.con.execute(
                f"INSERT INTO {META_SCHEMA}.tables VALUES (?, ?, ?, ?)", [self.pipeline, schema, name, definition]
            )

    def stopped_tables(self) -> dict[str, str]:
        rows = self.con.execute(
            f"SELECT qualified, reason FROM {META_SCHEMA}.stopped_tables WHERE pipeline = ?", [self.pipeline]
        ).fetchall()
        return {r[0]: r[1] for r in rows}

    def save_stopped(self, stopped: dict[str, str]) -> None:
        """Record the tables whose changes are not applied, and why (inside the open transaction)."""
        self.con.execute(f"DELETE FROM {META_SCHEMA}.stopped_tables WHERE pipeline = ?", [self.pipeline])
        for qualified, reason in stopped.items():
            self.con.execute(
                f"INSERT INTO {META_SCHEMA}.stopped_tables VALUES (?, ?, ?)", [self.pipeline, qualified, reason]
            )

    # -- apply ------------------------------------------------------------------------------
    def _key_match(self, t: SinkTable, left: str, right: str) -> str:
        # Plain equality lets DuckDB prune the warehouse scan with the key range of the batch (its
        # zone maps); IS NOT DISTINCT FROM only where a key may be NULL (REPLICA IDENTITY FULL).
        same = "=" if t.key_not_null else "IS NOT DISTINCT FROM"
        parts = []
        for i in t.key:
            c = t.columns[i]
            parts.append(f"{left}.{qi(c.name)} {same} {duckdb_cast_expr(c.ctype, f'{right}.k{i}')}")
        return " AND ".join(parts)

    def apply(self, t: SinkTable, delta: TableDelta) -> None:
        assert not t.bag, "a bag table's changes are staged (StagedChanges), never keyed"
        try:
            self._apply(t, delta)
        except duckdb.Error as e:
            raise SinkError(f"applying changes to {t.qualified} failed: {e}") from None

    def _apply(self, t: SinkTable, delta: TableDelta) -> None:
        con, target = self.con, self.target(t)
        if delta.truncated:
            con.execute(f"DELETE FROM {target}")
        rows = list(delta.rows.values())
        ncols = len(t.columns)
        if rows:
            data: dict[str, Any] = {f"c{i}": [text_of(r.values[i]) for r in rows] for i in range(ncols)}
            unchanged = [i for i in range(ncols) if any(r.values[i] is UNCHANGED for r in rows)]
            for i in unchanged:
                data[f"u{i}"] = [r.values[i] is UNCHANGED for r in rows]
            if unchanged:
                for i in t.key:
                    data[f"k{i}"] = [text_of(r.origin[t.key.index(i)]) if r.origin else None for r in rows]
            stg = pa.table({k: pa.array(v, type=pa.bool_() if k[0] == "u" else pa.string()) for k, v in data.items()})
            con.register("_pgb_stg", stg)
            exprs = []
            for i, c in enumerate(t.columns):
                cast = duckdb_cast_expr(c.ctype, f"s.c{i}")
                exprs.append(f"CASE WHEN s.u{i} THEN o.{qi(c.name)} ELSE {cast} END" if i in unchanged else cast)
            join = f" LEFT JOIN {target} o ON {self._key_match(t, 'o', 's')}" if unchanged else ""
            con.execute(f"CREATE OR REPLACE TEMP TABLE _pgb_res AS SELECT {', '.join(exprs)} FROM _pgb_stg s{join}")
            con.unregister("_pgb_stg")
        # After a TRUNCATE nothing from before the batch is left to clear.
        keys = [] if delta.truncated else list(delta.keys_to_clear())
        if keys:
            kdata = {f"k{i}": [text_of(k[j]) for k in keys] for j, i in enumerate(t.key)}
            con.register("_pgb_del", pa.table({n: pa.array(v, type=pa.string()) for n, v in kdata.items()}))
            con.execute(f"DELETE FROM {target} AS o USING _pgb_del d WHERE {self._key_match(t, 'o', 'd')}")
            con.unregister("_pgb_del")
        if rows:
            con.execute(f"INSERT INTO {target} ({self.column_list(t)}) SELECT * FROM _pgb_res")
            con.execute("DROP TABLE _pgb_res")

    def apply_staged(self, t: SinkTable, changes: StagedChanges) -> None:
        try:
            self._apply_staged(t, changes)
        except duckdb.Error as e:
            raise SinkError(f"applying changes to {t.qualified} failed: {e}") from None

    def _apply_staged(self, t: SinkTable, ch: StagedChanges) -> None:
        con, target = self.con, self.target(t)
        if ch.truncated:
            con.execute(f"DELETE FROM {target}")
        if not ch.rows.num_rows:
            return
        if t.bag:
            self._apply_bag(t, ch)
            return
        keys = [f"s.k{i}" for i in t.key]
        same = "=" if t.key_not_null else "IS NOT DISTINCT FROM"
        same_key = " AND ".join(f"l.k{i} {same} s.k{i}" for i in t.key)
        con.register("_pgb_stg", ch.rows)
        try:
            if ch.unchanged:
                # The last change of each key, each unchanged column resolved from the last value sent
                # for the key since its last delete, else from the warehouse row at the key.
                window = f"PARTITION BY {', '.join(keys)} ORDER BY s._seq"
                frame = f"{window} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW"
                sent = [
                    f"last_value(CASE WHEN s._op = {ord('D')} THEN {{'d': true, 'v': NULL::VARCHAR}}"
                    f" WHEN NOT s.u{i} THEN {{'d': false, 'v': s.c{i}}} END IGNORE NULLS) OVER ({frame}) AS r{i}"
                    for i in ch.unchanged
                ]
                exprs = []
                for i, c in enumerate(t.columns):
                    if i in ch.unchanged:
                        value = duckdb_cast_expr(c.ctype, f"struct_extract(s.r{i}, 'v')")
                        sent_here = f"struct_extract(s.r{i}, 'd') IS FALSE"
                        exprs.append(f"CASE WHEN {sent_here} THEN {value} ELSE o.{qi(c.name)} END")
                    else:
                        exprs.append(duckdb_cast_expr(c.ctype, f"s.c{i}"))
                latest = f"row_number() OVER (PARTITION BY {', '.join(keys)} ORDER BY s._seq DESC) AS _rn"
                con.execute(
                    f"CREATE OR REPLACE TEMP TABLE _pgb_res AS SELECT {', '.join(exprs)}"
                    f" FROM (SELECT s.*, {', '.join(sent)}, {latest} FROM _pgb_stg s) s"
                    f" LEFT JOIN {target} o ON {self._key_match(t, 'o', 's')}"
                    f" WHERE s._rn = 1 AND s._op <> {ord('D')}"
                )
                source = "SELECT * FROM _pgb_res"
            else:
                casts = ", ".join(duckdb_cast_expr(c.ctype, f"s.c{i}") for i, c in enumerate(t.columns))
                later = f"SELECT 1 FROM _pgb_stg l WHERE {same_key} AND l._seq > s._seq"
                last = "" if ch.inserts_only else f" AND NOT EXISTS ({later})"
                source = f"SELECT {casts} FROM _pgb_stg s WHERE s._op <> {ord('D')}{last}"
            if not (ch.truncated or ch.fresh):  # after a TRUNCATE nothing from before the batch is left to clear
                # A join, not EXISTS: DuckDB pushes the batch's key range into the scan of the target
                # only for a join, and without it every batch reads the whole table.
                touched = ", ".join(f"k{i}" for i in t.key)
                con.execute(
                    f"DELETE FROM {target} AS o USING (SELECT DISTINCT {touched} FROM _pgb_stg) d"
                    f" WHERE {self._key_match(t, 'o', 'd')}"
                )
            con.execute(f"INSERT INTO {target} ({self.column_list(t)}) {source}")
            if ch.unchanged:
                con.execute("DROP TABLE _pgb_res")
        finally:
            con.unregister("_pgb_stg")

    def _apply_bag(self, t: SinkTable, ch: StagedChanges) -> None:
        """A multiset table: per distinct row, add its net count of copies or remove that many.

        Copies of a row are interchangeable, so the batch's order does not matter: only each typed
        row's sum of signs. ``rowid`` picks exactly as many copies as the net count removes.
        """
        con, target = self.con, self.target(t)
        casts = ", ".join(f"{duckdb_cast_expr(c.ctype, f's.c{i}')} AS c{i}" for i, c in enumerate(t.columns))
        con.register("_pgb_stg", ch.rows)
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE _pgb_net AS SELECT {casts}, sum(s._sign)::BIGINT AS n"
                " FROM _pgb_stg s GROUP BY ALL HAVING sum(s._sign) <> 0"
            )
        finally:
            con.unregister("_pgb_stg")
        # After a TRUNCATE nothing from before the batch is left to remove; an inserts-only batch removes nothing.
        if not ch.truncated and pc.min(ch.rows["_sign"]).as_py() < 0:
            same = " AND ".join(f"o.{qi(c.name)} IS NOT DISTINCT FROM d.c{i}" for i, c in enumerate(t.columns))
            con.execute(
                f"DELETE FROM {target} WHERE rowid IN (SELECT rid FROM (SELECT o.rowid AS rid, d.n,"
                " row_number() OVER (PARTITION BY d.g) AS copy"
                f" FROM {target} o JOIN (SELECT *, row_number() OVER () AS g FROM _pgb_net WHERE n < 0) d"
                f" ON {same}) WHERE copy <= -n)"
            )
        values = ", ".join(f"c{i}" for i in range(len(t.columns)))
        con.execute(f"INSERT INTO {target} ({self.column_list(t)}) SELECT {values} FROM _pgb_net, range(n) WHERE n > 0")
        con.execute("DROP TABLE _pgb_net")
