"""Decode many pgoutput row changes at once, column by column, with no I/O at all.

The stream carries one Insert, Update or Delete message per row change. Decoding them one by one
into Python objects (:mod:`pgbridge.cdc.pgoutput`) costs several microseconds per change, more than
the walsender spends producing it. Here a run of row-change messages, concatenated into one buffer,
is decoded with numpy: every message of the same relation and layout is walked in step, one column
at a time, so the Python work is per column, not per row or per value. The result keeps PostgreSQL's
raw text where it lies in the buffer (``starts``/``lengths``); :func:`text_array` turns a column of it
into an Arrow string array in one pass, ready to be cast set-based in DuckDB.

The output is exactly what :func:`pgbridge.cdc.pgoutput.decode` would give for the same messages
(the unit tests check it against the captured fixtures and against random messages). Anything the
vectorized walk cannot vouch for (a malformed message, a column count that differs within a group)
raises :class:`Unsupported`, and the caller decodes those messages one by one instead, which raises
the proper :class:`~pgbridge.cdc.pgoutput.DecodeError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pgbridge.cdc.pgoutput import Delete, Insert, TupleData, Update

_rowwalk: ModuleType | None
try:
    from pgbridge.cdc import _rowwalk
except ImportError:  # not built (no C compiler where pgbridge was installed): numpy walks the rows
    _rowwalk = None

__all__ = ["TAG_DELETE", "TAG_INSERT", "TAG_UPDATE", "RowGroup", "TupleColumns", "Unsupported", "decode_rows"]
__all__ += ["as_array", "encode_row", "text_array"]

TAG_INSERT: Final = 0x49  # 'I'
TAG_UPDATE: Final = 0x55  # 'U'
TAG_DELETE: Final = 0x44  # 'D'
KIND_TEXT: Final = 0x74  # 't'
KIND_NULL: Final = 0x6E  # 'n'
KIND_UNCHANGED: Final = 0x75  # 'u'
KIND_BINARY: Final = 0x62  # 'b'
_N: Final = 0x4E
_K: Final = 0x4B
_O: Final = 0x4F
_PAD: Final = 8  # zero bytes after the buffer: a bounded read past a message's end never leaves the array

# numpy's own annotations are too loose to help here; arrays are documented by shape and dtype.
Array = Any


class Unsupported(Exception):
    """The vectorized walk cannot vouch for these messages: decode them one by one."""


@dataclass(frozen=True)
class TupleColumns:
    """One row image (TupleData) for each of ``n`` messages: ``(n, ncols)`` arrays.

    ``kinds`` holds the column kind bytes (``t``, ``n``, ``u``, ``b``); for ``t`` and ``b`` the value
    is ``buf[starts[i, c] : starts[i, c] + lengths[i, c]]``, otherwise ``lengths`` is 0.
    """

    kinds: Array  # uint8
    starts: Array  # int64
    lengths: Array  # int64

    @property
    def ncols(self) -> int:
        return int(self.kinds.shape[1])


@dataclass(frozen=True)
class RowGroup:
    """Messages of one tag, relation and old-tuple marker, in stream order.

    ``index`` are their positions among the messages given to :func:`decode_rows`. ``old_kind`` is
    ``'K'`` or ``'O'`` when an old image was sent (always for Delete), else ``None``. ``new`` is the
    new row image (None for Delete), ``old`` the old one (None when not sent).
    """

    tag: int
    relation_oid: int
    index: Array  # int64, ascending
    old_kind: str | None
    old: TupleColumns | None
    new: TupleColumns | None

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _be32(arr: Array, at: Array) -> Array:
    a = arr[at].astype(np.int64)
    return (a << 24) | (arr[at + 1].astype(np.int64) << 16) | (arr[at + 2].astype(np.int64) << 8) | arr[at + 3]


def _tuple(arr: Array, off: Array, limit: int) -> tuple[TupleColumns, Array]:
    """Walk one TupleData at ``off`` for every message at once; returns it and the offsets after it.

    The C extension walks message by message (one pass, without the GIL); numpy walks column by
    column where it was not built. Both give the same arrays for what :func:`decode_rows` passes:
    ``arr`` padded with zero bytes, ``limit`` one past the buffer, int64 offsets in ``[0, limit]``.
    """
    n = off.shape[0]
    ncols = (int(arr[off[0]]) << 8) | int(arr[off[0] + 1])
    kinds = np.empty((n, ncols), np.uint8)
    starts = np.zeros((n, ncols), np.int64)
    lengths = np.zeros((n, ncols), np.int64)
    if _rowwalk is not None:
        off = np.array(off, np.int64)  # in and out
        if not _rowwalk.walk(arr, off, limit, kinds, starts, lengths):
            raise Unsupported("column counts differ, or an unknown column kind")
        return TupleColumns(kinds, starts, lengths), off
    ncols_each = (arr[off].astype(np.int64) << 8) | arr[off + 1]
    if not (ncols_each == ncols).all():
        raise Unsupported("column counts differ")
    off = off + 2
    for c in range(ncols):
        np.minimum(off, limit, out=off)
        kind = arr[off]
        kinds[:, c] = kind
        has_value = (kind == KIND_TEXT) | (kind == KIND_BINARY)
        if has_value.all():
            length = _be32(arr, off + 1)
            starts[:, c] = off + 5
            lengths[:, c] = length
            off = off + 5 + length
        elif has_value.any():
            length = np.where(has_value, _be32(arr, off + 1), 0)
            starts[:, c] = np.where(has_value, off + 5, 0)
            lengths[:, c] = length
            off = off + np.where(has_value, 5 + length, 1)
        else:
            off = off + 1
        if not (has_value | (kind == KIND_NULL) | (kind == KIND_UNCHANGED)).all():
            raise Unsupported("unknown column kind")
    np.minimum(off, limit, out=off)
    return TupleColumns(kinds, starts, lengths), off


def decode_rows(buf: bytes, starts: Array, ends: Array) -> list[RowGroup]:
    """Decode the Insert, Update and Delete messages ``buf[starts[i]:ends[i]]`` (not inside a stream block).

    Returns one :class:`RowGroup` per (tag, relation, old-tuple marker), in the order of their first
    message. Raises :class:`Unsupported` when any message is not a well-formed row change.
    """
    n = int(starts.shape[0])
    if n == 0:
        return []
    arr = np.frombuffer(buf + bytes(_PAD), np.uint8)
    limit = len(buf) + 1  # a value running past the buffer lands in the padding, never on a message end
    if int(ends.max()) > len(buf) or (ends - starts < 6).any():
        raise Unsupported("short message")
    tags = arr[starts]
    relids = _be32(arr, starts + 1)
    markers = arr[starts + 5]
    keys = (tags.astype(np.int64) << 40) | (relids << 8) | markers
    if (keys == keys[0]).all():
        groups = [(int(keys[0]), np.arange(n, dtype=np.int64))]
    else:
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        groups = [(int(uniq[g]), np.flatnonzero(inverse == g)) for g in np.argsort(first)]
    out = []
    for key, index in groups:
        tag, relid, marker = key >> 40, (key >> 8) & 0xFFFFFFFF, key & 0xFF
        off = starts[index] + 6
        end = ends[index]
        old: TupleColumns | None = None
        new: TupleColumns | None = None
        old_kind: str | None = None
        if tag == TAG_INSERT:
            if marker != _N:
                raise Unsupported("insert without a new tuple")
            new, off = _tuple(arr, off, limit)
        elif tag == TAG_UPDATE:
            if marker in (_K, _O):
                old_kind = chr(marker)
                old, off = _tuple(arr, off, limit)
                if not (arr[off] == _N).all():
                    raise Unsupported("update without a new tuple")
                off = off + 1
            elif marker != _N:
                raise Unsupported("bad update marker")
            new, off = _tuple(arr, off, limit)
        elif tag == TAG_DELETE:
            if marker not in (_K, _O):
                raise Unsupported("bad delete marker")
            old_kind = chr(marker)
            old, off = _tuple(arr, off, limit)
        else:
            raise Unsupported("not a row change")
        if not (off == end).all():
            raise Unsupported("message length does not match its tuples")
        out.append(RowGroup(int(tag), int(relid), index, old_kind, old, new))
    return out


def text_array(arr: Array, starts: Array, lengths: Array, valid: Array) -> pa.Array:
    """A ``large_string`` Arrow array of ``arr[starts[i]:starts[i] + lengths[i]]`` where ``valid``, else NULL.

    ``arr`` is the message buffer as a numpy ``uint8`` array (:func:`as_array`). PostgreSQL sends
    valid UTF-8 (the sessions run with ``client_encoding=UTF8``), so the text is not validated again.

    The C extension copies the values out in one pass (``_rowwalk.strings``). Without it, values in
    buffer order (a column of messages in stream order) are cut out by Arrow: the buffer is viewed
    as a string array whose elements alternate between a value and the bytes up to the next one,
    and every other element is taken, a copy per value in C++. Otherwise every byte is gathered by
    index with numpy, at twice the cost for short values.
    """
    n = int(starts.shape[0])
    if _rowwalk is not None:
        offsets, data, validity, nulls = _rowwalk.strings(arr, starts, lengths, valid.view(np.uint8))
        buffers = [None if validity is None else pa.py_buffer(validity), pa.py_buffer(offsets), pa.py_buffer(data)]
        return pa.Array.from_buffers(pa.large_string(), n, buffers, null_count=nulls)
    ends = np.where(valid, starts + lengths, 0)
    before = np.maximum.accumulate(ends) if n else ends  # a NULL sits, empty, where the last value ended
    first, last = np.where(valid, starts, before), np.where(valid, ends, before)
    if n and bool((first[1:] >= last[:-1]).all()):
        bounds = np.empty(2 * n, np.int64)
        bounds[0::2], bounds[1::2] = first, last
        spans = pa.Array.from_buffers(pa.large_string(), 2 * n - 1, [None, pa.py_buffer(bounds), pa.py_buffer(arr)])
        taken = pc.take(spans, pa.array(np.arange(0, 2 * n, 2, dtype=np.int64)))
        return _with_validity(taken, valid)
    return _gathered(arr, starts, lengths, valid)


def _with_validity(strings: pa.Array, valid: Array) -> pa.Array:
    """``strings`` (no NULLs) with NULL where not ``valid``."""
    if bool(valid.all()):
        return strings
    n = len(strings)
    buffers = [pa.py_buffer(np.packbits(valid, bitorder="little")), *strings.buffers()[1:]]
    return pa.Array.from_buffers(pa.large_string(), n, buffers, null_count=n - int(np.count_nonzero(valid)))


def _gathered(arr: Array, starts: Array, lengths: Array, valid: Array) -> pa.Array:
    """:func:`text_array` for values in any order: every byte gathered by index."""
    n = int(starts.shape[0])
    sizes = np.where(valid, lengths, 0)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    index = np.repeat(starts - offsets[:-1], sizes)
    index += np.arange(total, dtype=np.int64)
    strings = pa.Array.from_buffers(pa.large_string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(arr[index])])
    return _with_validity(strings, valid)


def as_array(buf: bytes) -> Array:
    """``buf`` as a numpy ``uint8`` array, without copying it."""
    return np.frombuffer(buf, np.uint8)


def _encode_tuple(t: TupleData) -> bytes:
    parts = [struct.pack(">H", len(t.values))]
    for kind, value in zip(t.kinds, t.values, strict=True):
        parts.append(kind.encode())
        if value is not None:
            parts.append(struct.pack(">I", len(value)))
            parts.append(value)
    return b"".join(parts)


def encode_row(msg: Insert | Update | Delete) -> bytes:
    """The pgoutput bytes of a decoded row change, as sent outside a stream block (no xid)."""
    head = struct.pack(">I", msg.relation_oid)
    if isinstance(msg, Insert):
        return b"I" + head + b"N" + _encode_tuple(msg.new)
    if isinstance(msg, Update):
        old = b"" if msg.old is None else (msg.old_kind or "K").encode() + _encode_tuple(msg.old)
        return b"U" + head + old + b"N" + _encode_tuple(msg.new)
    return b"D" + head + msg.old_kind.encode() + _encode_tuple(msg.old)
