"""The deployment's own certificate authority, server certificate and client certificates.

Why this exists: a production PostgreSQL must only be reachable over TLS that clients can verify
(``sslmode=verify-full``), and a self-hosted deployment cannot assume a corporate PKI. So each
deployment has a small CA of its own in its TLS folder: clients trust ``ca.crt``, the server presents
``server.crt`` whose SubjectAltName lists every name and address clients use, and replication or
certificate-authenticated roles get ``<name>.crt``. The ``ensure_*`` functions are idempotent so they
can run on every reconcile: they issue what is missing and re-issue what is stale (names changed,
close to expiry, or signed by a CA that is no longer the deployment's).

Keys are EC P-256, written as unencrypted PKCS#8 PEM with mode 0600 (what PostgreSQL and OpenSSL
accept); certificates are PEM with mode 0644. Every file is written atomically. Ownership is left to
the caller.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pgbridge.errors import NotFoundError, PgbridgeError
from pgbridge.secrets.store import atomic_write

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_NAME",
    "CertInfo",
    "cert_info",
    "ensure_ca",
    "ensure_client_cert",
    "ensure_server_cert",
]

log = logging.getLogger(__name__)

CA_CERT: Final = "ca.crt"
CA_KEY: Final = "ca.key"
SERVER_NAME: Final = "server"
CA_VALIDITY: Final = dt.timedelta(days=3650)
LEAF_VALIDITY: Final = dt.timedelta(days=825)
_BACKDATE: Final = dt.timedelta(minutes=5)  # tolerate a little clock skew between hosts
_KEY_MODE: Final = 0o600
_CERT_MODE: Final = 0o644
_CLIENT_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,62}$")

_SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Outcome = Literal["created", "changed", "unchanged"]


@dataclass(frozen=True)
class CertInfo:
    """What a certificate says, for status output and checks."""

    subject_cn: str | None
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    issuer_cn: str | None
    fingerprint_sha256: str

    def expires_within(self, days: int, *, now: dt.datetime | None = None) -> bool:
        now = now or dt.datetime.now(dt.UTC)
        return self.not_after - now < dt.timedelta(days=days)


# ------------------------------------------------------------------------------------------ helpers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: _SigningKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _matches(cert: x509.Certificate, key: _SigningKey) -> bool:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return _spki(public) == _spki(key.public_key())


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise NotFoundError(f"there is no certificate at {path}") from None
    except ValueError:
        raise PgbridgeError(f"{path} is not a PEM certificate") from None
    except OSError as exc:
        raise PgbridgeError(f"cannot read {path}: {exc.strerror}") from None


def _load_key(path: Path) -> _SigningKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise NotFoundError(f"there is no private key at {path}") from None
    except (ValueError, TypeError):
        raise PgbridgeError(f"{path} is not an unencrypted PEM private key") from None
    except OSError as exc:
        raise PgbridgeError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PgbridgeError(f"{path} holds a {type(key).__name__}; pgbridge uses EC or RSA keys")
    return key


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _sans(cert: x509.Certificate) -> tuple[set[str], set[_IP]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    ips = {
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
    }
    return dns, ips


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    try:
        return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return set()


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:
        raise PgbridgeError(f"a certificate common name must be 1..64 characters, got {common_name!r}")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


# ----------------------------------------------------------------------------------------------- CA


def _load_ca(tls_dir: Path) -> tuple[x509.Certificate, _SigningKey]:
    crt_path, key_path = tls_dir / CA_CERT, tls_dir / CA_KEY
    if not crt_path.exists() and not key_path.exists():
        raise NotFoundError(
            f"the deployment's certificate authority is missing ({crt_path} and {key_path})",
            hint="create it first (pgbridge creates it when the deployment is created)",
        )
    _check_pair_complete(crt_path, key_path)
    cert, key = _load_cert(crt_path), _load_key(key_path)
    if not _matches(cert, key):
        raise PgbridgeError(
            f"{crt_path} and {key_path} do not belong together (the certificate is not for this key)",
            hint=(
                "restore the matching pair from a backup; or move both aside to create a new CA, after which "
                "clients must trust the new ca.crt and all server/client certificates are re-issued"
            ),
        )
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = constraints.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PgbridgeError(
            f"{crt_path} is not a CA certificate (basicConstraints CA:TRUE is missing)",
            hint="move ca.crt and ca.key aside to let pgbridge create a proper CA",
        )
    if cert.not_valid_after_utc <= _now():
        raise PgbridgeError(
            f"the deployment's CA certificate {crt_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}",
            hint=(
                "move ca.crt and ca.key aside to create a new CA; clients must then trust the new ca.crt "
                "and all server/client certificates are re-issued"
            ),
        )
    return cert, key


def _check_pair_complete(crt_path: Path, key_path: Path) -> None:
    if crt_path.exists() and not key_path.exists():
        raise PgbridgeError(
            f"{crt_path} exists but its key {key_path} is missing",
            hint=f"restore {key_path} from a backup, or move {crt_path} aside to create a new CA "
            "(clients must then trust the new ca.crt)",
        )
    if key_path.exists() and not crt_path.exists():
        raise PgbridgeError(
            f"{key_path} exists but its certificate {crt_path} is missing",
            hint=f"restore {crt_path} from a backup, or move {key_path} aside to create a new CA "
            "(clients must then trust the new ca.crt)",
        )


def ensure_ca(tls_dir: Path, common_name: str) -> Literal["created", "unchanged"]:
    """Create the deployment's self-signed CA (``ca.crt``, ``ca.key``) unless it exists.

    An existing CA is checked (its certificate and key belong together, it is a CA, it has not expired)
    and kept as it is, even if ``common_name`` differs: replacing a CA breaks every client that trusts
    it, so that is a deliberate operator action (move the files aside). Raises PgbridgeError with the
    way out when the CA is unusable.
    """
    tls_dir = Path(tls_dir)
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    crt_path, key_path = tls_dir / CA_CERT, tls_dir / CA_KEY
    if crt_path.exists() or key_path.exists():
        _load_ca(tls_dir)
        return "unchanged"

    key = _new_key()
    name = _name(common_name)
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    try:
        # Key first, both exclusive: two concurrent callers cannot end up with different CAs.
        atomic_write(key_path, _key_pem(key), mode=_KEY_MODE, exclusive=True)
        atomic_write(crt_path, _cert_pem(cert), mode=_CERT_MODE, exclusive=True)
    except FileExistsError:
        raise PgbridgeError(
            f"another process created a CA in {tls_dir} at the same time",
            hint="run the command again",
        ) from None
    log.info("created certificate authority %s (CN=%s)", crt_path, common_name)
    return "created"


# -------------------------------------------------------------------------------------------- leaves


def _leaf_paths(tls_dir: Path, name: str) -> tuple[Path, Path]:
    return tls_dir / f"{name}.crt", tls_dir / f"{name}.key"


def _reissue_reasons(
    crt_path: Path,
    key_path: Path,
    *,
    ca_cert: x509.Certificate,
    common_name: str,
    dns_names: set[str],
    ips: set[_IP],
    eku: x509.ObjectIdentifier,
    renew_before_days: int,
) -> list[str]:
    try:
        cert, key = _load_cert(crt_path), _load_key(key_path)
    except PgbridgeError as exc:
        return [f"unreadable: {exc.message}"]
    reasons = []
    if not _matches(cert, key):
        reasons.append("certificate and key do not belong together")
    if not _issued_by(cert, ca_cert):
        reasons.append("not signed by the current CA")
    if cert.not_valid_after_utc - _now() < dt.timedelta(days=renew_before_days):
        reasons.append(f"expires on {cert.not_valid_after_utc:%Y-%m-%d}")
    if _cn(cert.subject) != common_name:
        reasons.append("common name changed")
    if _sans(cert) != (dns_names, ips):
        reasons.append("subject alternative names changed")
    if eku not in _ekus(cert):
        reasons.append("missing extended key usage")
    return reasons


def _issue(
    crt_path: Path,
    key_path: Path,
    *,
    ca_cert: x509.Certificate,
    ca_key: _SigningKey,
    common_name: str,
    dns_names: set[str],
    ips: set[_IP],
    eku: x509.ObjectIdentifier,
) -> None:
    key = _new_key()
    now = _now()
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if dns_names or ips:
        general: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(dns_names)]
        general += [x509.IPAddress(ip) for ip in sorted(ips, key=lambda a: (a.version, int(a)))]
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    # Key first: a reader that sees the new key with the old certificate notices the mismatch and the
    # next ensure_* call repairs it; the reverse order would do the same, there is no atomic pair swap.
    atomic_write(key_path, _key_pem(key), mode=_KEY_MODE)
    atomic_write(crt_path, _cert_pem(cert), mode=_CERT_MODE)


def _ensure_leaf(
    tls_dir: Path,
    name: str,
    *,
    common_name: str,
    dns_names: set[str],
    ips: set[_IP],
    eku: x509.ObjectIdentifier,
    renew_before_days: int,
) -> Outcome:
    ca_cert, ca_key = _load_ca(tls_dir)
    crt_path, key_path = _leaf_paths(tls_dir, name)
    if crt_path.exists() and key_path.exists():
        reasons = _reissue_reasons(
            crt_path,
            key_path,
            ca_cert=ca_cert,
            common_name=common_name,
            dns_names=dns_names,
            ips=ips,
            eku=eku,
            renew_before_days=renew_before_days,
        )
        if not reasons:
            return "unchanged"
        outcome: Outcome = "changed"
        log.info("re-issuing %s: %s", crt_path, "; ".join(reasons))
    else:
        outcome = "changed" if crt_path.exists() else "created"
    _issue(
        crt_path,
        key_path,
        ca_cert=ca_cert,
        ca_key=ca_key,
        common_name=common_name,
        dns_names=dns_names,
        ips=ips,
        eku=eku,
    )
    return outcome


def _normalize_sans(dns_names: Sequence[str], ip_addresses: Sequence[str]) -> tuple[set[str], set[_IP]]:
    if isinstance(dns_names, str) or isinstance(ip_addresses, str):
        raise TypeError("dns_names and ip_addresses are sequences of strings, not strings")
    ips: set[_IP] = set()
    for text in ip_addresses:
        try:
            ips.add(ipaddress.ip_address(text.strip()))
        except ValueError:
            raise PgbridgeError(f"{text!r} is not an IP address (certificate subject alternative name)") from None
    names: set[str] = set()
    for raw in dns_names:
        text = raw.strip().lower().rstrip(".")
        try:
            # An address listed among the names is what the caller meant: put it where clients look.
            ips.add(ipaddress.ip_address(text.strip("[]")))
            continue
        except ValueError:
            pass
        if not text or not text.isascii() or any(c.isspace() or c in "/:@" for c in text):
            raise PgbridgeError(f"{raw!r} is not a DNS name (certificate subject alternative name)")
        names.add(text)
    return names, ips


def ensure_server_cert(
    tls_dir: Path,
    *,
    common_name: str,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str],
    renew_before_days: int = 30,
) -> Literal["created", "changed", "unchanged"]:
    """Issue ``server.crt``/``server.key`` from the deployment's CA, or re-issue them when stale.

    The SubjectAltName holds exactly the given DNS names and IP addresses (v4 and v6; IP literals given
    as DNS names are moved to the addresses, since clients verify IPs against IP entries only).
    Re-issued ('changed') when that set or the common name differs, the certificate expires within
    ``renew_before_days``, it was not signed by the current CA, or it does not match its key.
    """
    names, ips = _normalize_sans(dns_names, ip_addresses)
    if not names and not ips:
        raise PgbridgeError("a server certificate needs at least one DNS name or IP address")
    return _ensure_leaf(
        Path(tls_dir),
        SERVER_NAME,
        common_name=common_name,
        dns_names=names,
        ips=ips,
        eku=ExtendedKeyUsageOID.SERVER_AUTH,
        renew_before_days=renew_before_days,
    )


def ensure_client_cert(
    tls_dir: Path, name: str, *, renew_before_days: int = 30
) -> Literal["created", "changed", "unchanged"]:
    """Issue ``<name>.crt``/``<name>.key`` (CN=name, clientAuth) from the deployment's CA.

    For PostgreSQL certificate authentication the CN is the role name. Re-issued on the same grounds
    as the server certificate (CA changed, expiring, mismatched key).
    """
    if not _CLIENT_NAME_RE.match(name) or name in (SERVER_NAME, "ca"):
        raise PgbridgeError(
            f"{name!r} cannot name a client certificate (use letters, digits, '_', '.', '-'; not 'ca' or 'server')"
        )
    return _ensure_leaf(
        Path(tls_dir),
        name,
        common_name=name,
        dns_names=set(),
        ips=set(),
        eku=ExtendedKeyUsageOID.CLIENT_AUTH,
        renew_before_days=renew_before_days,
    )


def cert_info(path: Path) -> CertInfo:
    """Read a PEM certificate; NotFoundError if missing, PgbridgeError if it is not a certificate."""
    cert = _load_cert(Path(path))
    dns, ips = _sans(cert)
    return CertInfo(
        subject_cn=_cn(cert.subject),
        dns_names=tuple(sorted(dns)),
        ip_addresses=tuple(str(ip) for ip in sorted(ips, key=lambda a: (a.version, int(a)))),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        issuer_cn=_cn(cert.issuer),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
    )
