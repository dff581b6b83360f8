"""The replication connection: slots, the exported snapshot, the pgoutput stream and its feedback.

This is the only module that owns a replication connection (:mod:`pgbridge.cdc.wire`, which speaks
the protocol itself; psycopg 3 has none). Everything around it stays pure or uses ordinary SQL, so
the rules that make CDC exactly-once live here in one small place: the slot is created with an
exported snapshot that the initial load reads under, a reader thread keeps the socket drained (the
walsender, not decoding, is the bottleneck), and an LSN is confirmed to the server only when the
caller says it is durable in the warehouse — or, when nothing is in flight, up to the server's WAL
end so that an idle pipeline never pins WAL. No status message carries more than that.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self, overload

import psycopg

from pgbridge.cdc.pgoutput import (
    STREAM_TAGS,
    Begin,
    Commit,
    Decoder,
    Message,
    StreamAbort,
    StreamCommit,
    StreamStart,
    decode,
)
from pgbridge.cdc.wire import (
    ServerError,
    UnsupportedAuthentication,
    WireConnection,
    WireError,
    sql_connect,
    status_message,
)
from pgbridge.errors import PgbridgeError, TransientError
from pgbridge.secrets.redact import redact_dsn
from pgbridge.types import LSN

__all__ = [
    "Batch",
    "RawChunk",
    "ReplicationStream",
    "SlotExistsError",
    "SlotInfo",
    "SlotMissingError",
    "SlotStatus",
    "SnapshotSlot",
    "SourceError",
    "SourceRejectedError",
    "StreamOptions",
    "create_slot",
    "drop_slot",
    "slot_exists",
    "slot_status",
]

log = logging.getLogger(__name__)

_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")


class SourceError(TransientError):
    """The replication connection failed or was refused for a reason worth retrying (network, restart, busy slot)."""


class SlotMissingError(PgbridgeError):
    """The replication slot does not exist (any more) or was invalidated: the stream cannot resume from it."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            hint="the pipeline must be re-initialised: create a new slot and reload under its snapshot",
        )


class SourceRejectedError(PgbridgeError):
    """The server refused a replication command for a reason retrying won't fix (no such publication, ...)."""


class SlotExistsError(SourceRejectedError):
    """A slot of that name already exists (Patroni recreates a permanent slot it finds missing)."""


# --------------------------------------------------------------------------------------------
# Value objects
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlotInfo:
    """What ``CREATE_REPLICATION_SLOT ... EXPORT_SNAPSHOT`` returned.

    ``consistent_lsn`` is where the slot's stream starts: every transaction committed before it is
    visible under ``snapshot_name``, every one committed after it is in the stream.
    """

    name: str
    consistent_lsn: LSN
    snapshot_name: str | None
    output_plugin: str


@dataclass(frozen=True)
class SlotStatus:
    """One row of ``pg_replication_slots`` plus how much WAL the slot holds back.

    ``wal_status`` is ``reserved``, ``extended``, ``unreserved`` or ``lost`` (``lost``: the slot was
    invalidated and can never be read again). ``retained_bytes`` is the distance from ``restart_lsn``
    to the server's current WAL position.
    """

    name: str
    exists: bool
    plugin: str | None = None
    temporary: bool = False
    active: bool = False
    active_pid: int | None = None
    restart_lsn: LSN | None = None
    confirmed_flush_lsn: LSN | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None
    current_lsn: LSN | None = None
    retained_bytes: int | None = None

    @property
    def lost(self) -> bool:
        return self.wal_status == "lost"


@dataclass(frozen=True)
class StreamOptions:
    """pgoutput options for ``START_REPLICATION``.

    ``streaming`` (in-progress transactions sent in blocks before they commit) needs
    ``proto_version`` 2; ``messages`` includes ``pg_logical_emit_message`` output; ``binary`` asks for
    the binary representation of column values where the type has one.
    """

    publications: tuple[str, ...]
    proto_version: int = 1
    messages: bool = True
    streaming: bool = False
    binary: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.publications, tuple) or not self.publications or not all(self.publications):
            raise ValueError("at least one publication name is required")
        if self.proto_version not in (1, 2):
            raise ValueError(f"pgbridge speaks pgoutput proto_version 1 and 2, not {self.proto_version}")
        if self.streaming and self.proto_version < 2:
            raise ValueError("streaming of in-progress transactions needs proto_version 2")

    def sql(self) -> str:
        """The parenthesised option list of ``START_REPLICATION``."""
        names = ",".join('"' + name.replace('"', '""') + '"' for name in self.publications)
        opts = [
            ("proto_version", str(self.proto_version)),
            ("publication_names", names),
            ("messages", _bool(self.messages)),
        ]
        if self.streaming:
            opts.append(("streaming", "on"))
        if self.binary:
            opts.append(("binary", "true"))
        return "(" + ", ".join(f"{key} {_literal(value)}" for key, value in opts) + ")"


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _check_slot_name(slot: str) -> str:
    if not _SLOT_NAME.match(slot):
        raise ValueError(f"invalid replication slot name {slot!r}: use 1-63 lower-case letters, digits or '_'")
    return slot


def _lsn_sql(lsn: LSN) -> str:
    return f"{lsn.value >> 32:X}/{lsn.value & 0xFFFFFFFF:X}"


# --------------------------------------------------------------------------------------------
# Error translation (the boundary: no psycopg, protocol or socket exception leaves this module)
# --------------------------------------------------------------------------------------------

# SQLSTATE classes and codes that say "try again later": connection exceptions, insufficient
# resources, operator intervention (shutdown, admin kill), object in use (slot active elsewhere),
# system errors.
_TRANSIENT_CLASSES: Final = ("08", "53", "57", "58")
_TRANSIENT_CODES: Final = frozenset({"55006", "40001", "40P01"})


def _translate(exc: BaseException, doing: str) -> PgbridgeError:
    code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
    text = redact_dsn(" ".join(str(exc).split()))
    message = f"{doing}: {text}" if text else doing
    low = text.lower()
    if code == "42704" and "replication slot" in low:
        return SlotMissingError(message)
    if "invalidated" in low or "can no longer get changes from replication slot" in low:
        return SlotMissingError(message)
    if code == "58P01" and "has already been removed" in low:
        # The WAL the slot needs is gone: the slot can never be read again.
        return SlotMissingError(message)
    if code == "42710" and "replication slot" in low:
        return SlotExistsError(message)
    if code is None or code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_CODES:
        return SourceError(message)
    return SourceRejectedError(message)


@contextmanager
def _boundary(doing: str) -> Iterator[None]:
    try:
        yield
    except UnsupportedAuthentication as exc:
        raise SourceRejectedError(f"{doing}: {exc}") from None
    except (psycopg.Error, ServerError, WireError, OSError) as exc:
        raise _translate(exc, doing) from None


# --------------------------------------------------------------------------------------------
# Slots through ordinary SQL (psycopg 3)
# --------------------------------------------------------------------------------------------

_STATUS_SQL: Final = """
SELECT s.slot_name, s.plugin, s.temporary, s.active, s.active_pid,
       s.restart_lsn::text, s.confirmed_flush_lsn::text, s.wal_status, s.safe_wal_size,
       w.lsn::text, (w.lsn - s.restart_lsn)::bigint
FROM pg_replication_slots s,
     (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn) w
WHERE s.slot_name = %s
"""


def _parse_lsn(text: str | None) -> LSN | None:
    return LSN.parse(text) if text else None


def slot_status(conn_dsn: str, slot: str) -> SlotStatus:
    """The slot's row in ``pg_replication_slots`` (``exists=False`` when there is none)."""
    with _boundary(f"cannot read the status of replication slot {slot!r}"), sql_connect(conn_dsn) as conn:
        row = conn.execute(_STATUS_SQL, (slot,)).fetchone()
    if row is None:
        return SlotStatus(name=slot, exists=False)
    return SlotStatus(
        name=row[0],
        exists=True,
        plugin=row[1],
        temporary=bool(row[2]),
        active=bool(row[3]),
        active_pid=row[4],
        restart_lsn=_parse_lsn(row[5]),
        confirmed_flush_lsn=_parse_lsn(row[6]),
        wal_status=row[7],
        safe_wal_size=row[8],
        current_lsn=_parse_lsn(row[9]),
        retained_bytes=row[10],
    )


def slot_exists(conn_dsn: str, slot: str) -> bool:
    with _boundary(f"cannot look up replication slot {slot!r}"), sql_connect(conn_dsn) as conn:
        row = conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,)).fetchone()
    return row is not None


def drop_slot(conn_dsn: str, slot: str, *, terminate_active: bool = False, timeout_s: float = 10.0) -> bool:
    """Drop ``slot``; ``False`` when it did not exist.

    An active slot (a walsender is streaming from it) cannot be dropped: this raises
    :class:`SourceError`, unless ``terminate_active`` is set, which ends that walsender first and
    retries for up to ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    with _boundary(f"cannot drop replication slot {slot!r}"), sql_connect(conn_dsn) as conn:
        while True:
            try:
                cur = conn.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                    (slot,),
                )
                return cur.rowcount > 0
            except psycopg.errors.ObjectInUse:
                if not terminate_active or time.monotonic() > deadline:
                    raise
                conn.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE slot_name = %s AND active_pid IS NOT NULL",
                    (slot,),
                )
                time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# The replication connection (pgbridge.cdc.wire)
# --------------------------------------------------------------------------------------------


def _replication_connect(dsn: str) -> WireConnection:
    with _boundary("cannot open a replication connection"):
        return WireConnection.connect(dsn)


@contextmanager
def _closed_on_error(conn: WireConnection) -> Iterator[None]:
    try:
        yield
    except BaseException:
        conn.close()
        raise


class SnapshotSlot:
    """A new pgoutput slot whose exported snapshot stays valid while this object is open.

    PostgreSQL keeps an exported snapshot alive only until the next command on the connection that
    created the slot, or its close. Inside the ``with`` block other connections can read the tables
    exactly as of the slot's start::

        with SnapshotSlot.create(dsn, "shop_cdc") as s:
            # on another connection:
            #   BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '<s.snapshot_name>'; ...
            ...
        stream = ReplicationStream.start(dsn, "shop_cdc", StreamOptions(("shop",)), start_lsn=s.consistent_lsn)

    If the block raises, a permanent slot is dropped again (``drop_on_error``): its snapshot is gone,
    so a retry needs a new slot, and a forgotten slot would pin WAL forever. A temporary slot lives
    only as long as this connection; stream from it with :meth:`start_stream`, which hands the
    connection over to the returned :class:`ReplicationStream` (and ends the snapshot).
    """

    def __init__(self, dsn: str, conn: WireConnection, info: SlotInfo, *, temporary: bool, drop_on_error: bool) -> None:
        self._dsn = dsn
        self._conn: WireConnection | None = conn
        self.info = info
        self.temporary = temporary
        self.drop_on_error = drop_on_error

    @classmethod
    def create(cls, dsn: str, slot: str, *, temporary: bool = False, drop_on_error: bool = True) -> SnapshotSlot:
        _check_slot_name(slot)
        conn = _replication_connect(dsn)
        kind = "TEMPORARY LOGICAL" if temporary else "LOGICAL"
        with _closed_on_error(conn), _boundary(f"cannot create replication slot {slot!r}"):
            [(name, consistent, snapshot, plugin)] = conn.query(
                f"CREATE_REPLICATION_SLOT {slot} {kind} pgoutput EXPORT_SNAPSHOT"
            )
        assert name is not None and consistent is not None and plugin is not None
        info = SlotInfo(name=name, consistent_lsn=LSN.parse(consistent), snapshot_name=snapshot, output_plugin=plugin)
        log.info("created replication slot %s at %s (snapshot %s)", name, consistent, snapshot)
        return cls(dsn, conn, info, temporary=temporary, drop_on_error=drop_on_error)

    @property
    def slot(self) -> str:
        return self.info.name

    @property
    def consistent_lsn(self) -> LSN:
        return self.info.consistent_lsn

    @property
    def snapshot_name(self) -> str:
        if self._conn is None or self.info.snapshot_name is None:
            raise RuntimeError("the exported snapshot is no longer valid (the slot's connection moved on or closed)")
        return self.info.snapshot_name

    @property
    def closed(self) -> bool:
        return self._conn is None

    def start_stream(self, options: StreamOptions, *, status_interval: float = 10.0) -> ReplicationStream:
        """Stream from the slot's consistent point on this same connection (required for a temporary slot).

        The exported snapshot ends here: import it in every reader before calling this.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("this slot's connection is closed")
        with _closed_on_error(conn):
            return ReplicationStream._start(
                conn, self.info.name, options, start_lsn=self.info.consistent_lsn, status_interval=status_interval
            )

    def close(self) -> None:
        """Release the snapshot (and, for a temporary slot, the slot itself)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        handed_over = self._conn is None
        self.close()
        if exc_type is not None and self.drop_on_error and not self.temporary and not handed_over:
            try:
                drop_slot(self._dsn, self.info.name, terminate_active=True)
            except PgbridgeError as drop_exc:
                log.warning("could not drop replication slot %s after a failure: %s", self.info.name, drop_exc)


def create_slot(dsn: str, slot: str, *, temporary: bool = False, drop_on_error: bool = True) -> SnapshotSlot:
    """Create a pgoutput slot with an exported snapshot; use the result as a context manager.

    See :class:`SnapshotSlot`: the snapshot is valid only inside the ``with`` block.
    """
    return SnapshotSlot.create(dsn, slot, temporary=temporary, drop_on_error=drop_on_error)


# --------------------------------------------------------------------------------------------
# The stream
# --------------------------------------------------------------------------------------------

_BOUNDARIES: Final = frozenset({Begin, Commit, StreamStart, StreamCommit, StreamAbort})


class Batch(Sequence[tuple[LSN, Message]]):
    """What one :meth:`ReplicationStream.read_batch` returned: a sequence of ``(position, message)``.

    The pairs are built on access. A consumer that goes through many messages reads ``messages`` and
    ``positions`` (plain ints) instead: an :class:`LSN` object per row change costs more than a
    tenth of the stream's throughput, and only commit positions matter to a sink.
    """

    __slots__ = ("messages", "positions")

    def __init__(self, messages: list[Message], positions: list[int]) -> None:
        self.messages = messages
        self.positions = positions

    def __len__(self) -> int:
        return len(self.messages)

    @overload
    def __getitem__(self, index: int) -> tuple[LSN, Message]: ...

    @overload
    def __getitem__(self, index: slice) -> Batch: ...

    def __getitem__(self, index: int | slice) -> tuple[LSN, Message] | Batch:
        if isinstance(index, slice):
            return Batch(self.messages[index], self.positions[index])
        return LSN(self.positions[index]), self.messages[index]

    def __iter__(self) -> Iterator[tuple[LSN, Message]]:
        for position, msg in zip(self.positions, self.messages, strict=True):
            yield LSN(position), msg

    def __repr__(self) -> str:
        if not self.messages:
            return "Batch(0 messages)"
        return f"Batch({len(self.messages)} messages, {LSN(self.positions[0])}..{LSN(self.positions[-1])})"


class RawChunk:
    """What one :meth:`ReplicationStream.read_raw` returned: pgoutput payloads, undecoded, in stream order.

    ``tags`` holds the first byte (the message tag) of each payload.
    """

    __slots__ = ("payloads", "tags")

    def __init__(self, payloads: list[bytes], tags: bytes) -> None:
        self.payloads = payloads
        self.tags = tags

    def __len__(self) -> int:
        return len(self.payloads)

    def __repr__(self) -> str:
        return f"RawChunk({len(self.payloads)} messages)"


class ReplicationStream:
    """Decoded pgoutput messages from one slot, with their WAL positions, and the feedback back.

    :meth:`read_batch` returns ``(position, message)`` pairs. ``position`` is the WAL position the
    server attached to the message: a change's own LSN, the first LSN of the transaction for Begin,
    ``end_lsn`` for Commit (Relation and Type messages come with 0/0 and get the position of the
    message before them). Confirm with :meth:`confirm` — only after the warehouse committed, and only
    commit ``end_lsn`` values (or :attr:`server_wal_end` through :meth:`confirm_idle`).

    A reader thread of the connection drains the socket into a bounded inbox (``inbox_bytes``) and
    sends a status message every ``status_interval`` seconds, also while the consumer is busy
    elsewhere, so the walsender neither stalls on a full socket nor times out. Status messages
    carry only what was confirmed: nothing moves the slot on its own.

    One thread reads, decodes and confirms. Create it with :meth:`start` (or
    :meth:`SnapshotSlot.start_stream`).
    """

    def __init__(self, conn: WireConnection, slot: str, options: StreamOptions, status_interval: float) -> None:
        self._conn: WireConnection | None = conn
        self.slot = slot
        self.options = options
        self.status_interval = status_interval
        self._decoder = Decoder()
        self._position = 0  # LSN (int) of the last message handed out
        self._received = 0  # the highest such LSN (transactions come in commit order, not LSN order)
        self._failed: PgbridgeError | None = None  # what ended a read_batch that had messages to return
        self._wal_end = 0  # highest WAL end the server reported
        self._confirmed = 0  # highest LSN confirmed by the caller
        self._committed = 0  # highest commit end_lsn handed out
        self._in_transaction = False
        self._open_streams: set[int] = set()
        self._status_lock = threading.Lock()  # positions read and sent together: never backwards

    @property
    def inbox_bytes(self) -> int:
        """How much the reader thread holds at most before it waits for the consumer."""
        return self._require_conn().inbox_bytes

    @inbox_bytes.setter
    def inbox_bytes(self, value: int) -> None:
        self._require_conn().inbox_bytes = value

    @classmethod
    def start(
        cls,
        dsn: str,
        slot: str,
        options: StreamOptions,
        *,
        start_lsn: LSN | None = None,
        status_interval: float = 10.0,
    ) -> ReplicationStream:
        """Connect and ``START_REPLICATION`` from ``start_lsn`` (``None``: the slot's confirmed position).

        The server never goes back before the slot's ``confirmed_flush_lsn``, whatever ``start_lsn`` says.
        """
        _check_slot_name(slot)
        conn = _replication_connect(dsn)
        with _closed_on_error(conn):
            return cls._start(conn, slot, options, start_lsn=start_lsn, status_interval=status_interval)

    @classmethod
    def _start(
        cls, conn: WireConnection, slot: str, options: StreamOptions, *, start_lsn: LSN | None, status_interval: float
    ) -> ReplicationStream:
        if status_interval <= 0:
            raise ValueError("status_interval must be positive")
        stream = cls(conn, slot, options, status_interval)
        if start_lsn is not None:
            # The caller vouches for everything before start_lsn (the server skips it too), so it may
            # be confirmed before the server reports anything.
            stream._wal_end = start_lsn.value
        lsn = _lsn_sql(start_lsn or LSN(0))
        command = f"START_REPLICATION SLOT {slot} LOGICAL {lsn} {options.sql()}"
        with _boundary(f"cannot start replication from slot {slot!r}"):
            conn.start_copy(command, status_interval, stream._status)
        log.info("streaming from slot %s at %s (pgoutput v%d)", slot, lsn, options.proto_version)
        return stream

    # -- reading ---------------------------------------------------------------------------

    def read_batch(self, max_messages: int = 10_000, max_wait_s: float = 1.0) -> Batch:
        """Up to ``max_messages`` decoded messages with their positions, in stream order.

        Drains what is already received without blocking; when nothing is, waits until more arrives
        or ``max_wait_s`` (counted from the call) has passed. It returns early only when
        ``max_messages`` is reached, so under load batches are full, and a quiet stream returns what
        it has (maybe nothing) after ``max_wait_s``: that is the latency bound. ``max_wait_s=0``
        never blocks.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        deadline = time.monotonic() + max_wait_s
        decode = self._decoder.decode
        boundaries = _BOUNDARIES
        messages: list[Message] = []
        positions: list[int] = []
        position = self._position
        while len(messages) < max_messages:
            starts: list[int] = []
            try:
                payloads = self._read(
                    max_messages - len(messages), 1 << 62, max(0.0, deadline - time.monotonic()), starts
                )
            except PgbridgeError as exc:
                if not messages:
                    raise
                self._failed = exc  # raised by the next read, after these messages
                break
            for payload, start in zip(payloads, starts, strict=True):
                # Relation and Type messages arrive with position 0/0: they belong where the stream is.
                position = start or position
                msg = decode(payload)
                messages.append(msg)
                positions.append(position)
                if type(msg) in boundaries:
                    self._follow(msg)
            if not payloads and time.monotonic() >= deadline:
                break
        self._position = position
        return Batch(messages, positions)

    def _read(
        self,
        max_messages: int,
        max_bytes: int,
        wait: float,
        starts: list[int] | None = None,
        tags: bytearray | None = None,
    ) -> list[bytes]:
        conn = self._require_conn()
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        try:
            with _boundary(f"replication from slot {self.slot!r} failed"):
                return conn.read(max_messages, max_bytes, wait, starts, tags)
        finally:
            self._position = conn.last_start or self._position
            self._received = max(self._received, self._position)
            self._wal_end = max(self._wal_end, conn.wal_end, self._position)

    def read_raw(self, max_messages: int = 20_000, max_wait_s: float = 1.0, max_bytes: int = 64 << 20) -> RawChunk:
        """The pgoutput payloads received by now, undecoded, up to ``max_messages`` or ``max_bytes``.

        Returns as soon as nothing more is received: under load a chunk holds what arrived while the
        caller was busy, and a caller that has nothing to do learns at once that the stream is
        drained. When nothing at all is there, waits until something arrives or ``max_wait_s`` has
        passed (``0``: never blocks). Only Begin and Commit (and the streaming messages) are decoded
        here, to know what is in flight; the caller decodes the rest.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        taken = bytearray()
        payloads = self._read(max_messages, max_bytes, max_wait_s, tags=taken)
        tags = bytes(taken)
        if STREAM_TAGS.search(tags) or self._decoder.in_stream:
            for payload in payloads:  # stream blocks (protocol v2): follow them message by message
                msg = self._decoder.decode(payload)
                if type(msg) in _BOUNDARIES:
                    self._follow(msg)
        else:
            last_begin, last_commit = tags.rfind(b"B"), tags.rfind(b"C")
            if last_commit >= 0:
                self._follow(decode(payloads[last_commit]))
            if last_begin > last_commit:
                self._in_transaction = True
        return RawChunk(payloads, tags)

    def __iter__(self) -> Iterator[tuple[LSN, Message]]:
        """``(position, message)`` pairs one by one, forever (batched underneath); for tests and tools."""
        while True:
            yield from self.read_batch()

    def _follow(self, msg: Message) -> None:
        # What is "in flight": an open transaction, an open streamed transaction, or a commit that was
        # handed out and not confirmed yet.
        if isinstance(msg, Begin):
            self._in_transaction = True
        elif isinstance(msg, Commit):
            self._in_transaction = False
            self._committed = max(self._committed, msg.end_lsn.value)
        elif isinstance(msg, StreamStart):
            self._open_streams.add(msg.xid)
        elif isinstance(msg, StreamCommit):
            self._open_streams.discard(msg.xid)
            self._committed = max(self._committed, msg.end_lsn.value)
        elif isinstance(msg, StreamAbort) and msg.xid == msg.subxid:
            self._open_streams.discard(msg.xid)

    # -- positions and feedback ------------------------------------------------------------

    @property
    def server_wal_end(self) -> LSN:
        """The highest WAL position the server reported (keepalives and data), as of the last read."""
        return LSN(self._wal_end)

    @property
    def buffered(self) -> int:
        """Bytes of the stream received and not read yet: how far the caller is behind the server's sending."""
        return self._conn.buffered if self._conn is not None else 0

    @property
    def confirmed_lsn(self) -> LSN | None:
        """The highest LSN this stream confirmed (``None`` before the first :meth:`confirm`)."""
        return LSN(self._confirmed) if self._confirmed else None

    @property
    def last_position(self) -> LSN:
        """The position of the last message handed out by :meth:`read_batch`."""
        return LSN(self._position)

    @property
    def in_flight(self) -> bool:
        """Whether something handed out is not confirmed yet (an open or an unconfirmed transaction)."""
        return self._in_transaction or bool(self._open_streams) or self._committed > self._confirmed

    def confirm(self, lsn: LSN) -> None:
        """Tell the server everything up to ``lsn`` is durable; the slot may release that WAL.

        Call only after the warehouse committed the transactions ending at or before ``lsn``. Going
        backwards is ignored; going past what the server has sent is a bug and raises ``ValueError``.
        """
        value = lsn.value
        if value <= self._confirmed:
            return
        if value > max(self._wal_end, self._committed):
            raise ValueError(f"cannot confirm {lsn}: the server has only sent up to {self.server_wal_end}")
        self._confirmed = value
        self.send_status()

    def confirm_idle(self) -> LSN | None:
        """Confirm up to :attr:`server_wal_end` when nothing is in flight; returns the LSN confirmed, if any.

        This is how an idle pipeline lets the slot move past WAL that has nothing for it (other
        tables, other databases), so it never pins WAL.
        """
        lsn = self.idle_position()
        if lsn is not None:
            self.confirm(lsn)
        return lsn

    def idle_position(self) -> LSN | None:
        """What :meth:`confirm_idle` would confirm now, if anything (to record it before confirming)."""
        if self.in_flight or self._wal_end <= self._confirmed:
            return None
        return LSN(self._wal_end)

    def send_status(self, *, reply: bool = False) -> None:
        """Send a status message now; with ``reply``, the server answers with a keepalive (its WAL end)."""
        self._require_conn()
        with _boundary(f"cannot send feedback for slot {self.slot!r}"):
            self._status(reply)

    def _status(self, reply: bool = False) -> None:
        """The positions as they are; also the connection's heartbeat, from its reader thread."""
        conn = self._conn
        if conn is None:
            return
        with self._status_lock:
            # write: what was received (for pg_stat_replication); flush and apply: only what was confirmed
            confirmed = self._confirmed
            conn.send(status_message(max(self._received, confirmed), confirmed, confirmed, reply=reply))

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            self._decoder.reset()

    def _require_conn(self) -> WireConnection:
        if self._conn is None:
            raise RuntimeError(f"the replication stream of slot {self.slot!r} is closed")
        return self._conn

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
