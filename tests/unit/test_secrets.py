"""Tests for the encrypted secrets store, the master key, passwords and redaction."""

from __future__ import annotations

import base64
import logging
import math
import os
import pickle
import stat
from pathlib import Path

import pytest

from pgbridge.errors import NotFoundError, SecretsError
from pgbridge.secrets.redact import RedactingFilter, Redactor, redact_dsn
from pgbridge.secrets.store import (
    ENV_VAR,
    MASK,
    MasterKey,
    Secret,
    SecretStore,
    atomic_write,
    generate_password,
)

PASSWORD = "s3cr3t-Value-that-must-not-leak"
NO_ENV: dict[str, str] = {}


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "master.key"


@pytest.fixture
def file_key(key_file: Path) -> MasterKey:
    return MasterKey.resolve(key_file, env=NO_ENV, create=True)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "secrets.enc"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _assert_clean(message: str, *forbidden: str) -> None:
    for value in forbidden:
        assert value not in message


# -------------------------------------------------------------------------------------------- Secret


def test_secret_never_prints_its_value() -> None:
    s = Secret(PASSWORD)
    assert str(s) == MASK
    assert repr(s) == MASK
    assert f"{s}" == MASK
    assert f"{s:>10}" == f"{MASK:>10}"
    assert "%s %r" % (s, s) == f"{MASK} {MASK}"  # noqa: UP031
    assert PASSWORD not in repr([s, {"k": s}])
    assert s.reveal() == PASSWORD


def test_secret_equality_hash_immutability() -> None:
    assert Secret("a") == Secret("a")
    assert Secret("a") != Secret("b")
    assert Secret("a") != "a"
    assert len({Secret("a"), Secret("a"), Secret("b")}) == 2
    s = Secret("a")
    with pytest.raises(AttributeError):
        s._value = "b"
    with pytest.raises(TypeError):
        pickle.dumps(s)
    with pytest.raises(TypeError):
        Secret(b"bytes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- MasterKey


def test_resolve_creates_key_file_0600_even_with_permissive_umask(key_file: Path) -> None:
    old = os.umask(0)
    try:
        key = MasterKey.resolve(key_file, env=NO_ENV, create=True)
    finally:
        os.umask(old)
    assert _mode(key_file) == 0o600
    content = key_file.read_bytes()
    assert content.endswith(b"\n")
    assert len(base64.b64decode(content.strip(), validate=True)) == 32
    assert key.source == f"file:{key_file}"
    # No temporary files are left behind.
    assert [p.name for p in key_file.parent.iterdir()] == [key_file.name]
    # A second resolve reads the same key rather than generating a new one.
    assert MasterKey.resolve(key_file, env=NO_ENV, create=True).source == key.source
    assert key_file.read_bytes() == content


def test_missing_key_file_without_create(key_file: Path) -> None:
    with pytest.raises(SecretsError) as exc:
        MasterKey.resolve(key_file, env=NO_ENV)
    text = str(exc.value)
    assert ENV_VAR in text
    assert str(key_file) in text
    assert not key_file.exists()


def test_key_file_readable_by_others_is_rejected(file_key: MasterKey, key_file: Path) -> None:
    key_file.chmod(0o644)
    with pytest.raises(SecretsError) as exc:
        MasterKey.resolve(key_file, env=NO_ENV)
    assert f"chmod 600 {key_file}" in str(exc.value)
    assert key_file.read_text().strip() not in str(exc.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"not base64!!\n", base64.b64encode(os.urandom(16)) + b"\n", b"\xff\xfe"],
)
def test_malformed_key_file(key_file: Path, content: bytes) -> None:
    key_file.write_bytes(content)
    key_file.chmod(0o600)
    with pytest.raises(SecretsError, match="malformed"):
        MasterKey.resolve(key_file, env=NO_ENV)


def test_env_var_takes_precedence(file_key: MasterKey, key_file: Path) -> None:
    key = MasterKey.resolve(key_file, env={ENV_VAR: "correct horse battery staple"})
    assert key.kind == "passphrase"
    assert key.source == f"env:{ENV_VAR}"
    # Precedence even when the key file would be rejected.
    key_file.chmod(0o644)
    assert MasterKey.resolve(key_file, env={ENV_VAR: "pp"}).source == f"env:{ENV_VAR}"
    # An empty variable counts as unset.
    key_file.chmod(0o600)
    assert MasterKey.resolve(key_file, env={ENV_VAR: ""}).source == f"file:{key_file}"


def test_env_var_does_not_create_key_file(key_file: Path) -> None:
    MasterKey.resolve(key_file, env={ENV_VAR: "pp"}, create=True)
    assert not key_file.exists()


def test_master_key_repr_hides_material() -> None:
    key = MasterKey.from_passphrase("hunter2-passphrase", source="test")
    assert "hunter2" not in repr(key)


# -------------------------------------------------------------------------------------- SecretStore


def test_round_trip_with_key_file(store_path: Path, file_key: MasterKey, key_file: Path) -> None:
    store = SecretStore.create(store_path, file_key)
    assert store.names() == []
    store.set("postgres", PASSWORD)
    store.set("replicator", Secret("other-value"))
    assert _mode(store_path) == 0o600
    assert PASSWORD.encode() not in store_path.read_bytes()

    reopened = SecretStore.open(store_path, MasterKey.resolve(key_file, env=NO_ENV))
    assert reopened.names() == ["postgres", "replicator"]
    assert reopened.get("postgres").reveal() == PASSWORD
    assert reopened.get("replicator") == Secret("other-value")
    assert "postgres" in reopened
    assert "nobody" not in reopened
    assert PASSWORD not in repr(reopened)


def test_round_trip_with_passphrase(store_path: Path) -> None:
    key = MasterKey.from_passphrase("correct horse battery staple")
    store = SecretStore.create(store_path, key)
    store.set("app", PASSWORD)
    again = SecretStore.open(store_path, MasterKey.from_passphrase("correct horse battery staple"))
    assert again.get("app").reveal() == PASSWORD


def test_set_overwrites_and_delete(store_path: Path, file_key: MasterKey) -> None:
    store = SecretStore.create(store_path, file_key)
    store.set("a", "1")
    store.set("a", "2")
    assert SecretStore.open(store_path, file_key).get("a").reveal() == "2"
    store.delete("a")
    assert SecretStore.open(store_path, file_key).names() == []
    with pytest.raises(NotFoundError):
        store.delete("a")


def test_new_nonce_on_every_write(store_path: Path, file_key: MasterKey) -> None:
    store = SecretStore.create(store_path, file_key)
    store.set("a", "1")
    first = store_path.read_bytes()
    store.set("a", "1")
    second = store_path.read_bytes()
    assert first != second
    # Salt and key check stay, nonce (last 12 header bytes) changes.
    header_len = 8 + 5 + 16 + 16 + 12
    assert first[: header_len - 12] == second[: header_len - 12]
    assert first[header_len - 12 : header_len] != second[header_len - 12 : header_len]


def test_concurrent_writers_do_not_lose_updates(store_path: Path, file_key: MasterKey) -> None:
    SecretStore.create(store_path, file_key)
    one = SecretStore.open(store_path, file_key)
    two = SecretStore.open(store_path, file_key)
    one.set("a", "1")
    two.set("b", "2")
    assert SecretStore.open(store_path, file_key).names() == ["a", "b"]


def test_get_missing_name(store_path: Path, file_key: MasterKey) -> None:
    store = SecretStore.create(store_path, file_key)
    store.set("postgres", PASSWORD)
    with pytest.raises(NotFoundError) as exc:
        store.get("nobody")
    assert "nobody" in str(exc.value)
    assert PASSWORD not in str(exc.value)


def test_create_refuses_existing_file(store_path: Path, file_key: MasterKey) -> None:
    SecretStore.create(store_path, file_key).set("a", PASSWORD)
    with pytest.raises(SecretsError, match="already exists"):
        SecretStore.create(store_path, file_key)
    assert SecretStore.open(store_path, file_key).get("a").reveal() == PASSWORD


def test_open_missing_store(store_path: Path, file_key: MasterKey) -> None:
    with pytest.raises(NotFoundError):
        SecretStore.open(store_path, file_key)


def test_wrong_file_key(store_path: Path, file_key: MasterKey, tmp_path: Path) -> None:
    SecretStore.create(store_path, file_key).set("postgres", PASSWORD)
    other_file = tmp_path / "other.key"
    other = MasterKey.resolve(other_file, env=NO_ENV, create=True)
    with pytest.raises(SecretsError) as exc:
        SecretStore.open(store_path, other)
    text = str(exc.value)
    assert f"file:{other_file}" in text
    assert str(store_path) in text
    assert ENV_VAR in text
    _assert_clean(text, PASSWORD, other_file.read_text().strip(), (tmp_path / "master.key").read_text().strip())


def test_wrong_passphrase(store_path: Path) -> None:
    SecretStore.create(store_path, MasterKey.from_passphrase("right-passphrase")).set("postgres", PASSWORD)
    wrong = MasterKey.resolve(Path("/nonexistent"), env={ENV_VAR: "wrong-passphrase"})
    with pytest.raises(SecretsError) as exc:
        SecretStore.open(store_path, wrong)
    text = str(exc.value)
    assert f"env:{ENV_VAR}" in text
    assert "does not open" in text
    _assert_clean(text, PASSWORD, "right-passphrase", "wrong-passphrase")


def test_passphrase_used_on_key_file_store_hints_env_precedence(store_path: Path, file_key: MasterKey) -> None:
    SecretStore.create(store_path, file_key).set("postgres", PASSWORD)
    with pytest.raises(SecretsError) as exc:
        SecretStore.open(store_path, MasterKey.from_passphrase("some-passphrase", source=f"env:{ENV_VAR}"))
    assert f"unset {ENV_VAR}" in str(exc.value)
    _assert_clean(str(exc.value), PASSWORD, "some-passphrase")


def _damage(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 0x01
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (-1, "damaged"),  # tag
        (-40, "damaged"),  # ciphertext
        (0, "damaged"),  # magic
        (8, "version"),  # version
        (9, "damaged"),  # kdf id
        (8 + 5 + 16 + 16, "damaged"),  # nonce: authenticated as associated data
        (8 + 5 + 16, "does not open"),  # key check
        (8 + 5, "does not open"),  # salt: derives another key
    ],
)
def test_tampering_is_detected(store_path: Path, file_key: MasterKey, offset: int, expected: str) -> None:
    SecretStore.create(store_path, file_key).set("postgres", PASSWORD)
    _damage(store_path, offset)
    with pytest.raises(SecretsError, match=expected) as exc:
        SecretStore.open(store_path, file_key)
    assert PASSWORD not in str(exc.value)


@pytest.mark.parametrize("keep", [0, 5, 20, 57, 60, -1])
def test_truncated_file_is_damaged(store_path: Path, file_key: MasterKey, keep: int) -> None:
    SecretStore.create(store_path, file_key).set("postgres", PASSWORD)
    blob = store_path.read_bytes()
    store_path.write_bytes(blob[:keep])
    with pytest.raises(SecretsError, match="damaged"):
        SecretStore.open(store_path, file_key)


def test_not_a_store(store_path: Path, file_key: MasterKey) -> None:
    store_path.write_text("postgres: hunter2\n")
    with pytest.raises(SecretsError, match="not a pgbridge secrets store"):
        SecretStore.open(store_path, file_key)


def test_swapped_header_is_rejected(tmp_path: Path, file_key: MasterKey) -> None:
    a, b = tmp_path / "a.enc", tmp_path / "b.enc"
    SecretStore.create(a, file_key).set("x", "1")
    SecretStore.create(b, file_key).set("x", "2")
    header_len = 8 + 5 + 16 + 16 + 12
    blob_a, blob_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(blob_b[:header_len] + blob_a[header_len:])
    with pytest.raises(SecretsError, match="damaged"):
        SecretStore.open(a, file_key)


def test_invalid_names(store_path: Path, file_key: MasterKey) -> None:
    store = SecretStore.create(store_path, file_key)
    for bad in ["", "a\nb", "x" * 256]:
        with pytest.raises(ValueError):
            store.set(bad, "v")


def test_atomic_write_exclusive(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one", mode=0o644, exclusive=True)
    assert _mode(target) == 0o644
    with pytest.raises(FileExistsError):
        atomic_write(target, b"two", exclusive=True)
    atomic_write(target, b"three")
    assert target.read_bytes() == b"three"
    assert _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ---------------------------------------------------------------------------------------- passwords


def test_generate_password() -> None:
    seen = set()
    for _ in range(200):
        pw = generate_password()
        assert len(pw) == 32
        assert pw.isascii() and pw.isalnum()
        assert pw[0].isalpha()
        assert any(c.isdigit() for c in pw) and any(c.islower() for c in pw) and any(c.isupper() for c in pw)
        seen.add(pw)
    assert len(seen) == 200
    # 62 symbols per character: well over 128 bits at the default length.
    assert 32 * math.log2(62) > 128
    assert len(generate_password(24)) == 24
    with pytest.raises(ValueError):
        generate_password(8)


def test_password_alphabet_is_well_spread() -> None:
    chars = "".join(generate_password(64) for _ in range(100))
    assert len(set(chars)) == 62


def test_password_safe_in_yaml_and_dsn() -> None:
    yaml = pytest.importorskip("yaml")
    for _ in range(50):
        pw = generate_password()
        assert yaml.safe_load(f"password: {pw}") == {"password": pw}
        assert redact_dsn(f"host=x password={pw} user=y") == f"host=x password={MASK} user=y"


# ---------------------------------------------------------------------------------------- redaction


def test_redactor_replaces_known_values_longest_first() -> None:
    r = Redactor(["abc", Secret("abcdef"), ""])
    assert r.redact("x abcdef y abc z") == f"x {MASK} y {MASK} z"
    assert r.redact("nothing here") == "nothing here"
    r.add("p@ss word")
    assert r.redact("url p%40ss%20word and p@ss word") == f"url {MASK} and {MASK}"


def test_redactor_from_store(store_path: Path, file_key: MasterKey) -> None:
    store = SecretStore.create(store_path, file_key)
    store.set("postgres", PASSWORD)
    text = f"FATAL: password authentication failed, tried {PASSWORD}"
    assert PASSWORD not in Redactor.from_store(store).redact(text)


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("host=db port=5432 password=hunter2 user=app", f"host=db port=5432 password={MASK} user=app"),
        ("host=db password = 'hu nt\\'er2' user=app", f"host=db password = {MASK} user=app"),
        ("password='unterminated secret", f"password={MASK}"),
        ("PGPASSWORD=hunter2 psql", f"PGPASSWORD={MASK} psql"),
        ("postgresql://app:hunter2@db:5432/app", f"postgresql://app:{MASK}@db:5432/app"),
        ("postgres://app:hu@nter2@db/app?sslmode=require", f"postgres://app:{MASK}@db/app?sslmode=require"),
        (
            "postgresql://db/app?user=app&password=hunter2&sslmode=x",
            f"postgresql://db/app?user=app&password={MASK}&sslmode=x",
        ),
        ("postgresql://app@db:5432/app", "postgresql://app@db:5432/app"),
        ("postgresql://db:5432/app", "postgresql://db:5432/app"),
        ("connect failed: host=db user=app", "connect failed: host=db user=app"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected
    assert "hunter2" not in Redactor().redact(dsn)


def test_redacting_log_filter(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("pgbridge.test.redact")
    caplog.handler.addFilter(RedactingFilter(Redactor([PASSWORD])))
    with caplog.at_level(logging.INFO, logger="pgbridge.test.redact"):
        logger.info("connecting with %s", PASSWORD)
        try:
            raise RuntimeError(f"boom {PASSWORD}")
        except RuntimeError:
            logger.exception("failed")
    assert PASSWORD not in caplog.text
    assert MASK in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_atomic_write_keeps_owner_of_replaced_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    os.chown(target, 65534, 65534)
    atomic_write(target, b"two")
    st = target.stat()
    assert (st.st_uid, st.st_gid) == (65534, 65534)
    assert _mode(target) == 0o600
