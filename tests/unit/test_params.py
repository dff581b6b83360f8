"""Parameter layering, validation messages, unit normalization and the server catalogue itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pgbridge.errors import HostError, MissingBinaryError, PgbridgeError, SpecError, UsageError
from pgbridge.plan import params as params_mod
from pgbridge.plan.instance_classes import INSTANCE_CLASSES
from pgbridge.plan.params import ParamChange, ParamValue, diff_parameters, effective_parameters, with_defaults
from pgbridge.plan.tuning import compute_class_parameters
from pgbridge.platform import catalogue as catalogue_mod
from pgbridge.platform.catalogue import (
    Catalogue,
    ParameterError,
    Setting,
    UnknownParameterError,
    build_catalogue,
    load_catalogue,
)

PROTECTED = frozenset({"ssl", "wal_level", "port", "data_directory", "hba_file", "listen_addresses"})
PLATFORM = {"wal_level": "logical", "ssl": "on", "max_wal_senders": "10", "pg_stat_statements.track": "all"}


def computed() -> dict[str, str]:
    return compute_class_parameters(INSTANCE_CLASSES["db.medium"], storage_type="ssd", storage_gb=100)


def merge(catalogue: Catalogue, *groups: tuple[str, dict[str, str | int | float | bool]]) -> dict[str, ParamValue]:
    return effective_parameters(
        platform=PLATFORM, computed=computed(), groups=list(groups), catalogue=catalogue, protected=PROTECTED
    )


# -- layering ---------------------------------------------------------------------------------------


def test_layers_with_provenance(catalogue: Catalogue) -> None:
    merged = merge(
        catalogue,
        ("oltp", {"work_mem": "16MB", "shared_buffers": "1536MB", "log_connections": True}),
        ("reporting", {"work_mem": "64MB", "statement_timeout": "30s"}),
    )
    assert merged["wal_level"] == ParamValue("wal_level", "logical", "platform")
    assert merged["max_connections"] == ParamValue("max_connections", "450", "class")
    assert merged["shared_buffers"] == ParamValue("shared_buffers", "1536MB", "group:oltp")
    assert merged["work_mem"] == ParamValue("work_mem", "64MB", "group:reporting")  # later group wins
    assert merged["log_connections"] == ParamValue("log_connections", "on", "group:oltp")
    assert merged["statement_timeout"].value == "30s"
    # extension parameters the bare server does not know are kept as given
    assert merged["pg_stat_statements.track"] == ParamValue("pg_stat_statements.track", "all", "platform")


def test_group_values_are_canonicalized(catalogue: Catalogue) -> None:
    merged = merge(
        catalogue,
        ("g", {"shared_buffers": "1024MB", "checkpoint_timeout": 1800, "datestyle": "iso, dmy", "jit": "yes"}),
    )
    assert merged["shared_buffers"].value == "1GB"
    assert merged["checkpoint_timeout"].value == "30min"
    assert merged["jit"].value == "on"
    # keyed by the server's spelling of the name
    assert merged["DateStyle"] == ParamValue("DateStyle", "iso, dmy", "group:g")
    assert "datestyle" not in merged


def test_class_overrides_platform(catalogue: Catalogue) -> None:
    merged = effective_parameters(
        platform={"max_connections": "100"},
        computed={"max_connections": "450"},
        groups=[],
        catalogue=catalogue,
        protected=PROTECTED,
    )
    assert merged == {"max_connections": ParamValue("max_connections", "450", "class")}


def test_group_unknown_name_suggests(catalogue: Catalogue) -> None:
    with pytest.raises(UnknownParameterError) as err:
        merge(catalogue, ("oltp", {"shared_bufers": "1GB"}))
    assert str(err.value).startswith("parameter group 'oltp': unknown parameter 'shared_bufers'")
    assert "did you mean shared_buffers?" in str(err.value)


def test_group_bad_size_names_group_value_and_allowed(catalogue: Catalogue) -> None:
    with pytest.raises(ParameterError) as err:
        merge(catalogue, ("oltp", {"shared_buffers": "3XB"}))
    assert err.value.message == (
        "parameter group 'oltp': shared_buffers: '3XB' is not a valid size; "
        "use an integer with one of B, kB, MB, GB, TB (range 128kB .. 8TB)"
    )
    assert isinstance(err.value, SpecError)
    assert err.value.parameter == "shared_buffers" and err.value.value == "3XB"


def test_group_bad_enum(catalogue: Catalogue) -> None:
    with pytest.raises(
        ParameterError,
        match=r"parameter group 'g': synchronous_commit: 'sometimes' is not one of"
        r" local, remote_write, remote_apply, on, off",
    ):
        merge(catalogue, ("g", {"synchronous_commit": "sometimes"}))


def test_group_out_of_range(catalogue: Catalogue) -> None:
    with pytest.raises(ParameterError) as err:
        merge(catalogue, ("big", {"max_connections": 300_000}))
    assert "parameter group 'big': max_connections: '300000' is outside the allowed range 1 .. 262143" in str(err.value)


@pytest.mark.parametrize("name", ["ssl", "wal_level", "PORT", "data_directory"])
def test_protected_refused(catalogue: Catalogue, name: str) -> None:
    with pytest.raises(ParameterError) as err:
        merge(catalogue, ("oltp", {name: "on"}))
    assert f"parameter group 'oltp': {name} is managed by pgbridge" in str(err.value)


def test_internal_refused(catalogue: Catalogue) -> None:
    with pytest.raises(ParameterError, match="wal_segment_size is a read-only"):
        merge(catalogue, ("g", {"wal_segment_size": "32MB"}))


def test_bad_computed_value_is_reported(catalogue: Catalogue) -> None:
    with pytest.raises(ParameterError, match="value computed for the instance class: work_mem"):
        effective_parameters(
            platform={}, computed={"work_mem": "1kB"}, groups=[], catalogue=catalogue, protected=PROTECTED
        )


def test_with_defaults_fills_boot_values(catalogue: Catalogue) -> None:
    full = with_defaults(merge(catalogue), catalogue)
    assert full["fsync"] == ParamValue("fsync", "on", "default")
    assert full["shared_buffers"].source == "class"
    assert "server_version" not in full  # internal


# -- diff -------------------------------------------------------------------------------------------


def test_diff_compares_by_meaning(catalogue: Catalogue) -> None:
    desired = merge(catalogue, ("g", {"log_connections": "true", "work_mem": "8MB"}))
    current = {name: pv.value for name, pv in desired.items()}
    # pg_settings.setting spellings: base units, on/off
    current.update(shared_buffers="131072", log_connections="on", work_mem="8192", checkpoint_timeout="900")
    current["effective_cache_size"] = "393216"
    assert diff_parameters(desired, current, catalogue) == []


def test_diff_reports_changes_with_static_flag(catalogue: Catalogue) -> None:
    desired = merge(catalogue, ("g", {"work_mem": "8MB", "shared_buffers": "2GB"}))
    current = {name: pv.value for name, pv in desired.items()}
    current.update(shared_buffers="16384", work_mem="4096", pg_stat_statements_track="top")
    del current["max_wal_senders"]
    current["pg_stat_statements.track"] = "top"
    changes = diff_parameters(desired, current, catalogue)
    assert changes == [
        ParamChange("max_wal_senders", None, "10", static=True),
        ParamChange("pg_stat_statements.track", "top", "all", static=True),  # unknown: assume restart
        ParamChange("shared_buffers", "16384", "2GB", static=True),
        ParamChange("work_mem", "4096", "8MB", static=False),
    ]


# -- catalogue values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("shared_buffers", "1GB", "1024MB"),
        ("shared_buffers", "1GB", "131072"),
        ("shared_buffers", "1gb", " 1024 MB "),
        ("shared_buffers", "1.5GB", "1536MB"),
        ("shared_buffers", ".5GB", "512MB"),
        ("shared_buffers", 65536, "512MB"),
        ("work_mem", "4MB", "4096"),
        ("work_mem", "1.5kB", "2kB"),  # rounded to the base unit like the server (rint)
        ("maintenance_work_mem", "30.1GB", "30822MB"),  # fractional units round to the next smaller unit
        ("checkpoint_timeout", "5min", "300"),
        ("checkpoint_timeout", "300s", "300000ms"),
        ("checkpoint_timeout", "0.25h", "15min"),
        ("statement_timeout", "1.5s", "1500"),
        ("vacuum_cost_delay", "500us", "0.5"),
        ("random_page_cost", "4", "4.0"),
        ("fsync", "on", "true"),
        ("fsync", "yes", "1"),
        ("fsync", "TR", True),
        ("fsync", "of", "false"),
        ("fsync", "n", "0"),
        ("wal_level", "LOGICAL", "logical"),
        ("synchronous_commit", False, "off"),
        ("max_connections", "1e3", "1000"),
        ("max_connections", "0x10", "16"),  # strtol rules, like the server
    ],
)
def test_same_value(catalogue: Catalogue, name: str, a: str | int | bool, b: str | int | bool) -> None:
    assert catalogue.same_value(name, a, b)


@pytest.mark.parametrize(
    ("name", "a", "b"),
    [
        ("shared_buffers", "1GB", "1000MB"),
        ("checkpoint_timeout", "5min", "5"),
        ("fsync", "on", "off"),
        ("application_name", "a", "b"),
        ("no_such_param", "1", "2"),
    ],
)
def test_not_same_value(catalogue: Catalogue, name: str, a: str, b: str) -> None:
    assert not catalogue.same_value(name, a, b)


@pytest.mark.parametrize(
    ("name", "value", "canonical"),
    [
        ("shared_buffers", "1024MB", "1GB"),
        ("shared_buffers", "131072", "1GB"),
        ("shared_buffers", "1.5GB", "1536MB"),
        ("wal_buffers", "-1", "-1"),
        ("checkpoint_timeout", "900", "15min"),
        ("checkpoint_timeout", "1d", "1d"),
        ("log_min_duration_statement", "250ms", "250ms"),
        ("vacuum_cost_delay", "500us", "0.5ms"),
        ("random_page_cost", "1.1", "1.1"),
        ("random_page_cost", "4.0", "4"),
        ("checkpoint_completion_target", 0.9, "0.9"),
        ("fsync", "yes", "on"),
        ("fsync", False, "off"),
        ("wal_level", "Logical", "logical"),
        ("application_name", "my app", "my app"),
    ],
)
def test_validate_canonical(catalogue: Catalogue, name: str, value: str | float | bool, canonical: str) -> None:
    assert catalogue.validate(name, value) == canonical


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "shared_buffers",
            "3XB",
            "shared_buffers: '3XB' is not a valid size; use an integer with one of B, kB, MB, GB, TB"
            " (range 128kB .. 8TB)",
        ),
        ("wal_level", "full", "wal_level: 'full' is not one of minimal, replica, logical"),
        ("shared_buffers", "100kB", "shared_buffers: '100kB' (= 96kB) is outside the allowed range 128kB .. 8TB"),
        ("shared_buffers", True, "shared_buffers: 'on' is not a valid size"),
        ("checkpoint_timeout", "10s", "checkpoint_timeout: '10s' is outside the allowed range 30s .. 1d"),
        (
            "checkpoint_timeout",
            "5m",
            "checkpoint_timeout: '5m' is not a valid duration; use an integer with one of us, ms, s, min, h, d",
        ),
        (
            "checkpoint_completion_target",
            "1.5",
            "checkpoint_completion_target: '1.5' is outside the allowed range 0 .. 1",
        ),
        ("random_page_cost", "cheap", "random_page_cost: 'cheap' is not a valid number"),
        ("max_connections", "20MB", "max_connections: '20MB' is not a valid integer (range 1 .. 262143)"),
        ("work_mem", "1e12", "work_mem: '1e12' exceeds the integer range"),
        ("fsync", "o", "fsync: 'o' is not a boolean; use on or off"),
        ("fsync", "maybe", "fsync: 'maybe' is not a boolean"),
        ("server_version", "16", "server_version is a read-only (internal) parameter and cannot be set"),
    ],
)
def test_validate_errors(catalogue: Catalogue, name: str, value: str | bool, message: str) -> None:
    with pytest.raises(ParameterError) as err:
        catalogue.validate(name, value)
    assert err.value.message.startswith(message), err.value.message


def test_unknown_names(catalogue: Catalogue) -> None:
    with pytest.raises(
        UnknownParameterError, match=r"unknown parameter 'max_conections'; did you mean max_connections\?"
    ):
        catalogue.get("max_conections")
    with pytest.raises(UnknownParameterError) as err:
        catalogue.validate("pg_stat_statements.max", "1000")
    assert "extension" in str(err.value)
    with pytest.raises(UnknownParameterError) as err:
        catalogue.get("zzzzzz")
    assert "did you mean" not in str(err.value)


def test_names_are_case_insensitive(catalogue: Catalogue) -> None:
    assert catalogue.get("datestyle").name == "DateStyle"
    assert catalogue.canonical_name("TIMEZONE") == "TimeZone"
    assert "Shared_Buffers" in catalogue


def test_static_detection(catalogue: Catalogue) -> None:
    assert catalogue.is_static("shared_buffers")
    assert catalogue.is_static("max_connections")
    assert catalogue.is_static("wal_level")
    assert not catalogue.is_static("work_mem")
    assert not catalogue.is_static("checkpoint_timeout")  # sighup
    assert not catalogue.is_static("log_min_duration_statement")  # superuser
    with pytest.raises(UnknownParameterError):
        catalogue.is_static("nope")


def test_json_round_trip(catalogue: Catalogue) -> None:
    again = Catalogue.from_json(catalogue.to_json())
    assert again.server_version == catalogue.server_version
    assert list(again) == sorted(catalogue, key=lambda s: s.name)
    assert again.get("shared_buffers") == catalogue.get("shared_buffers")


def test_from_rows_accepts_text_arrays() -> None:
    cat = Catalogue.from_rows(
        [
            {
                "name": "mode",
                "vartype": "enum",
                "unit": None,
                "min_val": None,
                "max_val": None,
                "enumvals": "{fast,safe}",
                "context": "sighup",
                "boot_val": "safe",
                "short_desc": "x",
            },
            {
                "name": "size",
                "vartype": "integer",
                "unit": "kB",
                "min_val": "64",
                "max_val": "2147483647",
                "enumvals": None,
                "context": "postmaster",
                "boot_val": "64",
                "short_desc": "y",
            },
        ]
    )
    assert cat.get("mode").enumvals == ("fast", "safe")
    assert cat.validate("mode", "FAST") == "fast"
    assert cat.get("size") == Setting("size", "integer", "kB", 64.0, 2147483647.0, (), "postmaster", "64", "y")
    assert cat.is_static("size")
    assert cat.validate("size", "2MB") == "2MB"


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        Catalogue.from_json('{"format": 99}')


# -- building from the installed server ---------------------------------------------------------------


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pgbridge-cat-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_build_catalogue_from_real_server(pg_bindir: Path, pg_user: str | None, reachable_dir: Path) -> None:
    cat = build_catalogue(pg_bindir, run_as=pg_user, workdir=reachable_dir)
    shared_buffers = cat.get("shared_buffers")
    assert shared_buffers.unit == "8kB"
    assert shared_buffers.context == "postmaster"
    assert shared_buffers.vartype == "integer"
    assert "logical" in cat.get("wal_level").enumvals
    assert cat.server_version and "15." in cat.server_version
    assert len(cat) > 300
    assert list(reachable_dir.iterdir()) == []  # the throw-away cluster is gone


def test_load_catalogue_caches_per_version(
    pg_bindir: Path, pg_user: str | None, reachable_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load_catalogue(pg_bindir, run_as=pg_user, cache_dir=reachable_dir)
    files = [p.name for p in reachable_dir.iterdir()]
    assert len(files) == 1 and files[0].startswith("pg_settings-") and "15." in files[0]

    def no_build(*args: object, **kwargs: object) -> Catalogue:
        raise AssertionError("catalogue rebuilt although it is cached")

    monkeypatch.setattr(catalogue_mod, "build_catalogue", no_build)
    second = load_catalogue(pg_bindir, run_as=pg_user, cache_dir=reachable_dir)
    assert second.get("shared_buffers") == first.get("shared_buffers")
    assert len(second) == len(first)


def test_damaged_cache_is_rebuilt(pg_bindir: Path, pg_user: str | None, reachable_dir: Path) -> None:
    first = load_catalogue(pg_bindir, run_as=pg_user, cache_dir=reachable_dir)
    (cache_file,) = reachable_dir.iterdir()
    cache_file.write_text("{not json")
    again = load_catalogue(pg_bindir, run_as=pg_user, cache_dir=reachable_dir)
    assert len(again) == len(first)
    Catalogue.from_json(cache_file.read_text())


def test_missing_binaries(tmp_path: Path) -> None:
    with pytest.raises(MissingBinaryError, match="initdb"):
        build_catalogue(tmp_path / "bin", run_as=None, workdir=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_root_without_run_as_is_refused(pg_bindir: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot run as root"):
        build_catalogue(pg_bindir, run_as=None, workdir=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_subprocess_failure_carries_stderr(pg_bindir: Path, tmp_path: Path) -> None:
    # pytest's tmp_path lives in a root-only folder the postgres user cannot enter
    with pytest.raises(HostError) as err:
        build_catalogue(pg_bindir, run_as="postgres", workdir=tmp_path / "unreachable")
    text = str(err.value)
    assert "initdb" in text and "reachable by user 'postgres'" in text
    assert "ermission denied" in text  # the stderr tail
    assert list((tmp_path / "unreachable").iterdir()) == []


def test_errors_belong_to_the_tree() -> None:
    assert issubclass(ParameterError, SpecError)
    assert issubclass(UnknownParameterError, PgbridgeError)
    assert params_mod.group_source("oltp") == "group:oltp"


# -- live server -------------------------------------------------------------------------------------


@pytest.fixture
def live_server(pg_bindir: Path, pg_user: str | None, reachable_dir: Path) -> Iterator[Path]:
    """A throw-away PostgreSQL listening only on a unix socket; yields the socket folder."""
    user = pg_user
    prefix = ["runuser", "-u", user, "--"] if user else []
    if user:
        shutil.chown(reachable_dir, user)
    data, sock = reachable_dir / "data", reachable_dir / "sock"
    subprocess.run(
        [*prefix, str(pg_bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
        cwd=reachable_dir,
    )
    sock.mkdir()
    if user:
        shutil.chown(sock, user)
    opts = f"-k {sock} -c listen_addresses='' -c port=54329"
    subprocess.run(
        [
            *prefix,
            str(pg_bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-w",
            "-l",
            str(reachable_dir / "log"),
            "start",
        ],
        check=True,
        capture_output=True,
        cwd=reachable_dir,
    )
    try:
        yield sock
    finally:
        subprocess.run(
            [*prefix, str(pg_bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            cwd=reachable_dir,
            check=False,
        )


@pytest.mark.integration
def test_from_connection_matches_build(live_server: Path, catalogue: Catalogue) -> None:
    import psycopg

    with psycopg.connect(host=str(live_server), port=54329, user="postgres", dbname="postgres") as conn:
        live = Catalogue.from_connection(conn)
    assert {s.name for s in live} == {s.name for s in catalogue}
    assert live.get("shared_buffers") == catalogue.get("shared_buffers")
    assert live.get("wal_level") == catalogue.get("wal_level")
    assert live.server_version and "PostgreSQL 15" in live.server_version
