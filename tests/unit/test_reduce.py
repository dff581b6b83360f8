"""The batch reducer against a naive oracle that applies every change one at a time."""

from __future__ import annotations

import random

from pgbridge.cdc.reduce import UNCHANGED, Cell, TableDelta

# Rows are (id, a, big): id is the key, big may be an unchanged TOAST value in updates.


def apply_delta(table: dict[bytes, list[bytes | None]], d: TableDelta) -> dict[bytes, list[bytes | None]]:
    """What a sink does: resolve from the pre-batch table, clear keys, write final rows."""
    before = dict(table)
    out = {} if d.truncated else dict(table)
    resolved = []
    for row in d.rows.values():
        vals = list(row.values)
        if row.unresolved:
            assert row.origin is not None
            src = before[row.origin[0]]  # type: ignore[index]
            vals = [s if v is UNCHANGED else v for v, s in zip(vals, src, strict=True)]
        resolved.append(vals)
    for k in d.keys_to_clear():
        out.pop(k[0], None)  # type: ignore[arg-type]
    for vals in resolved:
        out[vals[0]] = vals  # type: ignore[index]
    return out


def test_random_changes_match_one_at_a_time_application() -> None:
    rng = random.Random(7)
    for _round in range(300):
        table: dict[bytes, list[bytes | None]] = {
            str(i).encode(): [str(i).encode(), b"a", b"big" + str(i).encode()] for i in range(6)
        }
        oracle = {k: list(v) for k, v in table.items()}
        d = TableDelta(key_positions=(0,))
        next_id = 100
        for _ in range(rng.randint(1, 25)):
            op = rng.random()
            keys = list(oracle)
            if op < 0.25 or not keys:
                k = str(next_id).encode()
                next_id += 1
                row: list[bytes | None] = [k, rng.choice([b"x", None]), b"big-new"]
                d.insert(row)
                oracle[k] = list(row)
            elif op < 0.65:
                k = rng.choice(keys)
                new_big: Cell = UNCHANGED if rng.random() < 0.6 else b"big-upd"
                move = rng.random() < 0.3
                nk = str(next_id).encode() if move else k
                next_id += move
                new: list[Cell] = [nk, rng.choice([b"y", None]), new_big]
                d.update(new, (k,) if move else None)
                cur = oracle.pop(k)
                oracle[nk] = [nk, new[1], cur[2] if new_big is UNCHANGED else new_big]  # type: ignore[list-item]
            elif op < 0.95:
                k = rng.choice(keys)
                d.delete((k,))
                del oracle[k]
            else:
                d.truncate()
                oracle.clear()
        assert apply_delta(table, d) == oracle


def test_key_change_moves_row_and_keeps_toast() -> None:
    d = TableDelta(key_positions=(0,))
    d.update([b"2", b"a", UNCHANGED], (b"1",))
    assert d.deletes == {(b"1",)}
    row = d.rows[(b"2",)]
    assert row.origin == (b"1",) and row.unresolved


def test_insert_then_update_resolves_toast_in_batch() -> None:
    d = TableDelta(key_positions=(0,))
    d.insert([b"1", b"a", b"big"])
    d.update([b"1", b"b", UNCHANGED])
    row = d.rows[(b"1",)]
    assert row.values == [b"1", b"b", b"big"] and row.origin is None and not row.unresolved
