"""Decode PostgreSQL's logical replication protocol ("pgoutput") from bytes, with no I/O at all.

Change-data-capture reads a replication stream whose payloads are pgoutput messages. Keeping the
byte-level decoding in a pure module (bytes in, frozen typed messages out) means it can be tested
exhaustively against bytes captured from a real server, fuzzed by truncation, and benchmarked from
memory, while the code that owns sockets, slots and acknowledgements stays small.

It covers every message PostgreSQL 15 sends with ``proto_version`` 1 and 2: Begin, Commit, Origin,
Relation, Type, Insert, Update, Delete, Truncate, Message and the streaming messages Stream Start,
Stream Stop, Stream Commit and Stream Abort. Inside a stream block (between Stream Start and Stream
Stop) Relation, Type, Insert, Update, Delete, Truncate and Message carry the (sub)transaction id right
after the tag; :class:`Decoder` tracks that state, :func:`decode` takes it as ``in_stream``.

Column values stay raw ``bytes`` (the server's text or binary representation); turning them into
Python values is the job of a module that knows the column types.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from operator import itemgetter
from typing import Final, TypeAlias

from pgbridge.errors import PgbridgeError
from pgbridge.types import LSN

__all__ = [
    "PG_EPOCH",
    "STREAM_TAGS",
    "TRUNCATE_CASCADE",
    "TRUNCATE_RESTART_IDENTITY",
    "Begin",
    "ColumnKind",
    "Commit",
    "DecodeError",
    "Decoder",
    "Delete",
    "Insert",
    "LogicalMessage",
    "Message",
    "Origin",
    "Relation",
    "RelationColumn",
    "ReplicaIdentity",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "TupleData",
    "Type",
    "Update",
    "decode",
    "first_byte",
    "pg_timestamp",
]

# First bytes of the messages that open, close or abort a streamed (protocol v2) transaction block.
STREAM_TAGS: Final = re.compile(rb"[SEcA]")
first_byte = itemgetter(0)  # a message's tag, from its raw payload


class DecodeError(PgbridgeError):
    """A pgoutput message is truncated, malformed, has trailing bytes or an unknown tag."""

    def __init__(self, message: str, *, tag: str | None = None) -> None:
        super().__init__(
            message,
            hint="the replication stream is corrupt or comes from an unsupported protocol version "
            "(pgbridge speaks pgoutput proto_version 1 and 2)",
        )
        self.tag = tag


#: PostgreSQL timestamps count microseconds from this instant.
PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)

#: Truncate option bits.
TRUNCATE_CASCADE: Final = 1
TRUNCATE_RESTART_IDENTITY: Final = 2


class ColumnKind(StrEnum):
    """How one column of a :class:`TupleData` was sent (the characters of ``TupleData.kinds``)."""

    NULL = "n"
    UNCHANGED_TOAST = "u"
    TEXT = "t"
    BINARY = "b"


class ReplicaIdentity(StrEnum):
    """``pg_class.relreplident`` as carried by :class:`Relation`."""

    DEFAULT = "d"
    NOTHING = "n"
    FULL = "f"
    INDEX = "i"


def pg_timestamp(microseconds: int) -> datetime:
    """Convert a PostgreSQL timestamp (int64 microseconds since 2000-01-01 UTC) to an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=microseconds)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TupleData:
    """The columns of one row image, in relation column order.

    ``kinds[i]`` is one of ``'n'`` (null), ``'u'`` (unchanged TOASTed value, not sent), ``'t'`` (text
    representation) or ``'b'`` (binary representation); ``values[i]`` is the raw bytes for ``'t'`` and
    ``'b'`` and ``None`` for ``'n'`` and ``'u'``.
    """

    kinds: str
    values: tuple[bytes | None, ...]

    def __len__(self) -> int:
        return len(self.values)

    def column(self, index: int) -> tuple[str, bytes | None]:
        """``(kind, value)`` of column ``index``."""
        return self.kinds[index], self.values[index]

    def is_null(self, index: int) -> bool:
        return self.kinds[index] == "n"

    def is_unchanged_toast(self, index: int) -> bool:
        return self.kinds[index] == "u"


@dataclass(frozen=True, slots=True)
class Begin:
    """'B': a (non-streamed) transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: LSN
    commit_time: datetime
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    """'C': the transaction opened by the last :class:`Begin` committed."""

    flags: int
    commit_lsn: LSN
    end_lsn: LSN
    commit_time: datetime
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    """'O': the transaction was replayed from replication origin ``name``.

    ``commit_lsn`` is the commit LSN on the origin server (0/0 when sent at a stream start).
    """

    commit_lsn: LSN
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    """One column of a :class:`Relation`; ``flags`` bit 1 marks a replica identity (key) column."""

    flags: int
    name: str
    type_oid: int
    atttypmod: int

    @property
    def is_key(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """'R': the shape of a table; sent before the first change to it in a session (or stream).

    ``namespace`` is empty for ``pg_catalog``. ``replica_identity`` is one of ``'d'``, ``'n'``, ``'f'``
    or ``'i'`` (see :class:`ReplicaIdentity`). ``xid`` is set only inside a stream block.
    """

    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[RelationColumn, ...]

    @property
    def key_columns(self) -> tuple[RelationColumn, ...]:
        return tuple(c for c in self.columns if c.flags & 1)


@dataclass(frozen=True, slots=True)
class Type:
    """'Y': a non-built-in data type used by a following :class:`Relation` (enums, domains, ...)."""

    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    """'I': a row was inserted into ``relation_oid``."""

    xid: int | None
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """'U': a row changed.

    ``old_kind`` is ``'K'`` when ``old`` holds only the old replica identity key (non-key columns
    null), ``'O'`` when it holds the whole old row (REPLICA IDENTITY FULL), ``None`` when no old image
    was sent (the key did not change).
    """

    xid: int | None
    relation_oid: int
    old_kind: str | None
    old: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """'D': a row was deleted; ``old_kind`` is ``'K'`` (key only) or ``'O'`` (full old row)."""

    xid: int | None
    relation_oid: int
    old_kind: str
    old: TupleData


@dataclass(frozen=True, slots=True)
class Truncate:
    """'T': one TRUNCATE statement emptied ``relation_oids``."""

    xid: int | None
    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        return bool(self.options & TRUNCATE_CASCADE)

    @property
    def restart_identity(self) -> bool:
        return bool(self.options & TRUNCATE_RESTART_IDENTITY)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """'M': a message written by ``pg_logical_emit_message``."""

    xid: int | None
    flags: int
    lsn: LSN
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class StreamStart:
    """'S': a block of changes of in-progress transaction ``xid`` follows (protocol v2)."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """'E': the current stream block ended."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    """'c': streamed transaction ``xid`` committed."""

    xid: int
    flags: int
    commit_lsn: LSN
    end_lsn: LSN
    commit_time: datetime
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """'A': streamed ``subxid`` of transaction ``xid`` rolled back (``subxid == xid``: the whole one)."""

    xid: int
    subxid: int

    @property
    def is_subtransaction(self) -> bool:
        return self.subxid != self.xid


Message: TypeAlias = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)

# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_unpack_u32 = _U32.unpack_from
_U64 = struct.Struct(">Q")
_U32_U32 = struct.Struct(">II")
_I16 = struct.Struct(">h")
_BEGIN = struct.Struct(">QqI")  # final lsn, commit time, xid
_COMMIT = struct.Struct(">BQQq")  # flags, commit lsn, end lsn, commit time
_STREAM_COMMIT = struct.Struct(">IBQQq")  # xid, flags, commit lsn, end lsn, commit time
_STREAM_START = struct.Struct(">IB")  # xid, first segment
_REL_COLUMN = struct.Struct(">Ii")  # type oid, atttypmod
_MESSAGE_HEAD = struct.Struct(">BQ")  # flags, lsn
_TRUNCATE_HEAD = struct.Struct(">iB")  # number of relations, options

_TAG_NAMES: Final = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
    ord("S"): "Stream Start",
    ord("E"): "Stream Stop",
    ord("c"): "Stream Commit",
    ord("A"): "Stream Abort",
}

_N: Final = ord("N")
_K: Final = ord("K")
_O: Final = ord("O")


class _Malformed(Exception):
    """Internal: a structural problem found while decoding; turned into DecodeError by decode()."""


def _expect_size(buf: bytes, size: int) -> None:
    if len(buf) != size:
        _expect_end(buf, size)


def _expect_end(buf: bytes, off: int) -> None:
    if off > len(buf):
        raise _Malformed(f"truncated: {off - len(buf)} bytes missing")
    if off < len(buf):
        raise _Malformed(f"{len(buf) - off} trailing bytes after offset {off}")


def _cstring(buf: bytes, off: int) -> tuple[str, int]:
    end = buf.index(0, off)  # ValueError when unterminated
    return buf[off:end].decode("utf-8"), end + 1


# The generated __init__ of a frozen dataclass sets each field through object.__setattr__, which
# costs about a third of the time of decoding a small row. On the hot path (row images and row
# changes) objects are built by writing the slot descriptors directly instead; the result is an
# ordinary, equal, immutable instance.
_object_new = object.__new__


def _slot_setter(cls: type, name: str) -> Callable[[object, object], None]:
    setter: Callable[[object, object], None] = cls.__dict__[name].__set__
    return setter


_set_td_kinds = _slot_setter(TupleData, "kinds")
_set_td_values = _slot_setter(TupleData, "values")
_set_ins_xid = _slot_setter(Insert, "xid")
_set_ins_relid = _slot_setter(Insert, "relation_oid")
_set_ins_new = _slot_setter(Insert, "new")


def _tuple(buf: bytes, off: int) -> tuple[TupleData, int]:
    # Hot path. Column lengths are not checked against the buffer here: a value that runs past the
    # end leaves ``off`` beyond ``len(buf)``, and every caller either reads at ``off`` next
    # (IndexError) or requires ``off == len(buf)``.
    ncols = (buf[off] << 8) | buf[off + 1]
    off += 2
    unpack_len = _unpack_u32
    kinds = ""
    values: list[bytes | None] = []
    add = values.append
    for _ in range(ncols):
        kind = buf[off]
        if kind == 0x74:  # 't'
            start = off + 5
            off = start + unpack_len(buf, off + 1)[0]
            add(buf[start:off])
            kinds += "t"
        elif kind == 0x6E:  # 'n'
            off += 1
            add(None)
            kinds += "n"
        elif kind == 0x75:  # 'u'
            off += 1
            add(None)
            kinds += "u"
        elif kind == 0x62:  # 'b'
            start = off + 5
            off = start + unpack_len(buf, off + 1)[0]
            add(buf[start:off])
            kinds += "b"
        else:
            raise _Malformed(f"unknown tuple column kind {chr(kind)!r} at offset {off}")
    data: TupleData = _object_new(TupleData)
    _set_td_kinds(data, kinds)
    _set_td_values(data, tuple(values))
    return data, off


def _begin(buf: bytes, in_stream: bool) -> Begin:
    _expect_size(buf, 21)
    lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
    return Begin(LSN(lsn), pg_timestamp(ts), ts, xid)


def _commit(buf: bytes, in_stream: bool) -> Commit:
    _expect_size(buf, 26)
    flags, lsn, end, ts = _COMMIT.unpack_from(buf, 1)
    return Commit(flags, LSN(lsn), LSN(end), pg_timestamp(ts), ts)


def _origin(buf: bytes, in_stream: bool) -> Origin:
    (lsn,) = _U64.unpack_from(buf, 1)
    name, off = _cstring(buf, 9)
    _expect_end(buf, off)
    return Origin(LSN(lsn), name)


def _relation(buf: bytes, in_stream: bool) -> Relation:
    if in_stream:
        xid, oid = _U32_U32.unpack_from(buf, 1)
        off = 9
    else:
        xid = None
        (oid,) = _U32.unpack_from(buf, 1)
        off = 5
    namespace, off = _cstring(buf, off)
    name, off = _cstring(buf, off)
    ident = chr(buf[off])
    (ncols,) = _I16.unpack_from(buf, off + 1)
    if ncols < 0:
        raise _Malformed(f"negative column count {ncols}")
    off += 3
    columns: list[RelationColumn] = []
    for _ in range(ncols):
        flags = buf[off]
        colname, off = _cstring(buf, off + 1)
        type_oid, typmod = _REL_COLUMN.unpack_from(buf, off)
        off += 8
        columns.append(RelationColumn(flags, colname, type_oid, typmod))
    _expect_end(buf, off)
    return Relation(xid, oid, namespace, name, ident, tuple(columns))


def _type(buf: bytes, in_stream: bool) -> Type:
    if in_stream:
        xid, oid = _U32_U32.unpack_from(buf, 1)
        off = 9
    else:
        xid = None
        (oid,) = _U32.unpack_from(buf, 1)
        off = 5
    namespace, off = _cstring(buf, off)
    name, off = _cstring(buf, off)
    _expect_end(buf, off)
    return Type(xid, oid, namespace, name)


def _insert(buf: bytes, in_stream: bool) -> Insert:
    if in_stream:
        xid, relid = _U32_U32.unpack_from(buf, 1)
        off = 9
    else:
        xid = None
        (relid,) = _U32.unpack_from(buf, 1)
        off = 5
    if buf[off] != 0x4E:  # 'N'
        raise _Malformed(f"expected 'N' at offset {off}, got {chr(buf[off])!r}")
    new, off = _tuple(buf, off + 1)
    if off != len(buf):
        _expect_end(buf, off)
    msg: Insert = _object_new(Insert)
    _set_ins_xid(msg, xid)
    _set_ins_relid(msg, relid)
    _set_ins_new(msg, new)
    return msg


def _update(buf: bytes, in_stream: bool) -> Update:
    if in_stream:
        xid, relid = _U32_U32.unpack_from(buf, 1)
        off = 9
    else:
        xid = None
        (relid,) = _U32.unpack_from(buf, 1)
        off = 5
    marker = buf[off]
    old: TupleData | None = None
    old_kind: str | None = None
    if marker in (_K, _O):
        old_kind = chr(marker)
        old, off = _tuple(buf, off + 1)
        marker = buf[off]
    if marker != _N:
        raise _Malformed(f"expected 'K', 'O' or 'N' at offset {off}, got {chr(marker)!r}")
    new, off = _tuple(buf, off + 1)
    _expect_end(buf, off)
    return Update(xid, relid, old_kind, old, new)


def _delete(buf: bytes, in_stream: bool) -> Delete:
    if in_stream:
        xid, relid = _U32_U32.unpack_from(buf, 1)
        off = 9
    else:
        xid = None
        (relid,) = _U32.unpack_from(buf, 1)
        off = 5
    marker = buf[off]
    if marker != _K and marker != _O:
        raise _Malformed(f"expected 'K' or 'O' at offset {off}, got {chr(marker)!r}")
    old, off = _tuple(buf, off + 1)
    _expect_end(buf, off)
    return Delete(xid, relid, chr(marker), old)


def _truncate(buf: bytes, in_stream: bool) -> Truncate:
    xid: int | None = None
    off = 1
    if in_stream:
        (xid,) = _U32.unpack_from(buf, 1)
        off = 5
    nrels, options = _TRUNCATE_HEAD.unpack_from(buf, off)
    if nrels < 0:
        raise _Malformed(f"negative relation count {nrels}")
    off += 5
    _expect_size(buf, off + 4 * nrels)
    relids = struct.unpack_from(f">{nrels}I", buf, off)
    return Truncate(xid, options, relids)


def _message(buf: bytes, in_stream: bool) -> LogicalMessage:
    xid: int | None = None
    off = 1
    if in_stream:
        (xid,) = _U32.unpack_from(buf, 1)
        off = 5
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, off)
    prefix, off = _cstring(buf, off + 9)
    (size,) = _U32.unpack_from(buf, off)
    off += 4
    _expect_size(buf, off + size)
    return LogicalMessage(xid, flags, LSN(lsn), prefix, buf[off:])


def _stream_start(buf: bytes, in_stream: bool) -> StreamStart:
    _expect_size(buf, 6)
    xid, first = _STREAM_START.unpack_from(buf, 1)
    return StreamStart(xid, first == 1)


_STREAM_STOP: Final = StreamStop()


def _stream_stop(buf: bytes, in_stream: bool) -> StreamStop:
    _expect_size(buf, 1)
    return _STREAM_STOP


def _stream_commit(buf: bytes, in_stream: bool) -> StreamCommit:
    _expect_size(buf, 30)
    xid, flags, lsn, end, ts = _STREAM_COMMIT.unpack_from(buf, 1)
    return StreamCommit(xid, flags, LSN(lsn), LSN(end), pg_timestamp(ts), ts)


def _stream_abort(buf: bytes, in_stream: bool) -> StreamAbort:
    _expect_size(buf, 9)
    xid, subxid = _U32_U32.unpack_from(buf, 1)
    return StreamAbort(xid, subxid)


_DECODERS: Final[dict[int, Callable[[bytes, bool], Message]]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("S"): _stream_start,
    ord("E"): _stream_stop,
    ord("c"): _stream_commit,
    ord("A"): _stream_abort,
}


# What a decoder function raises on bad input (KeyError: unknown tag; ValueError: unterminated string
# or bad UTF-8; OverflowError: timestamp beyond year 9999). Mapped to DecodeError by _decode_error.
_FAILURES: Final = (_Malformed, struct.error, IndexError, KeyError, ValueError, OverflowError)


def decode(buf: bytes | bytearray | memoryview, *, in_stream: bool = False) -> Message:
    """Decode one pgoutput message (the payload of an XLogData 'w' frame, tag byte first).

    ``in_stream`` must be true between Stream Start and Stream Stop: there, Relation, Type, Insert,
    Update, Delete, Truncate and Message carry a transaction id after the tag. A ``memoryview`` or
    ``bytearray`` is copied to ``bytes`` once. Raises :class:`DecodeError` for an empty, truncated or
    malformed buffer, trailing bytes or an unknown tag.
    """
    if type(buf) is not bytes:
        buf = bytes(buf)
    try:
        return _DECODERS[buf[0]](buf, in_stream)
    except _FAILURES as exc:
        raise _decode_error(buf, in_stream, exc) from exc


def _decode_error(buf: bytes, in_stream: bool, exc: Exception) -> DecodeError:
    if not buf:
        return DecodeError("empty pgoutput message")
    tag = chr(buf[0])
    name = _TAG_NAMES.get(buf[0])
    if name is None:
        return DecodeError(f"unknown pgoutput message tag {tag!r} (0x{buf[0]:02x})", tag=tag)
    if isinstance(exc, _Malformed):
        reason = str(exc)
    elif isinstance(exc, struct.error | IndexError):
        reason = "truncated"
    elif isinstance(exc, UnicodeDecodeError):
        reason = f"a name is not valid UTF-8 ({exc.reason})"
    elif isinstance(exc, OverflowError):
        reason = "timestamp out of range"
    else:
        reason = "truncated (unterminated string)"
    where = " in a stream block" if in_stream else ""
    return DecodeError(f"malformed pgoutput {name} message{where} ({len(buf)} bytes): {reason}", tag=tag)


class Decoder:
    """Stateful wrapper over :func:`decode` that follows stream blocks (protocol v2).

    Feed it every pgoutput message of one replication session in order. It sets ``in_stream`` on
    Stream Start and clears it on Stream Stop, and remembers the streamed transaction in
    ``stream_xid``. A Stream Start inside a stream block, or a Stream Stop outside one, raises
    :class:`DecodeError`.
    """

    __slots__ = ("in_stream", "stream_xid")

    def __init__(self) -> None:
        self.in_stream = False
        self.stream_xid: int | None = None

    def decode(self, buf: bytes | bytearray | memoryview) -> Message:
        if type(buf) is not bytes:
            buf = bytes(buf)
        try:
            fn = _DECODERS[buf[0]]
            msg = fn(buf, self.in_stream)
        except _FAILURES as exc:
            raise _decode_error(buf, self.in_stream, exc) from exc
        if fn is _stream_start or fn is _stream_stop:
            self._follow(msg)
        return msg

    def _follow(self, msg: Message) -> None:
        if isinstance(msg, StreamStart):
            if self.in_stream:
                raise DecodeError(
                    f"Stream Start for xid {msg.xid} inside the stream block of xid {self.stream_xid}",
                    tag="S",
                )
            self.in_stream = True
            self.stream_xid = msg.xid
        elif isinstance(msg, StreamStop):
            if not self.in_stream:
                raise DecodeError("Stream Stop outside a stream block", tag="E")
            self.in_stream = False
            self.stream_xid = None

    def reset(self) -> None:
        """Forget stream state (call when the replication connection restarts)."""
        self.in_stream = False
        self.stream_xid = None
