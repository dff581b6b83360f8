"""SCRAM-SHA-256's client side against RFC 7677's worked example and RFC 4013's SASLprep examples."""

from __future__ import annotations

import base64
import random
import stringprep

import pytest
from psycopg import pq

from pgbridge.platform.postgres import scram_verifier, verifier_matches
from pgbridge.scram import MAX_ITERATIONS, ScramClient, ScramError, keys, saslprep

# RFC 7677, section 3: user "user", password "pencil".
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
SERVER_FIRST = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_client() -> ScramClient:
    return ScramClient("pencil", user="user", nonce=CLIENT_NONCE)


def test_the_rfc_7677_exchange() -> None:
    client = rfc_client()
    assert client.first() == b"n,,n=user,r=" + CLIENT_NONCE.encode()
    assert client.final(SERVER_FIRST) == CLIENT_FINAL
    client.verify(SERVER_FINAL)


def test_a_wrong_server_signature_is_refused() -> None:
    client = rfc_client()
    client.final(SERVER_FIRST)
    with pytest.raises(ScramError, match="does not know this password"):
        client.verify(b"v=" + b"A" * 43 + b"=")
    with pytest.raises(ScramError, match="refused"):
        client.verify(b"e=invalid-proof")


def test_a_server_final_before_the_proof_is_refused() -> None:
    with pytest.raises(ScramError, match="before the client sent its proof"):
        rfc_client().verify(SERVER_FINAL)


@pytest.mark.parametrize(
    ("server_first", "match"),
    [
        (b"r=someone-elses-nonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
        (b"r=" + CLIENT_NONCE.encode() + b",s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "does not extend"),
        (b"r=" + CLIENT_NONCE.encode() + b"x,s=not base64!,i=4096", "salt or iteration"),
        (b"r=" + CLIENT_NONCE.encode() + b"x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0", "salt or iteration"),
        (
            b"r=" + CLIENT_NONCE.encode() + b"x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=" + str(MAX_ITERATIONS + 1).encode(),
            "iteration",
        ),
        (b"r=" + CLIENT_NONCE.encode() + b"x,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=many", "salt or iteration"),
        (b"garbage", "malformed"),
        (b"e=other-error", "ended the SCRAM exchange"),
    ],
)
def test_a_malformed_server_first_message_is_refused(server_first: bytes, match: str) -> None:
    with pytest.raises(ScramError, match=match):
        rfc_client().final(server_first)


def test_nonces_are_fresh() -> None:
    assert ScramClient("x").first() != ScramClient("x").first()


@pytest.mark.parametrize(
    ("given", "prepared"),
    [
        ("user", b"user"),  # RFC 4013 section 3's examples, then PostgreSQL's fallback
        ("I\u00adX", b"IX"),  # soft hyphen: mapped to nothing
        ("\u00aa", b"a"),  # NFKC
        ("\u2168", b"IX"),  # NFKC
        ("a\u00a0b", b"a b"),  # non-ASCII space: mapped to a space
        ("\u0007", b"\x07"),  # prohibited: PostgreSQL uses the bytes as they are
        ("\u0627\u0031", "\u0627\u0031".encode()),  # breaks the bidirectional rule: as they are
        ("p\u00e4ssw\u00f6rd", "p\u00e4ssw\u00f6rd".encode()),
        # Where PostgreSQL's pg_saslprep differs from a naive reading: a character in both the
        # space and the "mapped to nothing" tables becomes a space; the checks look at the string
        # before NFKC (U+0340 is prohibited, U+2150 unassigned in Unicode 3.2, both vanish or
        # change under NFKC).
        ("a\u200bb", b"a b"),
        ("A\u0340", "A\u0340".encode()),
        ("a\u2150", "a\u2150".encode()),
        ("\u00ad", "\u00ad".encode()),  # nothing left: as it is
    ],
)
def test_saslprep(given: str, prepared: bytes) -> None:
    assert saslprep(given) == prepared


def test_stored_verifiers_hash_the_prepared_password() -> None:
    """What pgbridge stores for a role must be what PostgreSQL checks a login against."""
    assert keys("I\u00adX", b"salt", 4096) == keys("IX", b"salt", 4096)
    verifier = scram_verifier("\u2168", salt=b"0123456789abcdef")
    assert verifier_matches(verifier, "IX") and not verifier_matches(verifier, "\u2168x")


def _differential_cases() -> list[str]:
    """Every character SASLprep maps or refuses in a few tables, a random sample, and mixtures."""
    tables = (stringprep.in_table_b1, stringprep.in_table_c12, stringprep.in_table_c8)
    special = [c for c in range(0x80, 0x3000) if any(t(chr(c)) for t in tables)]
    rng = random.Random(5)
    sample = [c for c in rng.sample(range(0x80, 0x30000), 80) if not 0xD800 <= c <= 0xDFFF]
    cases = [f"a{chr(c)}b" for c in special + sample]
    cases += ["\u00ad", "\u0627\u0628", "\u0627 \u0628", "a\u0627", "\u0627\u0661", "x\u0007\u00e9", "A\u030a"]
    cases += ["\u3000\u3000", "\ufb01\u200d", "\u0627\u0628\u00ad", "a\u2150", "A\u0340", "I\u00adX\u2168"]
    return cases


def test_verifiers_match_libpqs_own_for_what_saslprep_changes_or_refuses() -> None:
    """libpq's PQencryptPasswordConn runs PostgreSQL's own pg_saslprep (the same code the server
    runs): from its salt and iteration count, pgbridge must derive the very same verifier."""
    conn = pq.PGconn.connect_start(b"host=/nonexistent port=1")  # only the object: nothing connects
    try:
        wrong = []
        for password in _differential_cases():
            theirs = conn.encrypt_password(password.encode(), b"u", b"scram-sha-256").decode()
            iterations, salt = theirs.split("$")[1].split(":")
            ours = scram_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations))
            if ours != theirs:
                wrong.append([hex(ord(ch)) for ch in password])
        assert not wrong
    finally:
        conn.finish()
