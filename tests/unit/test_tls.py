"""Tests for the deployment CA and the server/client certificates, including real TLS handshakes."""

from __future__ import annotations

import datetime as dt
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgbridge.errors import NotFoundError, PgbridgeError
from pgbridge.platform.tls import cert_info, ensure_ca, ensure_client_cert, ensure_server_cert

SERVER_IPS = ["127.0.0.1", "::1", "10.1.2.3"]
SERVER_NAMES = ["db1.example.internal", "localhost"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _server(tls: Path, **overrides: object) -> str:
    kwargs: dict[str, object] = {
        "common_name": "db1.example.internal",
        "dns_names": SERVER_NAMES,
        "ip_addresses": SERVER_IPS,
    }
    kwargs.update(overrides)
    return ensure_server_cert(tls, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def tls(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    assert ensure_ca(d, "pgbridge test CA") == "created"
    return d


# ------------------------------------------------------------------------------------------------ CA


def test_ca_created_once_then_unchanged(tls: Path) -> None:
    crt = (tls / "ca.crt").read_bytes()
    key = (tls / "ca.key").read_bytes()
    assert _mode(tls / "ca.key") == 0o600
    assert ensure_ca(tls, "pgbridge test CA") == "unchanged"
    assert ensure_ca(tls, "another name") == "unchanged"
    assert (tls / "ca.crt").read_bytes() == crt
    assert (tls / "ca.key").read_bytes() == key


def test_ca_certificate_properties(tls: Path) -> None:
    cert = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3651)
    info = cert_info(tls / "ca.crt")
    assert info.subject_cn == info.issuer_cn == "pgbridge test CA"
    assert len(info.fingerprint_sha256) == 64


def test_ca_key_mismatch_is_reported(tls: Path) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    (tls / "ca.key").write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(PgbridgeError, match="do not belong together") as exc:
        ensure_ca(tls, "pgbridge test CA")
    assert exc.value.hint and "backup" in exc.value.hint
    with pytest.raises(PgbridgeError, match="do not belong together"):
        _server(tls)


def test_half_ca_is_reported(tls: Path) -> None:
    (tls / "ca.crt").unlink()
    with pytest.raises(PgbridgeError, match=r"ca\.crt is missing"):
        ensure_ca(tls, "pgbridge test CA")


def test_server_cert_needs_ca(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        _server(tmp_path)


# -------------------------------------------------------------------------------------- server cert


def test_server_cert_contents(tls: Path) -> None:
    assert _server(tls) == "created"
    assert _mode(tls / "server.key") == 0o600
    info = cert_info(tls / "server.crt")
    assert info.subject_cn == "db1.example.internal"
    assert info.issuer_cn == "pgbridge test CA"
    assert set(info.dns_names) == set(SERVER_NAMES)
    assert set(info.ip_addresses) == set(SERVER_IPS)
    assert dt.timedelta(days=824) < info.not_after - info.not_before < dt.timedelta(days=826)
    cert = x509.load_pem_x509_certificate((tls / "server.crt").read_bytes())
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    # Unencrypted PKCS#8 PEM, which PostgreSQL / OpenSSL load.
    assert (tls / "server.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls / "server.crt", tls / "server.key")


def test_server_cert_unchanged_when_nothing_changed(tls: Path) -> None:
    assert _server(tls) == "created"
    before = (tls / "server.crt").read_bytes()
    # Order, case and duplicates do not matter.
    assert _server(tls, dns_names=["LOCALHOST", *SERVER_NAMES], ip_addresses=list(reversed(SERVER_IPS))) == "unchanged"
    assert (tls / "server.crt").read_bytes() == before


def test_changing_sans_reissues(tls: Path) -> None:
    _server(tls)
    assert _server(tls, ip_addresses=[*SERVER_IPS, "192.168.0.7"]) == "changed"
    assert "192.168.0.7" in cert_info(tls / "server.crt").ip_addresses
    assert _server(tls, dns_names=["db2.example.internal"]) == "changed"
    assert cert_info(tls / "server.crt").dns_names == ("db2.example.internal",)


def test_ip_literal_among_dns_names_goes_to_ip_sans(tls: Path) -> None:
    _server(tls, dns_names=["db1", "192.0.2.1"], ip_addresses=[])
    info = cert_info(tls / "server.crt")
    assert info.dns_names == ("db1",)
    assert info.ip_addresses == ("192.0.2.1",)


def test_invalid_sans(tls: Path) -> None:
    with pytest.raises(PgbridgeError, match="not an IP address"):
        _server(tls, ip_addresses=["300.1.1.1"])
    with pytest.raises(PgbridgeError, match="at least one"):
        _server(tls, dns_names=[], ip_addresses=[])


def test_expiring_cert_is_renewed(tls: Path) -> None:
    _server(tls)
    assert _server(tls, renew_before_days=30) == "unchanged"
    assert _server(tls, renew_before_days=900) == "changed"


def test_replacing_the_ca_reissues_server_and_client_certs(tls: Path) -> None:
    _server(tls)
    assert ensure_client_cert(tls, "replicator") == "created"
    old_fp = cert_info(tls / "server.crt").fingerprint_sha256
    (tls / "ca.crt").unlink()
    (tls / "ca.key").unlink()
    assert ensure_ca(tls, "pgbridge test CA") == "created"  # same name, new key
    assert _server(tls) == "changed"
    assert cert_info(tls / "server.crt").fingerprint_sha256 != old_fp
    assert ensure_client_cert(tls, "replicator") == "changed"
    assert _server(tls) == "unchanged"
    assert ensure_client_cert(tls, "replicator") == "unchanged"


def test_damaged_server_cert_is_reissued(tls: Path) -> None:
    _server(tls)
    (tls / "server.crt").write_text("garbage")
    assert _server(tls) == "changed"
    cert_info(tls / "server.crt")


def test_mismatched_server_key_is_reissued(tls: Path) -> None:
    _server(tls)
    shutil.copy(tls / "ca.key", tls / "server.key")
    assert _server(tls) == "changed"


# -------------------------------------------------------------------------------------- client cert


def test_client_cert(tls: Path) -> None:
    assert ensure_client_cert(tls, "replicator") == "created"
    assert ensure_client_cert(tls, "replicator") == "unchanged"
    assert _mode(tls / "replicator.key") == 0o600
    info = cert_info(tls / "replicator.crt")
    assert info.subject_cn == "replicator"
    assert info.dns_names == () and info.ip_addresses == ()
    cert = x509.load_pem_x509_certificate((tls / "replicator.crt").read_bytes())
    assert ExtendedKeyUsageOID.CLIENT_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    for bad in ["server", "ca", "../x", "a b", ""]:
        with pytest.raises(PgbridgeError):
            ensure_client_cert(tls, bad)


# --------------------------------------------------------------------------------- real handshakes


@pytest.fixture
def tls_server(tls: Path) -> Iterator[tuple[int, list[BaseException]]]:
    """A one-connection-at-a-time TLS echo server on 127.0.0.1 using server.crt/server.key."""
    _server(tls)
    ensure_client_cert(tls, "replicator")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls / "server.crt", tls / "server.key")
    ctx.load_verify_locations(tls / "ca.crt")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    errors: list[BaseException] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)  # poll, so the fixture's teardown does not wait for accept()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tconn:
                    data = tconn.recv(64)
                    peer = tconn.getpeercert(binary_form=True)
                    cn = ""
                    if peer:
                        subject = x509.load_der_x509_certificate(peer).subject
                        cn = str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
                    tconn.sendall(data + b"|" + cn.encode())
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], errors
    stop.set()
    thread.join(timeout=5)
    listener.close()


def _client_ctx(cafile: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT  # what Python 3.13+ does by default
    return ctx


def _talk(ctx: ssl.SSLContext, port: int, hostname: str) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=hostname) as conn,
    ):
        conn.sendall(b"ping")
        return conn.recv(64)


def test_handshake_verifies_ip_against_deployment_ca(tls: Path, tls_server: tuple[int, list[BaseException]]) -> None:
    port, _ = tls_server
    assert _talk(_client_ctx(tls / "ca.crt"), port, "127.0.0.1") == b"ping|"


def test_handshake_verifies_dns_name(tls: Path, tls_server: tuple[int, list[BaseException]]) -> None:
    port, _ = tls_server
    assert _talk(_client_ctx(tls / "ca.crt"), port, "db1.example.internal") == b"ping|"
    with pytest.raises(ssl.SSLCertVerificationError):
        _talk(_client_ctx(tls / "ca.crt"), port, "not-in-the-cert.example")


def test_handshake_fails_with_unrelated_ca(tmp_path: Path, tls_server: tuple[int, list[BaseException]]) -> None:
    port, _ = tls_server
    other = tmp_path / "other"
    ensure_ca(other, "unrelated CA")
    with pytest.raises(ssl.SSLCertVerificationError):
        _talk(_client_ctx(other / "ca.crt"), port, "127.0.0.1")


def test_client_certificate_authenticates(tls: Path, tls_server: tuple[int, list[BaseException]]) -> None:
    port, _ = tls_server
    ctx = _client_ctx(tls / "ca.crt")
    ctx.load_cert_chain(tls / "replicator.crt", tls / "replicator.key")
    assert _talk(ctx, port, "127.0.0.1") == b"ping|replicator"
