"""How a deployment's pipeline daemon logs in: its password file, and where the members listen."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgbridge.cdc.pipeline import check_passfile
from pgbridge.errors import DeploymentError, PgbridgeError
from pgbridge.ops.context import member_listen_addresses
from pgbridge.ops.pipeline import passfile_text
from pgbridge.spec.load import parse_spec


def test_the_password_file_escapes_what_pgpass_would_read_as_separators() -> None:
    line = passfile_text("shop", "shop_cdc", "a:b\\c*#d e")
    assert line == "127.0.0.1:*:shop:shop_cdc:a\\:b\\\\c*#d e\n"


@pytest.mark.parametrize("bad", ["two\nlines", "carriage\rreturn", "nul\0byte"])
def test_a_password_a_password_file_cannot_carry_is_refused_without_showing_it(bad: str) -> None:
    with pytest.raises(DeploymentError, match="line break or NUL") as info:
        passfile_text("shop", "shop_cdc", bad)
    assert bad not in str(info.value)


def test_the_daemon_names_a_password_file_libpq_would_pass_over(tmp_path: Path) -> None:
    check_passfile("host=/run/pg dbname=shop")  # none named: nothing to check
    path = tmp_path / "pipeline.pgpass"
    dsn = f"host=127.0.0.1 dbname=shop passfile='{path}'"
    with pytest.raises(PgbridgeError, match=r"cannot read .*pipeline\.pgpass.*pgbridge up"):
        check_passfile(dsn)
    path.write_text("127.0.0.1:*:shop:shop_cdc:secret\n")
    path.chmod(0o640)
    with pytest.raises(PgbridgeError, match="mode 640"):
        check_passfile(dsn)
    path.chmod(0o600)
    check_passfile(dsn)
    path.unlink()
    path.mkdir()
    with pytest.raises(PgbridgeError, match="not a plain file"):
        check_passfile(dsn)


def test_members_listen_on_the_loopback_when_there_is_a_pipeline() -> None:
    base = {"name": "shop", "network": {"listen_addresses": ["10.1.2.3"]}}
    assert member_listen_addresses(parse_spec(base)) == ("10.1.2.3",)
    with_pipeline = parse_spec({**base, "pipeline": {"name": "analytics"}})
    assert member_listen_addresses(with_pipeline) == ("10.1.2.3", "127.0.0.1")
