"""PostgreSQL's frontend/backend protocol, as much as a logical replication connection needs.

pgbridge speaks it itself instead of through psycopg2's replication connection for two reasons:

* **Feedback under the caller's control.** psycopg2 moves the flush position it reports up to the
  server's WAL end on its own, on a keepalive, once everything it handed out was confirmed. A
  pipeline that records that position in the warehouse before confirming it could find its slot
  beyond its record after a restart. Here a status message carries only what the caller confirmed.
* **A drained socket.** A unix socket holds about 280 small messages, under half a millisecond of
  a fast stream (see :meth:`WireConnection._read_loop`; TCP holds far more); the walsender stops
  decoding as soon as it is full. A reader thread keeps ``recv``-ing large blocks (the GIL is
  released while it waits) into a bounded inbox, and the consumer splits frames out of those
  blocks, with no library call and no object per message beyond the payload itself.

Scope: protocol 3.0 without TLS, with ``trust``, ``peer`` or SCRAM-SHA-256 authentication
(``pgbridge.scram``). The connection parameters are resolved by libpq first (an ordinary
psycopg connection: multiple hosts, ``target_session_attrs``, a password file, environment
defaults), and the replication connection goes to the server that connection reached, with the
password libpq used. A deployment's pipeline comes over TCP on the loopback with SCRAM, not over
the local socket, where the stream is about a third slower (docs/cdc.md, "The transport").
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from pgbridge.scram import MECHANISM, ScramClient, ScramError

_split: Callable[..., tuple[int, int, int]] | None
try:
    from pgbridge.cdc._rowwalk import split as _split
except ImportError:  # not built (no C compiler where pgbridge was installed): frames are split here
    _split = None

__all__ = [
    "CONNECT_TIMEOUT_S",
    "ServerError",
    "UnsupportedAuthentication",
    "WireConnection",
    "WireError",
    "status_message",
]

CONNECT_TIMEOUT_S: Final = 10
_PROTOCOL_3_0: Final = 196608
_PG_EPOCH: Final = 946_684_800  # 2000-01-01 00:00:00 UTC, the protocol's timestamp origin
_RECV_BYTES: Final = 1 << 20
GATHER_S: Final = 0.0001  # the reader's pause between the first byte and a gulp (see _read_loop)
WAKE_S: Final = 1.0  # the reader's longest wait for a byte: status messages are due meanwhile
# A consumer that waited for the stream waits a little longer for this much of it (see _take).
GULP_BYTES: Final = 64 << 10
GULP_S: Final = 0.002

_TLS_REQUIRED: Final = frozenset({"require", "verify-ca", "verify-full"})

_HEADER = struct.Struct(">cI")
_LENGTH = struct.Struct(">I")
_STATUS = struct.Struct(">cIcQQQqB")  # CopyData('r' write flush apply clock reply)
_XLOG_HEADER = struct.Struct(">QQ")  # XLogData: data start, WAL end (after the 'w')
_KEEPALIVE = struct.Struct(">QqB")  # Primary keepalive: WAL end, clock, reply requested (after the 'k')

# ErrorResponse field codes (the ones a message is built from)
_SEVERITY, _SQLSTATE, _MESSAGE, _DETAIL, _HINT = "V", "C", "M", "D", "H"


class WireError(Exception):
    """The connection broke or the server said something this module cannot follow."""


class UnsupportedAuthentication(WireError):
    """The server asks for a credential this client cannot give (no password, MD5, GSS, a failed
    SCRAM exchange): retrying will not help."""


class ServerError(Exception):
    """An ErrorResponse: ``sqlstate`` and the server's message (with its detail and hint)."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields
        self.sqlstate = fields.get(_SQLSTATE)
        text = fields.get(_MESSAGE, "the server reported an error")
        for key, label in ((_DETAIL, "DETAIL"), (_HINT, "HINT")):
            if key in fields:
                text += f" {label}: {fields[key]}"
        super().__init__(text)


def _parse_error(body: bytes) -> ServerError:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return ServerError(fields)


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1_000_000))


def status_message(write: int, flush: int, apply: int, *, reply: bool = False) -> bytes:
    """A Standby status update in a CopyData frame (positions as integers)."""
    clock = int((time.time() - _PG_EPOCH) * 1_000_000)
    return _STATUS.pack(b"d", _STATUS.size - 1, b"r", write, flush, apply, clock, int(reply))


@dataclass(frozen=True)
class Target:
    """Where and as whom: what libpq resolved from the DSN."""

    host: str
    port: int
    params: dict[str, str]  # startup parameters (user, database, application_name, options)
    password: str | None = field(default=None, repr=False)  # what libpq used (the DSN, a password file)
    require_auth: str = ""  # the DSN's require_auth, kept here as libpq keeps it (scram-sha-256 or none)

    @classmethod
    def resolve(cls, dsn: str) -> Target:
        with sql_connect(dsn) as conn:
            info = conn.info
            given = info.get_parameters()
            if not info.host.startswith("/") and given.get("sslmode") in _TLS_REQUIRED:
                raise UnsupportedAuthentication(
                    f"the DSN asks for TLS (sslmode={given['sslmode']}), which pgbridge's replication"
                    " connection does not speak; it connects over the local socket or the loopback"
                )
            params = {"user": info.user, "database": info.dbname}
            for key in ("application_name", "options"):
                if given.get(key):
                    params[key] = given[key]
            require = given.get("require_auth", "")
            if require not in ("", "none", MECHANISM.lower()):
                raise UnsupportedAuthentication(
                    f"the DSN asks for require_auth={require}; pgbridge's replication connection logs in"
                    f" with {MECHANISM.lower()} or without a credential (none)"
                )
            return cls(info.hostaddr or info.host, int(info.port), params, info.password or None, require)


def sql_connect(dsn: str) -> psycopg.Connection[Any]:
    """An ordinary connection (autocommit), with pgbridge's connect timeout."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)


class WireConnection:
    """One replication connection (``replication=database``) on a plain socket.

    Before :meth:`start_copy`, it runs simple-protocol commands (:meth:`query`). After it, a reader
    thread fills the inbox and the owner takes payloads with :meth:`read`; :meth:`send` may be
    called from any thread.
    """

    def __init__(self, sock: socket.socket, target: Target) -> None:
        self._sock = sock
        self.target = target
        self._buf = b""  # received and not parsed yet
        self._off = 0  # where parsing goes on in _buf (once the copy runs)
        self._queued: deque[bytes] = deque()  # blocks taken from the inbox, after _buf
        self._queued_size = 0
        self._error: BaseException | None = None  # what the server ended the stream with, to raise next
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._inbox: deque[bytes] = deque()
        self._inbox_size = 0
        self._want = 1  # inbox bytes at which the reader wakes the consumer
        self.inbox_bytes = 32 << 20
        self._ended: BaseException | None = None  # why the reader stopped (EOF, an error)
        self._closing = False
        self._reader: threading.Thread | None = None
        self.last_send = time.monotonic()
        self.server_pid = 0
        self.status_interval = 10.0
        self.heartbeat: Callable[[], None] | None = None  # sends a status message; the reader calls it too
        self.wal_end = 0  # the highest WAL end the server reported, in what was parsed
        self.last_start = 0  # the data start of the last XLogData payload parsed (unless that was 0)

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    def connect(cls, dsn: str) -> WireConnection:
        target = Target.resolve(dsn)
        unix = target.host.startswith("/")
        if unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:  # closes its socket itself when it fails
            sock = socket.create_connection((target.host, target.port), timeout=CONNECT_TIMEOUT_S)
        try:
            if unix:
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.connect(f"{target.host}/.s.PGSQL.{target.port}")
            conn = cls(sock, target)
            conn._startup()
            # Commands wait as long as the server needs: CREATE_REPLICATION_SLOT waits for every
            # transaction running when it starts.
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        return conn

    def _startup(self) -> None:
        params = {**self.target.params, "replication": "database", "client_encoding": "UTF8"}
        body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
        self._sock.sendall(struct.pack(">II", 8 + len(body), _PROTOCOL_3_0) + body)
        scram_done = authenticated = False
        while True:
            kind, payload = self._next_message()
            if kind == b"E":
                raise _parse_error(payload)
            if not authenticated:
                # As libpq: until AuthenticationOk only authentication requests (and a protocol
                # version answer) may come; a server skipping ahead has not authenticated anyone.
                if kind == b"v":
                    continue
                if kind != b"R":
                    raise UnsupportedAuthentication(
                        f"the server at {self.where} did not authenticate the replication connection"
                        f" (message {kind!r} before AuthenticationOk)"
                    )
                (code,) = _LENGTH.unpack_from(payload)
                if code == 10 and self.target.require_auth != "none":  # AuthenticationSASL: its mechanisms
                    self._sasl(payload[4:].split(b"\0"))
                    scram_done = True
                elif code == 0:
                    # As libpq with require_auth: a server that lets the client in without the
                    # exchange has not shown it knows the password (something else may hold the port).
                    if self.target.require_auth == MECHANISM.lower() and not scram_done:
                        raise UnsupportedAuthentication(
                            f"the server at {self.where} let the replication connection in without SCRAM"
                            f" authentication, which the DSN requires (require_auth={self.target.require_auth})"
                        )
                    authenticated = True
                else:
                    raise UnsupportedAuthentication(
                        f"the server at {self.where} asks for a credential pgbridge's replication connection"
                        f" does not give (authentication request {code}); it logs in by OS identity (peer)"
                        " over the local socket, or with SCRAM-SHA-256"
                    )
            elif kind == b"K":
                (self.server_pid,) = _LENGTH.unpack_from(payload)
            elif kind == b"Z":
                return
            # ParameterStatus, NoticeResponse: nothing to do

    def _sasl(self, mechanisms: list[bytes]) -> None:
        """The SCRAM-SHA-256 exchange, up to (not including) AuthenticationOk."""
        if MECHANISM.encode() not in mechanisms:
            offered = ", ".join(m.decode("utf-8", "replace") for m in mechanisms if m) or "none"
            raise UnsupportedAuthentication(
                f"the server at {self.where} offers no SASL mechanism pgbridge speaks ({offered})"
            )
        if not self.target.password:
            raise UnsupportedAuthentication(
                f"the server at {self.where} asks for a password and none was given: put the role's password"
                " in a password file (the DSN's passfile) or connect over the local socket"
            )
        scram = ScramClient(self.target.password)
        first = scram.first()
        self._send_message(b"p", MECHANISM.encode() + b"\0" + _LENGTH.pack(len(first)) + first)
        try:
            self._send_message(b"p", scram.final(self._auth_step(11)))
            scram.verify(self._auth_step(12))
        except ScramError as exc:
            raise UnsupportedAuthentication(
                f"SCRAM authentication with the server at {self.where} failed: {exc}"
            ) from None

    def _auth_step(self, want: int) -> bytes:
        """The data of the next authentication request, which must be ``want`` (SASLContinue, SASLFinal)."""
        kind, payload = self._next_message()
        if kind == b"E":
            raise _parse_error(payload)
        if kind != b"R" or _LENGTH.unpack_from(payload)[0] != want:
            raise WireError(f"the server at {self.where} broke off the SCRAM exchange (message {kind!r})")
        return payload[4:]

    def _send_message(self, kind: bytes, body: bytes) -> None:
        self.send(kind + _LENGTH.pack(4 + len(body)) + body)

    @property
    def where(self) -> str:
        return f"{self.target.host}:{self.target.port}"

    # -- before the copy: whole messages, in this thread -----------------------------------------

    def _next_message(self) -> tuple[bytes, bytes]:
        while True:
            if len(self._buf) >= 5:
                kind, length = _HEADER.unpack_from(self._buf)
                end = 1 + length
                if len(self._buf) >= end:
                    payload, self._buf = self._buf[5:end], self._buf[end:]
                    return kind, payload
            data = self._sock.recv(_RECV_BYTES)
            if not data:
                raise WireError(f"the server at {self.where} closed the connection")
            self._buf += data

    def _command(self, sql: str, until: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Send a simple query; its answer's messages up to ``until`` (ReadyForQuery, CopyBothResponse).

        An ErrorResponse is raised once the server is ready again, or when it closes the connection
        after it (a FATAL error): the server's message, not the lost connection, is what tells.
        """
        self._send_message(b"Q", sql.encode() + b"\0")
        error: ServerError | None = None
        while True:
            try:
                kind, payload = self._next_message()
            except WireError:
                if error is not None:
                    raise error from None
                raise
            if kind == b"E":
                error = _parse_error(payload)
            elif kind == b"Z" and error is not None:
                raise error
            elif kind == until:
                return
            else:
                yield kind, payload

    def query(self, sql: str) -> list[tuple[str | None, ...]]:
        """Run one simple-protocol command; its rows as text. Raises :class:`ServerError` on an error."""
        return [_data_row(payload) for kind, payload in self._command(sql, b"Z") if kind == b"D"]

    def start_copy(self, sql: str, status_interval: float, heartbeat: Callable[[], None]) -> None:
        """Send a command that answers with CopyBothResponse (``START_REPLICATION``), start the reader.

        ``heartbeat`` sends a status message; it is called when the server asks for one and, from the
        reader thread, whenever none went out for ``status_interval`` seconds.
        """
        self.status_interval, self.heartbeat = status_interval, heartbeat
        for _ in self._command(sql, b"W"):
            pass
        # Frames that came with the response stay in _buf, parsed first.
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(CONNECT_TIMEOUT_S))
        self._reader = threading.Thread(target=self._read_loop, name="pgbridge-replication-reader", daemon=True)
        self._reader.start()

    # -- the copy: the reader thread ------------------------------------------------------------

    def _read_loop(self) -> None:
        """Receive in gulps: wait for the first byte, let more come for GATHER_S, then drain.

        The walsender writes each message on its own (about 100 bytes, a socket buffer each), so a
        reader blocked in ``recv`` is woken for every one of them: a few hundred thousand wake-ups a
        second, a third of a core. Waiting GATHER_S first takes what arrived meanwhile in one call.
        The wait must end well before the socket is full, and it fills sooner than its size says:
        each buffer is charged about 770 bytes against the walsender's 208 kB send buffer, so the
        socket holds about 280 messages of 140 bytes, 0.45 ms of a walsender decoding 600k changes a
        second. With 0.5 ms the walsender stalled on the full socket and reading alone ran at 0.68
        of ``pg_recvlogical`` on such a host; with 0.1 ms, 0.94 (``bench/source_read.py`` (d)).
        Over TCP the socket holds megabytes, but longer gathers were no better there either: 0.5
        and 1 ms gave 0.86 and 0.82 end to end against 0.88 with 0.1 ms (``bench/cdc_transport.py``).
        """
        sock, cond = self._sock, self._cond
        fd = sock.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLIN)
        area = bytearray(_RECV_BYTES)
        view = memoryview(area)
        try:
            while True:
                full = True
                while full:
                    with cond:
                        if self._closing:
                            return
                        full = self._inbox_size >= self.inbox_bytes
                        if full:
                            cond.wait(min(0.5, self.status_interval))
                    if full:
                        self._beat()  # outside the lock: a send may take its time
                if not poll.poll(WAKE_S * 1000):
                    self._beat()
                    continue
                time.sleep(GATHER_S)
                blocks = []
                size = 0
                closed = False
                while size < _RECV_BYTES:
                    try:
                        n = sock.recv_into(area, _RECV_BYTES, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    if not n:
                        closed = True
                        break
                    blocks.append(view[:n].tobytes())
                    size += n
                if blocks:
                    with cond:  # what came before an end of the stream is passed on before the end
                        self._inbox.extend(blocks)
                        self._inbox_size += size
                        if self._inbox_size >= self._want or closed:
                            cond.notify_all()
                if closed:
                    raise WireError(f"the server at {self.where} closed the replication connection")
                self._beat()
        except BaseException as exc:
            with cond:
                self._ended = exc if not self._closing else WireError("the replication connection is closed")
                cond.notify_all()

    def _beat(self) -> None:
        """A status message when none went out for ``status_interval`` (also while the consumer is away)."""
        if self.heartbeat is not None and time.monotonic() - self.last_send >= self.status_interval:
            self.heartbeat()

    def _take(self, timeout: float) -> bool:
        """Queue the reader's blocks behind what is left to parse; ``False`` when none came in ``timeout``.

        Having waited, waits up to GULP_S more (within ``timeout``) for GULP_BYTES of the stream.

        Raises what stopped the reader once everything it received was taken.
        """
        with self._cond:
            if not self._inbox and timeout > 0 and self._ended is None:
                deadline = time.monotonic() + timeout
                self._cond.wait(timeout)
                if self._inbox and self._inbox_size < GULP_BYTES and self._ended is None:
                    # The stream trickles in as the reader gathers it, a fraction of a millisecond
                    # at a time: waiting a little for more saves the caller a cycle per gulp.
                    self._want = GULP_BYTES
                    try:
                        self._cond.wait(max(0.0, min(GULP_S, deadline - time.monotonic())))
                    finally:
                        self._want = 1
            if not self._inbox:
                if self._ended is not None:
                    raise self._ended
                return False
            self._queued.extend(self._inbox)
            self._queued_size += self._inbox_size
            self._inbox.clear()
            self._inbox_size = 0
            self._cond.notify_all()
        return True

    def _advance(self) -> bool:
        """Continue parsing with queued blocks: joins only what completes the next frame.

        ``False`` when the queue does not hold the rest of that frame yet. A block is copied about
        once, and a frame larger than many blocks is joined once, when all of it is there.
        """
        rest = self._buf[self._off :]
        head = rest[:5]
        for block in self._queued:
            if len(head) >= 5:
                break
            head += block[: 5 - len(head)]
        if len(head) < 5:
            if not self._queued:
                return False
            need = len(rest) + self._queued_size  # less than a header in all: take all of it
        else:
            # At least the header: a length under 4 (malformed, reported by read) ends inside it.
            need = max(5, 1 + _LENGTH.unpack_from(head, 1)[0])
            if len(rest) + self._queued_size < need:
                return False
        parts, have = ([rest] if rest else []), len(rest)
        while have < need:
            block = self._queued.popleft()
            self._queued_size -= len(block)
            parts.append(block)
            have += len(block)
        self._buf, self._off = (parts[0] if len(parts) == 1 else b"".join(parts)), 0
        return True

    def read(
        self,
        max_messages: int,
        max_bytes: int,
        timeout: float,
        positions: list[int] | None = None,
        tags: bytearray | None = None,
    ) -> list[bytes]:
        """The pgoutput payloads of the XLogData frames received, in order, up to the limits.

        Returns as soon as nothing more is buffered; when nothing is, waits up to ``timeout`` for
        the reader. Keepalives update :attr:`wal_end` (and get an answer at once when the server
        asks for one); :attr:`last_start` is the data start of the last payload (unless that was 0). With
        ``positions``, each payload's data start is appended to it (0 for Relation and Type); with
        ``tags``, its first byte (the message tag).
        Raises :class:`ServerError` or :class:`WireError` once the payloads before it were returned.

        The XLogData frames, nearly all of the stream, are split out in C (``_rowwalk.split``) where
        the extension was built: a quarter of a microsecond per message in Python, on the thread that
        also decodes and stages them. Every other frame is handled here, one at a time.
        """
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        out: list[bytes] = []
        add = out.append
        size = 0
        deadline = time.monotonic() + timeout
        length_at = _LENGTH.unpack_from
        taken = bytearray() if tags is None else tags
        while True:
            buf, off = self._buf, self._off
            n = len(buf)
            last_w = -1
            while off + 5 <= n:
                if _split is not None:
                    off, size, last = _split(buf, off, size, max_messages, max_bytes, out, taken, positions)
                    last_w = max(last_w, last)
                    if off + 5 > n or len(out) >= max_messages or size >= max_bytes:
                        break
                (length,) = length_at(buf, off + 1)
                end = off + 1 + length
                if end > n:
                    break
                kind = buf[off]
                copy = buf[off + 5] if kind == 100 and length >= 5 else 0  # a CopyData's own kind
                if copy == 119 and length >= 30:  # XLogData (with a payload)
                    add(buf[off + 30 : end])
                    taken.append(buf[off + 30])
                    size += end - off - 30
                    last_w = off
                    if positions is not None:
                        positions.append(_XLOG_HEADER.unpack_from(buf, off + 6)[0])
                elif copy == 107 and length >= 22:  # keepalive
                    wal_end, _clock, reply = _KEEPALIVE.unpack_from(buf, off + 6)
                    self.wal_end = max(self.wal_end, wal_end)
                    if reply and self.heartbeat is not None:
                        self.heartbeat()
                elif length < 4 or copy in (119, 107):
                    self._error = WireError(
                        f"the server at {self.where} sent a malformed message ({chr(kind)!r}, length {length})"
                    )
                    break
                elif kind == 69:  # ErrorResponse
                    self._error = _parse_error(buf[off + 5 : end])
                elif kind == 99:  # CopyDone: the server ends the stream (a shutdown)
                    self._error = WireError(f"the server at {self.where} ended the replication stream")
                off = end  # NoticeResponse, ParameterStatus, ...: nothing to do
                if self._error is not None or len(out) >= max_messages or size >= max_bytes:
                    break
            self._off = off
            if last_w >= 0:
                start, wal_end = _XLOG_HEADER.unpack_from(buf, last_w + 6)
                self.last_start = start or self.last_start
                self.wal_end = max(self.wal_end, wal_end)
            if self._error is not None and not out:
                error, self._error = self._error, None
                raise error
            if self._error is not None or len(out) >= max_messages or size >= max_bytes:
                return out
            if self._advance():
                continue
            try:
                if not self._take(0.0 if out else max(deadline - time.monotonic(), 0.0)):
                    return out
            except Exception as exc:  # the reader's end: after what came before it
                if not out:
                    raise
                self._error = exc
                return out

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet (read without the lock: an estimate)."""
        return self._inbox_size + self._queued_size + len(self._buf) - self._off

    # -- sending (any thread) ---------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        with self._send_lock:
            self._sock.sendall(data)
            self.last_send = time.monotonic()

    def close(self) -> None:
        """Terminate the session and the reader; never raises."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._send_lock.acquire(timeout=1.0):  # Terminate, if the socket takes it at once
            try:
                with contextlib.suppress(OSError):
                    self._sock.send(b"X" + _LENGTH.pack(4), socket.MSG_DONTWAIT)
            finally:
                self._send_lock.release()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=5)
        self._sock.close()


def _data_row(payload: bytes) -> tuple[str | None, ...]:
    (count,) = struct.unpack_from(">h", payload)
    off, values = 2, list[str | None]()
    for _ in range(count):
        (length,) = struct.unpack_from(">i", payload, off)
        off += 4
        if length < 0:
            values.append(None)
        else:
            values.append(payload[off : off + length].decode())
            off += length
    return tuple(values)
