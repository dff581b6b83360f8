"""Schema changes, carried through the WAL in order with the data.

pgoutput sends no DDL. pgbridge installs event triggers in the source database that write each
change to a table's shape into the WAL as a *transactional* logical message (prefix
``pgbridge.ddl``), inside the transaction that made it:

* ``ddl_command_end`` (CREATE TABLE, ALTER TABLE, ...): ``{"op": "define", ...}`` with the table's
  whole new shape, read by ``_pgbridge.table_definition(oid)`` -- the same catalog queries the
  initial load uses (:func:`pgbridge.cdc.catalog.definition_function_sql`);
* ``sql_drop``: ``{"op": "drop", ...}`` for each dropped table;
* ``table_rewrite``: ``{"op": "rewrite", ...}``: the table's rows were rewritten (ALTER COLUMN TYPE,
  ADD COLUMN with a volatile default), which the WAL does not carry as row changes, so the
  warehouse re-copies the table.

The message carries the shape as of that point in the WAL, so a pipeline that replays from an old
position applies each change to the shape it had then -- never to today's catalog. This module is
pure apart from the SQL it renders: parsing messages and planning how a warehouse table goes from
one shape to the next (a rename keeps ``attnum``; a drop and re-add does not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.errors import PgbridgeError

PREFIX: Final = "pgbridge.ddl"
SCHEMA: Final = "_pgbridge"
VERSION: Final = 1


class DdlMessageError(PgbridgeError):
    """A ``pgbridge.ddl`` message that cannot be read (written by an incompatible version?)."""


@dataclass(frozen=True)
class Define:
    """A table was created or altered; ``definition`` is ``table_definition()``'s result."""

    tag: str
    oid: int
    definition: dict[str, Any]


@dataclass(frozen=True)
class Drop:
    tag: str
    oid: int
    schema: str
    name: str


@dataclass(frozen=True)
class Rewrite:
    oid: int


Event = Define | Drop | Rewrite


def parse(content: bytes) -> Event:
    try:
        raw = json.loads(content)
        op = raw["op"]
        if op == "define":
            return Define(raw["tag"], int(raw["oid"]), raw["definition"])
        if op == "drop":
            return Drop(raw["tag"], int(raw["oid"]), raw["schema"], raw["name"])
        if op == "rewrite":
            return Rewrite(int(raw["oid"]))
    except (ValueError, KeyError, TypeError) as e:
        raise DdlMessageError(f"unreadable {PREFIX} message: {e}") from None
    raise DdlMessageError(f"unknown {PREFIX} message op {op!r}")


def install_sql() -> list[str]:
    """Statements (run as a superuser in the source database) that install the DDL capture. Idempotent."""
    from pgbridge.cdc.catalog import definition_function_sql  # catalog -> sinks -> ddl: import late

    emit = f"pg_logical_emit_message(true, '{PREFIX}', %s::text)"
    fn = "LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$"
    return [
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
        f"REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC",
        definition_function_sql(SCHEMA),
        f"""CREATE OR REPLACE FUNCTION {SCHEMA}.capture_define() RETURNS event_trigger {fn}
DECLARE r record;
BEGIN
  FOR r IN SELECT DISTINCT d.objid FROM pg_event_trigger_ddl_commands() d JOIN pg_class c ON c.oid = d.objid
           WHERE d.classid = 'pg_class'::regclass AND c.relkind = 'r' AND c.relpersistence = 'p' LOOP
    PERFORM {
            emit % f"jsonb_build_object('v', {VERSION}, 'op', 'define', 'tag', tg_tag, 'oid', r.objid, "
            f"'definition', {SCHEMA}.table_definition(r.objid))"
        };
  END LOOP;
END $fn$""",
        f"""CREATE OR REPLACE FUNCTION {SCHEMA}.capture_drop() RETURNS event_trigger {fn}
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_dropped_objects() WHERE object_type = 'table' AND NOT is_temporary LOOP
    PERFORM {
            emit % f"jsonb_build_object('v', {VERSION}, 'op', 'drop', 'tag', tg_tag, 'oid', r.objid, "
            "'schema', r.schema_name, 'name', r.object_name)"
        };
  END LOOP;
END $fn$""",
        f"""CREATE OR REPLACE FUNCTION {SCHEMA}.capture_rewrite() RETURNS event_trigger {fn}
BEGIN
  PERFORM {emit % f"jsonb_build_object('v', {VERSION}, 'op', 'rewrite', 'oid', pg_event_trigger_table_rewrite_oid())"};
END $fn$""",
        f"REVOKE ALL ON FUNCTION {SCHEMA}.capture_define(), {SCHEMA}.capture_drop(), "
        f"{SCHEMA}.capture_rewrite() FROM PUBLIC",
        _create_trigger(TRIGGERS[0], "ddl_command_end", f"{SCHEMA}.capture_define()"),
        _create_trigger(TRIGGERS[1], "sql_drop", f"{SCHEMA}.capture_drop()"),
        _create_trigger(TRIGGERS[2], "table_rewrite", f"{SCHEMA}.capture_rewrite()"),
    ]


TRIGGERS: Final = ("pgbridge_define", "pgbridge_drop", "pgbridge_rewrite")
FUNCTIONS: Final = ("capture_define", "capture_drop", "capture_rewrite", "table_definition")  # in SCHEMA


def uninstall_sql() -> list[str]:
    """Statements that remove what :func:`install_sql` installs (the schema itself excepted). Idempotent."""
    return [
        *(f"DROP EVENT TRIGGER IF EXISTS {name}" for name in TRIGGERS),
        f"DROP FUNCTION IF EXISTS {', '.join(f'{SCHEMA}.{name}' for name in FUNCTIONS)}",  # each name is unique
    ]


def _create_trigger(name: str, event: str, function: str) -> str:
    # Created only when missing: dropping and re-creating would open a window where DDL goes unseen.
    return (
        f"DO $do$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname = '{name}') THEN"
        f" CREATE EVENT TRIGGER {name} ON {event} EXECUTE FUNCTION {function}; END IF; END $do$"
    )


# -- planning the warehouse change ---------------------------------------------------------------
@dataclass(frozen=True)
class AddColumn:
    column: SinkColumn
    missing: str | None = None  # PostgreSQL text of the value existing rows read (ADD COLUMN ... DEFAULT)


@dataclass(frozen=True)
class DropColumn:
    name: str


@dataclass(frozen=True)
class RenameColumn:
    old: str
    new: str


@dataclass(frozen=True)
class RetypeColumn:
    column: SinkColumn


Step = AddColumn | DropColumn | RenameColumn | RetypeColumn


def plan_alter(old: SinkTable, new: SinkTable, missing: dict[int, str | None] | None = None) -> list[Step]:
    """The steps that turn warehouse table ``old`` into ``new``, matching columns by ``attnum``.

    Order: drops, renames (via a temporary name when two columns swap names), type changes, adds.
    ``missing`` maps an added column's attnum to the value its existing rows take.
    """
    before = {c.attnum: c for c in old.columns}
    after = {c.attnum: c for c in new.columns}
    steps: list[Step] = [DropColumn(c.name) for n, c in before.items() if n not in after]
    renames = [(before[n].name, c.name) for n, c in after.items() if n in before and before[n].name != c.name]
    taken = {c.name for n, c in before.items() if n in after}
    staged: list[tuple[str, str]] = []
    for src, dst in renames:
        if dst in taken:  # the name is still held by another column that is itself being renamed
            tmp = f"_pgbridge_tmp_{src}"
            steps.append(RenameColumn(src, tmp))
            staged.append((tmp, dst))
        else:
            steps.append(RenameColumn(src, dst))
        taken.discard(src)
        taken.add(dst)
    steps += [RenameColumn(t, d) for t, d in staged]
    steps += [RetypeColumn(c) for n, c in after.items() if n in before and before[n].ctype.sql_type != c.ctype.sql_type]
    steps += [AddColumn(c, (missing or {}).get(n)) for n, c in after.items() if n not in before]
    return steps
