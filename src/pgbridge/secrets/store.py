"""The encrypted credential store of a deployment.

Why this exists: a deployment has to keep database passwords (superuser, replication, application
roles, and later other secrets) on disk so pgbridge can operate unattended, but plaintext passwords in
the home folder end up in backups, support bundles and diffs. This module keeps them in one file,
encrypted and authenticated with AES-256-GCM under a master key that lives elsewhere: either a
passphrase in the ``PGBRIDGE_MASTER_KEY`` environment variable or a 0600 key file holding 32 random bytes.
Values are handed out wrapped in :class:`Secret`, which refuses to print itself, so a password cannot
reach a log line or an error message by accident.

File format (version 1)::

    magic    8 bytes  b"PGBSECR\\0"
    version  1 byte   1
    kdf      1 byte   1 = HKDF-SHA256 of a raw 32-byte key, 2 = scrypt of a passphrase
    log2_n   1 byte   scrypt cost (0 for HKDF)
    r, p     1+1 byte scrypt block size and parallelism (0 for HKDF)
    salt     16 bytes random per store, fixed for the store's lifetime
    check    16 bytes HMAC-SHA256(derived key, label)[:16]: tells "wrong key" apart from "damaged file"
    nonce    12 bytes random, new on every write
    ciphertext        AES-256-GCM(JSON document padded to 256 bytes), whole header as associated data
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import stat
import string
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, Literal, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pgbridge.errors import NotFoundError, SecretsError

ENV_VAR: Final = "PGBRIDGE_MASTER_KEY"
MASK: Final = "********"

__all__ = [
    "ENV_VAR",
    "MASK",
    "MasterKey",
    "Secret",
    "SecretStore",
    "atomic_write",
    "generate_password",
]


# --------------------------------------------------------------------------------------------- Secret


class Secret:
    """A secret string that never prints itself; call :meth:`reveal` where the value is really needed."""

    __slots__ = ("_value",)
    _value: str

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"Secret wraps a str, not {type(value).__name__}")
        object.__setattr__(self, "_value", value)

    def reveal(self) -> str:
        return self._value

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("Secret is immutable")

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return MASK

    def __format__(self, format_spec: str) -> str:
        return format(MASK, format_spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce__(self) -> NoReturn:
        # Pickling would write the plain value somewhere we do not control.
        raise TypeError("Secret cannot be pickled")


# ---------------------------------------------------------------------------------------- passwords

_ALPHABET: Final = string.ascii_letters + string.digits
MIN_PASSWORD_LENGTH: Final = 16


def generate_password(length: int = 32) -> str:
    """A random password of letters and digits: safe unquoted in a libpq DSN, a URL and YAML.

    It starts with a letter (so YAML never reads it as a number) and contains a lower-case letter, an
    upper-case letter and a digit (so it passes PostgreSQL's ``passwordcheck``). 32 characters carry
    about 190 bits of entropy.
    """
    if length < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password length {length} is below the minimum of {MIN_PASSWORD_LENGTH}")
    while True:
        first = secrets.choice(string.ascii_letters)
        rest = "".join(secrets.choice(_ALPHABET) for _ in range(length - 1))
        candidate = first + rest
        if (
            any(c.islower() for c in candidate)
            and any(c.isupper() for c in candidate)
            and any(c.isdigit() for c in candidate)
        ):
            return candidate


# ------------------------------------------------------------------------------------- atomic write


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial one.

    A temporary file is written in the same folder with ``mode`` (set with fchmod, so the umask does not
    matter), fsynced, then renamed over ``path`` (``os.replace``). With ``exclusive=True`` it is instead
    hard-linked to ``path``, which fails with FileExistsError if ``path`` exists. The folder is fsynced.
    When a file is replaced, its owner and group carry over to the new file where permitted (so a
    file the caller chowned stays chowned after a rewrite by root).
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        if not exclusive:
            with contextlib.suppress(OSError):
                old = os.stat(path)
                if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, old.st_uid, old.st_gid)
                    os.fchmod(fd, mode)  # chown may clear set-id bits; keep the mode exact
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                    raise
                # A filesystem without hard links: fall back to check-then-rename.
                if path.exists():
                    raise FileExistsError(errno.EEXIST, "file exists", str(path)) from exc
                os.replace(tmp, path)
            else:
                tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


# ---------------------------------------------------------------------------------------- MasterKey

_KEY_LEN: Final = 32


class MasterKey:
    """The key that opens a deployment's secrets store.

    It holds key *material*: either a passphrase (from ``PGBRIDGE_MASTER_KEY``), stretched with scrypt,
    or 32 random bytes (from the key file), expanded with HKDF. The actual AES key is derived per store
    from the salt in the store's header, so the same passphrase gives different keys for different
    stores. ``source`` says where the material came from, for messages; it never contains the key.
    """

    __slots__ = ("_kind", "_material", "_source")

    def __init__(self, kind: Literal["passphrase", "raw"], material: bytes, source: str) -> None:
        if kind == "raw" and len(material) != _KEY_LEN:
            raise ValueError(f"a raw master key must be {_KEY_LEN} bytes")
        if not material:
            raise ValueError("an empty master key")
        self._kind: Literal["passphrase", "raw"] = kind
        self._material = material
        self._source = source

    @classmethod
    def from_passphrase(cls, passphrase: str, *, source: str = "passphrase") -> MasterKey:
        return cls("passphrase", passphrase.encode("utf-8"), source)

    @classmethod
    def from_bytes(cls, raw: bytes, *, source: str = "bytes") -> MasterKey:
        return cls("raw", bytes(raw), source)

    @classmethod
    def resolve(
        cls,
        key_file: Path,
        *,
        env: Mapping[str, str] = os.environ,
        create: bool = False,
    ) -> MasterKey:
        """Find the master key: ``PGBRIDGE_MASTER_KEY`` if set and non-empty, else ``key_file``.

        With ``create=True`` a missing key file is generated (32 random bytes, base64, mode 0600).
        """
        passphrase = env.get(ENV_VAR, "")
        if passphrase:
            return cls.from_passphrase(passphrase, source=f"env:{ENV_VAR}")
        key_file = Path(key_file)
        source = f"file:{key_file}"
        try:
            return cls("raw", _read_key_file(key_file), source)
        except FileNotFoundError:
            if not create:
                raise SecretsError(
                    f"no master key: {ENV_VAR} is not set and the key file {key_file} does not exist",
                    hint=(
                        f"set {ENV_VAR} to the deployment's passphrase, or restore the key file {key_file} "
                        "(base64 of 32 random bytes, mode 0600) that was used when the deployment was created"
                    ),
                ) from None
        raw = os.urandom(_KEY_LEN)
        try:
            atomic_write(key_file, base64.b64encode(raw) + b"\n", mode=0o600, exclusive=True)
        except FileExistsError:
            # Another process created it between our read and our write: use theirs.
            return cls("raw", _read_key_file(key_file), source)
        except FileNotFoundError:
            raise SecretsError(
                f"cannot create the master key file {key_file}: the folder {key_file.parent} does not exist"
            ) from None
        except PermissionError:
            raise SecretsError(
                f"cannot create the master key file {key_file}: permission denied",
                hint="run pgbridge as the deployment's owner",
            ) from None
        return cls("raw", raw, source)

    @property
    def source(self) -> str:
        """'env:PGBRIDGE_MASTER_KEY' or 'file:<path>' (or what the caller passed); never the key."""
        return self._source

    @property
    def kind(self) -> Literal["passphrase", "raw"]:
        return self._kind

    def __repr__(self) -> str:
        return f"MasterKey({self._kind}, source={self._source!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("MasterKey cannot be pickled")


def _read_key_file(path: Path) -> bytes:
    """Read and check a key file; FileNotFoundError if it is missing, SecretsError if it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except PermissionError:
        raise SecretsError(
            f"cannot read the master key file {path}: permission denied",
            hint=f"run pgbridge as the deployment's owner, or set {ENV_VAR}",
        ) from None
    except OSError as exc:
        raise SecretsError(f"cannot read the master key file {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretsError(f"the master key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise SecretsError(
                f"the master key file {path} can be read by other users (mode {stat.S_IMODE(st.st_mode):04o})",
                hint=f"run: chmod 600 {path}",
            )
        chunks: list[bytes] = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 4096:
                break
    finally:
        os.close(fd)
    data = b"".join(chunks)
    malformed = SecretsError(
        f"the master key file {path} is malformed (expected base64 of {_KEY_LEN} random bytes and a newline)",
        hint="restore the key file that was used when the deployment was created",
    )
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise malformed from None
    if len(raw) != _KEY_LEN:
        raise malformed
    return raw


# ------------------------------------------------------------------------------------ store format

_MAGIC: Final = b"PGBSECR\x00"
_VERSION: Final = 1
_KDF_HKDF: Final = 1
_KDF_SCRYPT: Final = 2
_SCRYPT_LOG2_N: Final = 15  # 32 MiB with r=8: about 0.1 s
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1
_HEADER: Final = struct.Struct(">8sBBBBB16s16s12s")
_TAG_LEN: Final = 16
_PAD_TO: Final = 256
_HKDF_INFO: Final = b"pgbridge secrets store v1"
_CHECK_LABEL: Final = b"pgbridge secrets store key check v1"


@dataclass(frozen=True)
class _Header:
    version: int
    kdf: int
    log2_n: int
    r: int
    p: int
    salt: bytes
    check: bytes
    nonce: bytes

    def pack(self) -> bytes:
        return _HEADER.pack(
            _MAGIC, self.version, self.kdf, self.log2_n, self.r, self.p, self.salt, self.check, self.nonce
        )

    @property
    def kdf_identity(self) -> tuple[int, int, int, int, bytes]:
        return (self.kdf, self.log2_n, self.r, self.p, self.salt)


def _damaged(path: Path, what: str) -> SecretsError:
    return SecretsError(
        f"the secrets store at {path} is damaged ({what})",
        hint="restore it from a backup of the deployment's home folder",
    )


def _parse_header(blob: bytes, path: Path) -> _Header:
    if not blob.startswith(_MAGIC):
        if _MAGIC.startswith(blob):
            raise _damaged(path, "truncated")
        raise _damaged(path, "not a pgbridge secrets store")
    if len(blob) < _HEADER.size + _TAG_LEN:
        raise _damaged(path, "truncated")
    _magic, version, kdf, log2_n, r, p, salt, check, nonce = _HEADER.unpack_from(blob)
    if version != _VERSION:
        raise SecretsError(
            f"the secrets store at {path} has format version {version}; this pgbridge reads version {_VERSION}",
            hint="use the pgbridge version that wrote it (or a newer one)",
        )
    if kdf == _KDF_HKDF:
        if (log2_n, r, p) != (0, 0, 0):
            raise _damaged(path, "bad key derivation parameters")
    elif kdf == _KDF_SCRYPT:
        # Bounds keep a damaged header from asking scrypt for gigabytes of memory.
        if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16 and 128 * r * (2**log2_n) <= 2**30):
            raise _damaged(path, "bad key derivation parameters")
    else:
        raise _damaged(path, f"unknown key derivation {kdf}")
    return _Header(version, kdf, log2_n, r, p, salt, check, nonce)


def _derive(key: MasterKey, header: _Header) -> bytes | None:
    """The store's AES key, or None when the key's kind does not match the header's derivation."""
    if header.kdf == _KDF_SCRYPT and key.kind == "passphrase":
        return Scrypt(salt=header.salt, length=32, n=2**header.log2_n, r=header.r, p=header.p).derive(key._material)
    if header.kdf == _KDF_HKDF and key.kind == "raw":
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=header.salt, info=_HKDF_INFO).derive(key._material)
    return None


def _key_check(derived: bytes) -> bytes:
    return hmac.new(derived, _CHECK_LABEL, hashlib.sha256).digest()[:16]


def _wrong_key(path: Path, key: MasterKey, header: _Header) -> SecretsError:
    hint: str | None = None
    if header.kdf == _KDF_SCRYPT and key.kind == "raw":
        hint = f"this store was created with a passphrase in {ENV_VAR}, not with a key file"
    elif header.kdf == _KDF_HKDF and key.kind == "passphrase":
        hint = (
            f"this store was created with a key file, but {ENV_VAR} is set and takes precedence; "
            f"unset {ENV_VAR} to use the key file"
        )
    return SecretsError(
        f"the master key from {key.source} does not open the secrets store at {path}; set {ENV_VAR} or "
        "the key file that was used when the deployment was created",
        hint=hint,
    )


def _encode(data: Mapping[str, str]) -> bytes:
    doc = json.dumps({"format": 1, "secrets": dict(sorted(data.items()))}, separators=(",", ":"))
    raw = doc.encode("utf-8")
    # Pad with JSON whitespace so the file size does not reveal the exact length of the passwords.
    return raw + b" " * (-len(raw) % _PAD_TO)


def _decode(plaintext: bytes, path: Path) -> dict[str, str]:
    try:
        doc = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _damaged(path, "unreadable content") from None
    values = doc.get("secrets") if isinstance(doc, dict) else None
    if not isinstance(values, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise _damaged(path, "unexpected content")
    return dict(values)


_Cache = tuple[tuple[int, int, int, int, bytes], bytes]


def _load(path: Path, key: MasterKey, cache: _Cache | None = None) -> tuple[_Header, bytes, dict[str, str]]:
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"there is no secrets store at {path}",
            hint="create the deployment first, or point pgbridge at the deployment's home folder",
        ) from None
    except PermissionError:
        raise SecretsError(
            f"cannot read the secrets store at {path}: permission denied",
            hint="run pgbridge as the deployment's owner",
        ) from None
    except OSError as exc:
        raise SecretsError(f"cannot read the secrets store at {path}: {exc.strerror}") from None
    header = _parse_header(blob, path)
    if cache is not None and cache[0] == header.kdf_identity:
        derived: bytes | None = cache[1]
    else:
        derived = _derive(key, header)
    if derived is None or not hmac.compare_digest(_key_check(derived), header.check):
        raise _wrong_key(path, key, header)
    try:
        plaintext = AESGCM(derived).decrypt(header.nonce, blob[_HEADER.size :], header.pack())
    except InvalidTag:
        raise _damaged(path, "authentication failed: the file was modified or truncated") from None
    return header, derived, _decode(plaintext, path)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > 255:
        raise ValueError("a secret name must be a non-empty string of at most 255 characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("a secret name must not contain control characters")


# -------------------------------------------------------------------------------------- SecretStore


class SecretStore:
    """A deployment's secrets, decrypted in memory; every change is written back at once.

    ``get``/``names`` answer from the snapshot taken by ``open`` (refreshed by every ``set``/``delete``).
    Writers take an exclusive lock on ``.<file>.lock`` next to the store and re-read the file before
    changing it, so concurrent pgbridge commands do not lose each other's updates.
    """

    def __init__(self, path: Path, key: MasterKey, header: _Header, derived: bytes, data: dict[str, str]) -> None:
        # Use SecretStore.create / SecretStore.open.
        self._path = path
        self._key = key
        self._header = header
        self._derived = derived
        self._data = data

    # construction ------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, key: MasterKey) -> SecretStore:
        """Create an empty store at ``path``; SecretsError if a file is already there."""
        path = Path(path)
        if path.exists():
            raise SecretsError(
                f"a secrets store already exists at {path}",
                hint="open it with its master key, or move it aside to start over",
            )
        salt = os.urandom(16)
        if key.kind == "passphrase":
            header = _Header(_VERSION, _KDF_SCRYPT, _SCRYPT_LOG2_N, _SCRYPT_R, _SCRYPT_P, salt, b"", b"")
        else:
            header = _Header(_VERSION, _KDF_HKDF, 0, 0, 0, salt, b"", b"")
        derived = _derive(key, header)
        assert derived is not None
        header = replace(header, check=_key_check(derived))
        store = cls(path, key, header, derived, {})
        try:
            store._write({}, exclusive=True)
        except FileExistsError:
            raise SecretsError(
                f"a secrets store already exists at {path}",
                hint="open it with its master key, or move it aside to start over",
            ) from None
        except FileNotFoundError:
            raise SecretsError(
                f"cannot create the secrets store at {path}: the folder {path.parent} does not exist"
            ) from None
        except PermissionError:
            raise SecretsError(
                f"cannot create the secrets store at {path}: permission denied",
                hint="run pgbridge as the deployment's owner",
            ) from None
        return store

    @classmethod
    def open(cls, path: Path, key: MasterKey) -> SecretStore:
        """Open and decrypt the store at ``path``.

        NotFoundError if it is missing; SecretsError if the key does not open it or it is damaged.
        """
        path = Path(path)
        header, derived, data = _load(path, key)
        return cls(path, key, header, derived, data)

    # reading -----------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def key_source(self) -> str:
        return self._key.source

    def get(self, name: str) -> Secret:
        try:
            return Secret(self._data[name])
        except KeyError:
            raise NotFoundError(f"there is no secret named {name!r} in the secrets store at {self._path}") from None

    def names(self) -> list[str]:
        return sorted(self._data)

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"SecretStore({str(self._path)!r}, {len(self._data)} secrets, key from {self._key.source})"

    # writing -----------------------------------------------------------------------------------

    def set(self, name: str, value: str | Secret) -> None:
        """Store ``value`` under ``name`` and persist the store immediately (atomic write, mode 0600)."""
        _check_name(name)
        plain = value.reveal() if isinstance(value, Secret) else value
        if not isinstance(plain, str):
            raise TypeError(f"a secret value must be str or Secret, not {type(value).__name__}")
        with self._locked():
            data = dict(self._data)
            data[name] = plain
            self._write(data)

    def delete(self, name: str) -> None:
        """Remove ``name`` (NotFoundError if absent) and persist the store immediately."""
        with self._locked():
            if name not in self._data:
                raise NotFoundError(f"there is no secret named {name!r} in the secrets store at {self._path}")
            data = dict(self._data)
            del data[name]
            self._write(data)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the store's write lock and refresh the snapshot from disk."""
        lock_path = self._path.with_name(f".{self._path.name}.lock")
        try:
            # Read-only is enough for flock; the lock file is empty, so 0644 exposes nothing.
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise SecretsError(
                f"cannot lock the secrets store at {self._path} ({lock_path}: {exc.strerror})",
                hint="run pgbridge as the deployment's owner",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            cache: _Cache = (self._header.kdf_identity, self._derived)
            self._header, self._derived, self._data = _load(self._path, self._key, cache)
            yield
        finally:
            os.close(fd)

    def _write(self, data: dict[str, str], *, exclusive: bool = False) -> None:
        header = replace(self._header, nonce=os.urandom(12))
        ciphertext = AESGCM(self._derived).encrypt(header.nonce, _encode(data), header.pack())
        atomic_write(self._path, header.pack() + ciphertext, mode=0o600, exclusive=exclusive)
        self._header = header
        self._data = data
