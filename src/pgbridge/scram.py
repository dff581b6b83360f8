"""SCRAM-SHA-256 (RFC 5802, RFC 7677) as PostgreSQL uses it: the client's side, and the keys.

Why this exists: the pipeline's replication connection (``pgbridge.cdc.wire``) speaks the
protocol itself, and it reaches the server over TCP on the loopback, where PostgreSQL asks for
a password (the local socket's OS identity is not available there). Sans-I/O: messages in,
messages out; ``wire`` frames and sends them. The same keys make the verifiers pgbridge stores
for its roles (``platform.postgres.scram_verifier``), so the clear text never reaches the server.

Channel binding (``SCRAM-SHA-256-PLUS``) needs TLS, which this connection does not use: the
client says so (``n,,``), and the server accepts that only when the connection has no TLS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MAX_ITERATIONS", "MECHANISM", "Keys", "ScramClient", "ScramError", "keys", "saslprep"]

MECHANISM: Final = "SCRAM-SHA-256"
# PostgreSQL's default is 4096 (scram_iterations); a server asking for more than this is refused
# rather than let it keep a CPU busy for minutes.
MAX_ITERATIONS: Final = 1 << 22
_GS2_HEADER: Final = "n,,"  # no channel binding, no authorization identity
_NONCE_BYTES: Final = 18


class ScramError(Exception):
    """The server's SCRAM messages are malformed or do not prove it knows the password."""


def saslprep(password: str) -> bytes:
    """The password as PostgreSQL hashes it: SASLprep (RFC 4013), or its UTF-8 bytes as they are.

    Follows PostgreSQL's ``pg_saslprep`` (src/common/saslprep.c) step by step, since a client must
    hash exactly what the server hashed: non-ASCII spaces become a space, and only the characters
    left are dropped if "commonly mapped to nothing"; the prohibited, unassigned and bidirectional
    checks look at that mapped string, before NFKC. Where a check fails (or nothing is left),
    PostgreSQL uses the raw bytes, both when it stores a password and when it checks one.
    """
    raw = password.encode()
    if password.isascii():
        return raw  # SASLprep of ASCII (controls included, which then fail) changes nothing
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch
        for ch in password
        if stringprep.in_table_c12(ch) or not stringprep.in_table_b1(ch)
    )
    if not mapped:
        return raw
    prohibited = (
        stringprep.in_table_a1,
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if any(test(ch) for ch in mapped for test in prohibited):
        return raw
    if any(stringprep.in_table_d1(ch) for ch in mapped) and (
        any(stringprep.in_table_d2(ch) for ch in mapped)
        or not (stringprep.in_table_d1(mapped[0]) and stringprep.in_table_d1(mapped[-1]))
    ):
        return raw
    return unicodedata.normalize("NFKC", mapped).encode()


@dataclass(frozen=True)
class Keys:
    """What a password, a salt and an iteration count derive (RFC 5802, section 3)."""

    salted: bytes = field(repr=False)
    client: bytes = field(repr=False)
    stored: bytes
    server: bytes


def keys(password: str, salt: bytes, iterations: int) -> Keys:
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client = _hmac(salted, b"Client Key")
    return Keys(salted, client, hashlib.sha256(client).digest(), _hmac(salted, b"Server Key"))


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def _attributes(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ScramError(f"malformed SCRAM message from the server: {message[:80]!r}")
        out.setdefault(part[0], part[2:])
    return out


class ScramClient:
    """One exchange: :meth:`first` → (server-first) → :meth:`final` → (server-final) → :meth:`verify`.

    The user name is empty by default: PostgreSQL takes it from the startup packet and ignores the
    one in the exchange.
    """

    def __init__(self, password: str, *, user: str = "", nonce: str | None = None) -> None:
        self._password = password
        self._nonce = nonce if nonce is not None else base64.b64encode(secrets.token_bytes(_NONCE_BYTES)).decode()
        user = user.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={user},r={self._nonce}"
        self._server_signature: bytes | None = None

    def first(self) -> bytes:
        """The client-first message."""
        return (_GS2_HEADER + self._first_bare).encode()

    def final(self, server_first: bytes) -> bytes:
        """The client-final message (with the proof), from the server-first message."""
        text = server_first.decode("utf-8", "replace")
        attrs = _attributes(text)
        if "e" in attrs:
            raise ScramError(f"the server ended the SCRAM exchange: {attrs['e']}")
        nonce, salt_b64, count = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ScramError("the server's SCRAM nonce does not extend the client's")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            iterations = int(count)
        except ValueError:
            raise ScramError(f"malformed SCRAM salt or iteration count from the server: {text[:80]!r}") from None
        if not salt or not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError(f"unusable SCRAM salt or iteration count from the server: {text[:80]!r}")
        k = keys(self._password, salt, iterations)
        without_proof = f"c={base64.b64encode(_GS2_HEADER.encode()).decode()},r={nonce}"
        auth_message = f"{self._first_bare},{text},{without_proof}".encode()
        signature = _hmac(k.stored, auth_message)
        proof = bytes(a ^ b for a, b in zip(k.client, signature, strict=True))
        self._server_signature = _hmac(k.server, auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        """Check the server-final message: the server proves it holds the password's verifier."""
        attrs = _attributes(server_final.decode("utf-8", "replace"))
        if "e" in attrs:
            raise ScramError(f"the server refused the SCRAM proof: {attrs['e']}")
        if self._server_signature is None:
            raise ScramError("the server finished the SCRAM exchange before the client sent its proof")
        try:
            given = base64.b64decode(attrs.get("v", ""), validate=True)
        except ValueError:
            given = b""
        if not hmac.compare_digest(given, self._server_signature):
            raise ScramError("the server's SCRAM signature is wrong: it does not know this password")
