"""The replication wire protocol against byte fixtures written into a real socket pair.

The test plays the server: it writes what a walsender sends (in pieces of any size, so frames are
split across reads anywhere) and reads what the client sends back.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from pgbridge.cdc import wire
from pgbridge.cdc.wire import ServerError, Target, UnsupportedAuthentication, WireConnection, WireError, status_message
from tests.unit.both_ways import with_and_without_c


@pytest.fixture(autouse=True, params=["compiled", "python"])
def framing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs with the frames split in C (cdc/_rowwalk.c) and in Python, which must agree."""
    with_and_without_c(request, monkeypatch, wire, "_split")


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack(">I", 4 + len(body)) + body


def xlog(start: int, end: int, payload: bytes) -> bytes:
    return msg(b"d", b"w" + struct.pack(">QQq", start, end, 0) + payload)


def keepalive(end: int, reply: bool) -> bytes:
    return msg(b"d", b"k" + struct.pack(">QqB", end, 0, int(reply)))


def error(code: str, text: str) -> bytes:
    return msg(b"E", b"SERROR\0VERROR\0C" + code.encode() + b"\0M" + text.encode() + b"\0\0")


READY = msg(b"Z", b"I")
AUTH_OK = msg(b"R", struct.pack(">I", 0))


@pytest.fixture
def pair() -> Iterator[tuple[WireConnection, socket.socket]]:
    client, server = socket.socketpair()
    server.settimeout(10)
    conn = WireConnection(client, Target("/run/pg", 5432, {"user": "cdc", "database": "shop"}))
    try:
        yield conn, server
    finally:
        conn.close()
        server.close()


def recv_message(server: socket.socket) -> tuple[bytes, bytes]:
    head = recv_exactly(server, 5)
    (length,) = struct.unpack(">I", head[1:])
    return head[:1], recv_exactly(server, length - 4)


def recv_exactly(server: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = server.recv(n - len(data))
        assert part, "client closed"
        data += part
    return data


def started(conn: WireConnection, server: socket.socket, heartbeat: list[int]) -> None:
    """The client sends START_REPLICATION; the server answers CopyBothResponse."""
    server.sendall(msg(b"W", b"\0\0\0"))
    conn.start_copy("START_REPLICATION SLOT s LOGICAL 0/0", 60.0, lambda: heartbeat.append(1))
    kind, body = recv_message(server)
    assert kind == b"Q" and body.startswith(b"START_REPLICATION")


def test_startup_sends_a_replication_startup_packet_and_reads_to_ready(
    pair: tuple[WireConnection, socket.socket],
) -> None:
    conn, server = pair
    server.sendall(AUTH_OK + msg(b"S", b"server_version\x0015.8\0") + msg(b"K", struct.pack(">II", 4242, 7)) + READY)
    conn._startup()
    (length,) = struct.unpack(">I", recv_exactly(server, 4))
    packet = recv_exactly(server, length - 4)
    assert struct.unpack(">I", packet[:4]) == (196608,)
    pairs = packet[4:].rstrip(b"\0").split(b"\0")
    params = dict(zip(pairs[::2], pairs[1::2], strict=True))
    assert params[b"replication"] == b"database" and params[b"user"] == b"cdc" and params[b"database"] == b"shop"
    assert conn.server_pid == 4242


def test_a_password_request_without_a_password_is_refused_clearly(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    server.sendall(msg(b"R", struct.pack(">I", 10) + b"SCRAM-SHA-256\0\0"))
    with pytest.raises(UnsupportedAuthentication, match=r"none was given.*passfile"):
        conn._startup()


@pytest.mark.parametrize(("code", "body"), [(5, b"salt"), (3, b""), (10, b"SCRAM-SHA-256-PLUS\0\0")])
def test_other_credentials_are_refused_clearly(
    pair: tuple[WireConnection, socket.socket], code: int, body: bytes
) -> None:
    conn, server = pair
    conn.target = Target("127.0.0.1", 5432, {"user": "cdc", "database": "shop"}, "secret")
    server.sendall(msg(b"R", struct.pack(">I", code) + body))
    with pytest.raises(UnsupportedAuthentication, match=r"does not give|no SASL mechanism") as info:
        conn._startup()
    assert "secret" not in str(info.value)


def scram_server(server: socket.socket, password: str, *, lie: bool = False) -> Iterator[bytes]:
    """The server's side of SCRAM-SHA-256, computed here from RFC 5802 (not with pgbridge's code).

    Yields what the client sent at each step; a wrong proof is answered as PostgreSQL does
    (ErrorResponse 28P01). With ``lie``, the server signature is wrong.
    """
    recv_exactly(server, struct.unpack(">I", recv_exactly(server, 4))[0] - 4)  # the startup packet
    server.sendall(msg(b"R", struct.pack(">I", 10) + b"SCRAM-SHA-256\0\0"))
    kind, body = recv_message(server)
    mechanism, rest = body.split(b"\0", 1)
    assert kind == b"p" and mechanism == b"SCRAM-SHA-256"
    first = rest[4 : 4 + struct.unpack(">I", rest[:4])[0]]
    yield first
    assert first.startswith(b"n,,")
    first_bare = first[3:].decode()
    nonce = dict(p.split("=", 1) for p in first_bare.split(","))["r"] + "serverpart"
    salt, iterations = b"0123456789abcdef", 4096
    server_first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
    server.sendall(msg(b"R", struct.pack(">I", 11) + server_first.encode()))
    kind, final = recv_message(server)
    yield final
    without_proof, proof_b64 = final.decode().rsplit(",p=", 1)
    assert kind == b"p" and without_proof == f"c=biws,r={nonce}"
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    auth = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(stored_key, auth, "sha256")
    recovered = bytes(a ^ b for a, b in zip(base64.b64decode(proof_b64), signature, strict=True))
    if hashlib.sha256(recovered).digest() != stored_key:
        server.sendall(error("28P01", 'password authentication failed for user "cdc"'))
        return
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    verifier = hmac.digest(server_key, auth + (b"x" if lie else b""), "sha256")
    server.sendall(msg(b"R", struct.pack(">I", 12) + b"v=" + base64.b64encode(verifier)))
    server.sendall(AUTH_OK + msg(b"K", struct.pack(">II", 777, 1)) + READY)


def run_scram(
    pair: tuple[WireConnection, socket.socket], client_password: str, server_password: str, *, lie: bool = False
) -> list[bytes]:
    conn, server = pair
    conn.target = Target("127.0.0.1", 5432, {"user": "cdc", "database": "shop"}, client_password, "scram-sha-256")
    seen: list[bytes] = []
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            seen.extend(scram_server(server, server_password, lie=lie))
        except BaseException as exc:  # reported by the test below
            failed.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        conn._startup()
    finally:
        thread.join(10)
        assert not failed, failed
    return seen


def test_scram_logs_in_and_checks_the_server(pair: tuple[WireConnection, socket.socket]) -> None:
    seen = run_scram(pair, "pässwörd:1", "pässwörd:1")
    assert pair[0].server_pid == 777
    assert all(b"p\xc3\xa4ssw" not in part for part in seen)  # the password itself never crosses


def test_scram_with_a_wrong_password_reports_the_server_error(pair: tuple[WireConnection, socket.socket]) -> None:
    with pytest.raises(ServerError, match="password authentication failed") as info:
        run_scram(pair, "wrong", "right")
    assert info.value.sqlstate == "28P01"


def test_scram_refuses_a_server_that_cannot_prove_the_password(pair: tuple[WireConnection, socket.socket]) -> None:
    with pytest.raises(UnsupportedAuthentication, match=r"SCRAM authentication .* failed.*signature"):
        run_scram(pair, "right", "right", lie=True)


def test_a_server_skipping_scram_is_refused_when_the_dsn_requires_it(
    pair: tuple[WireConnection, socket.socket],
) -> None:
    """Something else on the port (a squatter saying "trust") must not get to feed the stream."""
    conn, server = pair
    conn.target = Target("127.0.0.1", 5432, {"user": "cdc", "database": "shop"}, "secret", "scram-sha-256")
    server.sendall(AUTH_OK + READY)
    with pytest.raises(UnsupportedAuthentication, match="without SCRAM"):
        conn._startup()


@pytest.mark.parametrize("require", ["scram-sha-256", ""])
@pytest.mark.parametrize(
    "answer", [READY, msg(b"S", b"server_version\x0015.8\0") + msg(b"K", struct.pack(">II", 1, 2)) + READY]
)
def test_a_server_skipping_authentication_altogether_is_refused(
    pair: tuple[WireConnection, socket.socket], require: str, answer: bytes
) -> None:
    conn, server = pair
    conn.target = Target("127.0.0.1", 5432, {"user": "cdc", "database": "shop"}, "secret", require)
    server.sendall(answer)
    with pytest.raises(UnsupportedAuthentication, match="did not authenticate"):
        conn._startup()
    assert conn.server_pid == 0


def test_require_auth_none_refuses_a_password_request(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    conn.target = Target("127.0.0.1", 5432, {"user": "cdc", "database": "shop"}, "secret", "none")
    server.sendall(msg(b"R", struct.pack(">I", 10) + b"SCRAM-SHA-256\0\0"))
    with pytest.raises(UnsupportedAuthentication, match="does not give"):
        conn._startup()


def test_a_target_never_shows_its_password() -> None:
    assert "hunter2" not in repr(Target("127.0.0.1", 5432, {"user": "cdc"}, "hunter2"))


def test_a_startup_error_carries_its_sqlstate(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    server.sendall(error("28000", 'no pg_hba.conf entry for replication connection from host "[local]"'))
    with pytest.raises(ServerError, match=r"pg_hba\.conf") as info:
        conn._startup()
    assert info.value.sqlstate == "28000"


def test_query_returns_text_rows_with_nulls_and_raises_after_ready(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    row = struct.pack(">h", 4)
    for value in (b"slot_a", b"0/16B3748", None, b"pgoutput"):
        row += struct.pack(">i", -1) if value is None else struct.pack(">i", len(value)) + value
    server.sendall(msg(b"T", b"\0\4...") + msg(b"D", row) + msg(b"C", b"CREATE_REPLICATION_SLOT\0") + READY)
    assert conn.query("CREATE_REPLICATION_SLOT slot_a LOGICAL pgoutput") == [("slot_a", "0/16B3748", None, "pgoutput")]
    server.sendall(error("42710", 'replication slot "slot_a" already exists') + READY)
    with pytest.raises(ServerError, match="already exists") as info:
        conn.query("CREATE_REPLICATION_SLOT slot_a LOGICAL pgoutput")
    assert info.value.sqlstate == "42710"


def test_a_fatal_error_then_the_end_of_the_connection_reports_the_error(
    pair: tuple[WireConnection, socket.socket],
) -> None:
    conn, server = pair
    fatal = msg(b"E", b"SFATAL\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0\0")
    server.sendall(fatal)
    server.shutdown(socket.SHUT_WR)
    with pytest.raises(ServerError, match="administrator command") as info:
        conn.query("CREATE_REPLICATION_SLOT slot_a LOGICAL pgoutput")
    assert info.value.sqlstate == "57P01"


def test_frames_split_anywhere_come_out_whole_and_in_order(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    beats: list[int] = []
    started(conn, server, beats)
    rng = random.Random(7)
    payloads = [b"I" + rng.randbytes(rng.randrange(0, 300)) for _ in range(3000)]
    payloads.insert(1500, b"I" + rng.randbytes(3 << 20))  # one frame over many reads
    stream = b"".join(xlog(1000 + i, 5000 + i, p) for i, p in enumerate(payloads[:2000]))
    stream += keepalive(9000, reply=True) + msg(b"N", b"SNOTICE\0Mhello\0\0")
    stream += b"".join(xlog(2000 + i, 6000 + i, p) for i, p in enumerate(payloads[2000:]))

    def write() -> None:
        off = 0
        while off < len(stream):
            step = rng.choice((1, 2, 5, 7, 100, 4096, 65536, 1 << 20))
            server.sendall(stream[off : off + step])
            off += step

    writer = threading.Thread(target=write)
    writer.start()
    got: list[bytes] = []
    starts: list[int] = []
    while len(got) < len(payloads):
        got.extend(conn.read(500, 1 << 30, 5.0, starts))
    writer.join()
    assert got == payloads
    assert starts == [1000 + i for i in range(2000)] + [2000 + i for i in range(len(payloads) - 2000)]
    assert conn.last_start == 2000 + len(payloads) - 2001 and conn.wal_end == 9000
    assert beats == [1]  # the keepalive asked for a reply


def test_limits_cut_a_read_and_the_rest_follows(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    started(conn, server, [])
    server.sendall(b"".join(xlog(i + 1, i + 1, b"I" + bytes(99)) for i in range(50)))
    first: list[bytes] = []
    while not first:
        first = conn.read(20, 1 << 30, 2.0)
    assert len(first) <= 20
    rest = list(first)
    while len(rest) < 50:
        chunk = conn.read(1000, 1000, 2.0)  # about ten payloads of 100 bytes
        assert len(chunk) <= 10
        rest.extend(chunk)
    assert len(rest) == 50


def test_an_error_after_data_comes_after_the_data(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    started(conn, server, [])
    server.sendall(xlog(10, 10, b"Bfirst") + error("55000", "replication slot was invalidated"))
    got = conn.read(100, 1 << 30, 5.0)
    while not got:
        got = conn.read(100, 1 << 30, 5.0)
    assert got == [b"Bfirst"]
    with pytest.raises(ServerError, match="invalidated") as info:
        for _ in range(50):
            conn.read(100, 1 << 30, 0.1)
    assert info.value.sqlstate == "55000"


def test_the_server_going_away_is_a_wire_error_once_drained(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    started(conn, server, [])
    server.sendall(xlog(10, 10, b"Ilast"))
    server.shutdown(socket.SHUT_WR)
    got: list[bytes] = []
    with pytest.raises(WireError, match="closed"):
        for _ in range(50):
            got.extend(conn.read(100, 1 << 30, 0.2))
    assert got == [b"Ilast"]


def test_status_message_layout() -> None:
    data = status_message(0x10, 0x20, 0x30, reply=True)
    assert data[:1] == b"d" and struct.unpack(">I", data[1:5]) == (len(data) - 1,)
    kind, write, flush, apply, _clock, reply = struct.unpack(">cQQQqB", data[5:])
    assert (kind, write, flush, apply, reply) == (b"r", 0x10, 0x20, 0x30, 1)


def test_a_consumer_waiting_for_the_stream_gets_a_trickle_soon(pair: tuple[WireConnection, socket.socket]) -> None:
    # Less than a gulp arrives: the waiting consumer takes it after a short wait for more, not
    # after its whole timeout, and the reader wakes the next consumer at the first byte again.
    conn, server = pair
    started(conn, server, [])
    timer = threading.Timer(0.2, server.sendall, (xlog(10, 10, b"Ifirst"),))
    timer.start()
    t0 = time.monotonic()
    got = conn.read(100, 1 << 30, 10.0)
    took = time.monotonic() - t0
    timer.join()
    assert got == [b"Ifirst"] and 0.15 < took < 5.0
    server.sendall(xlog(20, 20, b"Isecond"))  # already there: no wait for more than this
    t0 = time.monotonic()
    assert conn.read(100, 1 << 30, 10.0) == [b"Isecond"]
    assert time.monotonic() - t0 < 5.0


def test_tags_are_the_first_bytes_of_the_payloads(pair: tuple[WireConnection, socket.socket]) -> None:
    conn, server = pair
    started(conn, server, [])
    payloads = [b"B" + bytes(20), b"Iabc", b"U", b"C" + bytes(25)]
    server.sendall(b"".join(xlog(i + 1, i + 1, p) for i, p in enumerate(payloads)))
    got: list[bytes] = []
    tags = bytearray()
    while len(got) < len(payloads):
        got.extend(conn.read(100, 1 << 30, 2.0, tags=tags))
    assert got == payloads and bytes(tags) == b"BIUC"


@pytest.mark.parametrize(
    "frame",
    [
        msg(b"d", b"w" + bytes(24)),  # XLogData without a payload
        msg(b"d", b"w" + bytes(10)),  # XLogData cut inside its header
        msg(b"d", b"k" + bytes(5)),  # a keepalive cut short
        b"d" + struct.pack(">I", 2),  # a length under its own size
    ],
)
def test_a_malformed_frame_is_a_wire_error_after_the_data_before_it(
    pair: tuple[WireConnection, socket.socket], frame: bytes
) -> None:
    conn, server = pair
    started(conn, server, [])
    server.sendall(xlog(10, 10, b"Ifine") + frame[:3])  # the header cut across two reads
    time.sleep(0.05)
    server.sendall(frame[3:] + xlog(11, 11, b"Inever"))
    got: list[bytes] = []
    with pytest.raises(WireError, match="malformed"):
        for _ in range(50):
            got.extend(conn.read(100, 1 << 30, 0.2))
    assert got == [b"Ifine"]


def test_c_and_python_framing_agree_on_random_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random streams of XLogData, keepalives, notices and malformed frames, cut at random limits:
    both splitters return the same payloads, tags, positions, WAL end and error, read for read."""
    compiled = pytest.importorskip("pgbridge.cdc._rowwalk", reason="the C extension was not built (no compiler)").split
    rng = random.Random(11)

    def frame() -> bytes:
        roll = rng.random()
        if roll < 0.8:
            return xlog(rng.randrange(1 << 40), rng.randrange(1 << 40), rng.randbytes(rng.randrange(1, 200)))
        if roll < 0.9:
            return keepalive(rng.randrange(1 << 40), reply=rng.random() < 0.5)
        if roll < 0.97:
            return msg(b"N", b"SNOTICE\0Mhello\0\0")
        return rng.choice([msg(b"d", b"w" + bytes(rng.randrange(25))), msg(b"d", b""), b"d" + struct.pack(">I", 3)])

    def run(split: object, stream: bytes, limits: list[tuple[int, int]]) -> list[object]:
        monkeypatch.setattr(wire, "_split", split)
        conn = WireConnection.__new__(WireConnection)
        WireConnection.__init__(conn, socket.socket(), Target("h", 1, {}))
        beats: list[int] = []
        conn.heartbeat = lambda: beats.append(1)
        conn._buf, conn._ended = stream, WireError("end of the fixture")
        seen: list[object] = []
        try:
            for max_messages, max_bytes in limits:
                positions: list[int] = []
                tags = bytearray()
                try:
                    got = conn.read(max_messages, max_bytes, 0.0, positions, tags)
                except WireError as exc:
                    seen.append(str(exc))
                    break
                seen.append((got, bytes(tags), positions, conn.wal_end, conn.last_start, len(beats)))
        finally:
            conn._sock.close()
        return seen

    for _ in range(300):
        stream = b"".join(frame() for _ in range(rng.randrange(1, 60)))
        limits = [(rng.randrange(1, 30), rng.choice([1, 50, 500, 1 << 30])) for _ in range(80)]
        with_c = run(compiled, stream, limits)
        assert run(None, stream, limits) == with_c
