"""Shared fixtures for unit tests: the real PostgreSQL 15 parameter catalogue, built once per session.

Values are checked against the installed server's pg_settings rather than a hand-written table, so the
tests catch anything the real server would refuse.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgbridge.platform.catalogue import Catalogue, load_catalogue

PG_BINDIR = Path("/usr/lib/postgresql/15/bin")


def pg_run_as() -> str | None:
    """PostgreSQL refuses to run as root: build as the postgres user when the tests run as root."""
    return "postgres" if os.geteuid() == 0 else None


@pytest.fixture(scope="session")
def pg_user() -> str | None:
    return pg_run_as()


@pytest.fixture(scope="session")
def pg_bindir() -> Path:
    if not (PG_BINDIR / "postgres").is_file() or not (PG_BINDIR / "initdb").is_file():
        pytest.skip(f"PostgreSQL 15 is not installed in {PG_BINDIR}")
    return PG_BINDIR


@pytest.fixture(scope="session")
def reachable_tmp() -> Iterator[Path]:
    """A 0755 folder under /tmp the postgres user can enter (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pgbridge-cat-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def catalogue(pg_bindir: Path, reachable_tmp: Path) -> Catalogue:
    cache_dir = reachable_tmp / "cache"
    cache_dir.mkdir()
    cache_dir.chmod(0o755)
    return load_catalogue(pg_bindir, run_as=pg_run_as(), cache_dir=cache_dir)
