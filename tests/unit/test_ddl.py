"""The pure parts of DDL capture: reading messages and planning the warehouse change."""

from __future__ import annotations

import json

import pytest

from pgbridge.cdc import ddl
from pgbridge.cdc.ddl import AddColumn, DropColumn, RenameColumn, RetypeColumn, plan_alter
from pgbridge.cdc.sinks.base import SinkColumn, SinkTable
from pgbridge.cdc.typemap import duckdb_type

INT4, INT8, TEXT = 23, 20, 25


def table(*cols: tuple[str, int, int]) -> SinkTable:
    return SinkTable("s", "t", tuple(SinkColumn(n, duckdb_type(oid), attnum) for n, oid, attnum in cols), key=(0,))


def test_parse_each_op() -> None:
    define = {"v": 1, "op": "define", "tag": "ALTER TABLE", "oid": "16393", "definition": {"table": None}}
    assert ddl.parse(json.dumps(define).encode()) == ddl.Define("ALTER TABLE", 16393, {"table": None})
    drop = {"op": "drop", "tag": "DROP TABLE", "oid": 5, "schema": "s", "name": "t"}
    assert ddl.parse(json.dumps(drop).encode()) == ddl.Drop("DROP TABLE", 5, "s", "t")
    assert ddl.parse(b'{"op": "rewrite", "oid": "7"}') == ddl.Rewrite(7)


@pytest.mark.parametrize("content", [b"not json", b'{"op": "define"}', b'{"op": "explode", "oid": 1}', b"[]"])
def test_parse_refuses_garbage_with_a_clear_error(content: bytes) -> None:
    with pytest.raises(ddl.DdlMessageError, match=r"pgbridge\.ddl"):
        ddl.parse(content)


def test_plan_matches_columns_by_attnum() -> None:
    old = table(("id", INT4, 1), ("a", TEXT, 2), ("b", TEXT, 3))
    new = table(("id", INT8, 1), ("a2", TEXT, 2), ("c", INT4, 4))
    steps = plan_alter(old, new, {4: "7"})
    assert steps == [
        DropColumn("b"),
        RenameColumn("a", "a2"),
        RetypeColumn(new.columns[0]),
        AddColumn(new.columns[2], "7"),
    ]


def test_drop_and_re_add_under_the_same_name_is_not_a_rename() -> None:
    old = table(("id", INT4, 1), ("a", TEXT, 2))
    new = table(("id", INT4, 1), ("a", TEXT, 3))
    assert plan_alter(old, new) == [DropColumn("a"), AddColumn(new.columns[1])]


def test_swapped_names_go_through_a_temporary_name() -> None:
    old = table(("id", INT4, 1), ("a", TEXT, 2), ("b", TEXT, 3))
    new = table(("id", INT4, 1), ("b", TEXT, 2), ("a", TEXT, 3))
    steps = plan_alter(old, new)
    names = {"a": "x", "b": "y"}  # follow the values through the renames
    for s in steps:
        assert isinstance(s, RenameColumn)
        assert s.new not in names, f"{s} collides"
        names[s.new] = names.pop(s.old)
    assert names == {"b": "x", "a": "y"}


def test_install_sql_creates_triggers_only_when_missing() -> None:
    sql = "\n".join(ddl.install_sql())
    assert "DROP EVENT TRIGGER" not in sql  # never a window without capture
    for event in ("ddl_command_end", "sql_drop", "table_rewrite"):
        assert f"ON {event}" in sql
    assert "pg_logical_emit_message(true, 'pgbridge.ddl'" in sql
