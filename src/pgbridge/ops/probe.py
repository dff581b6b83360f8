"""A raw PostgreSQL start-up probe from a chosen source address.

libpq cannot bind a source address, yet `check` must prove that a client outside the allowed
CIDRs is refused. On Linux every 127.0.0.0/8 address is local, so we connect from e.g. 127.0.0.2,
negotiate TLS, send a StartupMessage and read the server's verdict.
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path

SSL_REQUEST = struct.pack("!II", 8, 80877103)


@dataclass(frozen=True)
class ProbeResult:
    accepted: bool  # the server asked for authentication (the address passed pg_hba)
    code: str  # SQLSTATE of the refusal, or "" when accepted
    message: str


def _read_message(sock: socket.socket | ssl.SSLSocket) -> tuple[bytes, bytes]:
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise ConnectionError("server closed the connection")
        head += chunk
    tag, length = head[:1], struct.unpack("!I", head[1:])[0]
    body = b""
    while len(body) < length - 4:
        chunk = sock.recv(length - 4 - len(body))
        if not chunk:
            raise ConnectionError("server closed the connection")
        body += chunk
    return tag, body


def _error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


def startup_probe(
    *, source: str, host: str, port: int, user: str, database: str, cafile: Path, timeout: float = 5
) -> ProbeResult:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.settimeout(timeout)
    try:
        raw.bind((source, 0))
        raw.connect((host, port))
        raw.sendall(SSL_REQUEST)
        answer = raw.recv(1)
        sock: socket.socket | ssl.SSLSocket = raw
        if answer == b"S":
            ctx = ssl.create_default_context(cafile=str(cafile))
            ctx.check_hostname = False  # the address, not the name, is what is being tested
            sock = ctx.wrap_socket(raw)
        params = b"user\0" + user.encode() + b"\0database\0" + database.encode() + b"\0\0"
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)
        tag, body = _read_message(sock)
        if tag == b"R":
            return ProbeResult(True, "", "server asked for authentication")
        if tag == b"E":
            f = _error_fields(body)
            return ProbeResult(False, f.get("C", ""), f.get("M", ""))
        return ProbeResult(False, "", f"unexpected message {tag!r}")
    finally:
        raw.close()
