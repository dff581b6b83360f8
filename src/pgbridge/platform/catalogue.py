"""The server's own parameter catalogue (pg_settings), so every name and value is checked by its rules.

pgbridge never keeps a hand-written list of PostgreSQL parameters: names, types, units, ranges, enum
values and contexts come from the installed server. `build_catalogue` reads them without a running
deployment (a throw-away `initdb` plus `postgres --single`), `load_catalogue` caches that per server
version, and `Catalogue.from_connection` reads them live. `Catalogue.validate` then applies the same
parsing rules as PostgreSQL's GUC code (units, fractional unit values, boolean prefixes, enum case), so a
bad value is refused when the spec is read rather than when the server refuses to start, and
`same_value` lets the planner compare '1GB', '1024MB' and '131072' (8kB pages) as the same setting.
"""

from __future__ import annotations

import base64
import difflib
import json
import math
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pgbridge.errors import HostError, MissingBinaryError, PgbridgeError, SpecError, UsageError

if TYPE_CHECKING:
    import psycopg

VarType = Literal["bool", "integer", "real", "string", "enum"]
_VARTYPES: frozenset[str] = frozenset({"bool", "integer", "real", "string", "enum"})

# PostgreSQL's unit tables (guc.c), largest first; memory units are powers of 1024.
_MEMORY_UNITS: tuple[tuple[str, int], ...] = (
    ("TB", 1024**4),
    ("GB", 1024**3),
    ("MB", 1024**2),
    ("kB", 1024),
    ("B", 1),
)
# Time in microseconds so the smallest unit is an integer.
_TIME_UNITS: tuple[tuple[str, int], ...] = (
    ("d", 86_400_000_000),
    ("h", 3_600_000_000),
    ("min", 60_000_000),
    ("s", 1_000_000),
    ("ms", 1_000),
    ("us", 1),
)
_MEMORY_BY_NAME = dict(_MEMORY_UNITS)
_TIME_BY_NAME = dict(_TIME_UNITS)
_UNIT_RE = re.compile(r"^\s*(\d*)\s*([A-Za-z]+)\s*$")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1

# strtol(..., 0) accepts hex and octal; strtod accepts decimals and exponents.
_STRTOL_RE = re.compile(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)")
_STRTOD_RE = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")

_BOOL_WORDS: tuple[tuple[str, bool], ...] = (
    ("true", True),
    ("false", False),
    ("yes", True),
    ("no", False),
)

Scalar = str | int | float | bool
Normalized = int | float | str | bool


class ParameterError(SpecError):
    """A parameter name or value that the server would refuse."""

    def __init__(self, message: str, *, parameter: str, value: str | None = None, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.parameter = parameter
        self.value = value


class UnknownParameterError(ParameterError):
    """The server has no parameter of that name."""


@dataclass(frozen=True)
class _Unit:
    """A setting's base unit: a memory or time kind and how many bytes / microseconds one unit is."""

    kind: Literal["memory", "time"]
    label: str  # as pg_settings prints it, e.g. '8kB'
    size: int  # bytes (memory) or microseconds (time) in one base unit

    @property
    def table(self) -> tuple[tuple[str, int], ...]:
        return _MEMORY_UNITS if self.kind == "memory" else _TIME_UNITS


def _parse_unit(label: str | None) -> _Unit | None:
    if not label:
        return None
    m = _UNIT_RE.match(label)
    if not m:
        return None
    factor = int(m.group(1)) if m.group(1) else 1
    name = m.group(2)
    if name in _MEMORY_BY_NAME:
        return _Unit("memory", label, factor * _MEMORY_BY_NAME[name])
    if name in _TIME_BY_NAME:
        return _Unit("time", label, factor * _TIME_BY_NAME[name])
    return None


@dataclass(frozen=True)
class Setting:
    """One row of pg_settings, reduced to what validation needs."""

    name: str
    vartype: VarType
    unit: str | None
    min_val: float | None
    max_val: float | None
    enumvals: tuple[str, ...]
    context: str
    boot_val: str | None
    short_desc: str

    @property
    def is_static(self) -> bool:
        """Changing it needs a server restart (postmaster context)."""
        return self.context == "postmaster"

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Setting:
        vartype = str(row["vartype"])
        if vartype not in _VARTYPES:
            raise ValueError(f"pg_settings row {row.get('name')!r} has unknown vartype {vartype!r}")
        enumvals = row.get("enumvals") or ()
        if isinstance(enumvals, str):  # '{a,b,c}' when read as text
            enumvals = [v.strip('"') for v in enumvals.strip("{}").split(",") if v]
        return cls(
            name=str(row["name"]),
            vartype=vartype,  # type: ignore[arg-type]  # checked against _VARTYPES above
            unit=row.get("unit") or None,
            min_val=_float_or_none(row.get("min_val")),
            max_val=_float_or_none(row.get("max_val")),
            enumvals=tuple(str(v) for v in enumvals),
            context=str(row["context"]),
            boot_val=None if row.get("boot_val") is None else str(row["boot_val"]),
            short_desc=str(row.get("short_desc") or ""),
        )

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["enumvals"] = list(self.enumvals)
        return row


def _close_matches(word: str, candidates: list[str]) -> list[str]:
    """Up to three names close to `word`, dropping any clearly worse than the best one."""
    scored = [
        (difflib.SequenceMatcher(None, word, c).ratio(), c)
        for c in difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    ]
    if not scored:
        return []
    best = max(score for score, _ in scored)
    return [c for score, c in scored if score >= best - 0.1]


def _float_or_none(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


class Catalogue:
    """The parameters one PostgreSQL server version knows, with PostgreSQL's own value rules."""

    FORMAT = 1

    def __init__(self, settings: Iterable[Setting], *, server_version: str | None = None) -> None:
        self._settings: dict[str, Setting] = {s.name: s for s in settings}
        # GUC names are case-insensitive ('DateStyle' = 'datestyle').
        self._by_lower: dict[str, Setting] = {s.name.lower(): s for s in self._settings.values()}
        self.server_version = server_version

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], *, server_version: str | None = None) -> Catalogue:
        return cls((Setting.from_row(r) for r in rows), server_version=server_version)

    @classmethod
    def from_connection(cls, conn: psycopg.Connection[Any]) -> Catalogue:
        """Read pg_settings from a live server (psycopg 3 connection)."""
        from psycopg.rows import dict_row

        with conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT name, vartype, unit, min_val, max_val, enumvals, context, boot_val, short_desc FROM pg_settings"
            )
            rows = cur.fetchall()
            cur.execute("SELECT version() AS v")
            version_row = cur.fetchone()
        version = str(version_row["v"]) if version_row else None
        return cls.from_rows(rows, server_version=version)

    def to_json(self) -> str:
        doc = {
            "format": self.FORMAT,
            "server_version": self.server_version,
            "settings": [s.to_row() for s in sorted(self._settings.values(), key=lambda s: s.name)],
        }
        return json.dumps(doc, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Catalogue:
        """Read `to_json` output (or a bare JSON array of pg_settings rows)."""
        doc = json.loads(text)
        if isinstance(doc, list):
            return cls.from_rows(doc)
        if not isinstance(doc, dict) or doc.get("format") != cls.FORMAT:
            raise ValueError("not a pgbridge parameter catalogue (unknown format)")
        return cls.from_rows(doc["settings"], server_version=doc.get("server_version"))

    # -- lookup ------------------------------------------------------------------------------------

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._by_lower

    def __iter__(self) -> Iterator[Setting]:
        return iter(self._settings.values())

    def __len__(self) -> int:
        return len(self._settings)

    def get(self, name: str) -> Setting:
        """The setting called `name` (case-insensitive); unknown names suggest close matches."""
        setting = self._by_lower.get(name.lower())
        if setting is not None:
            return setting
        suggestion = [self._by_lower[m].name for m in _close_matches(name.lower(), list(self._by_lower))]
        message = f"unknown parameter '{name}'"
        if suggestion:
            message += f"; did you mean {' or '.join(suggestion)}?"
        hint = None
        if "." in name:
            hint = "extension parameters are only known once the extension's library is loaded"
        raise UnknownParameterError(message, parameter=name, hint=hint)

    def canonical_name(self, name: str) -> str:
        """The server's spelling of `name` ('datestyle' -> 'DateStyle'); unknown names unchanged."""
        setting = self._by_lower.get(name.lower())
        return setting.name if setting else name

    def is_static(self, name: str) -> bool:
        """True when changing `name` needs a restart (postmaster context)."""
        return self.get(name).is_static

    # -- values ------------------------------------------------------------------------------------

    def validate(self, name: str, value: Scalar) -> str:
        """Check `value` the way the server would and return it in a canonical spelling.

        Integers with a unit come back in the largest unit that keeps them whole ('1024MB' -> '1GB',
        '300s' -> '5min'), booleans as on/off, enums in the server's spelling.
        """
        setting = self.get(name)
        if setting.context == "internal":
            raise ParameterError(
                f"{setting.name} is a read-only (internal) parameter and cannot be set",
                parameter=setting.name,
                value=_show(value),
            )
        parsed = _parse(setting, value)
        _check_range(setting, value, parsed)
        return _format(setting, parsed)

    def normalize(self, name: str, value: Scalar) -> Normalized:
        """`value` as a comparable Python value: ints/floats in the setting's base unit, bools, enums."""
        return _parse(self.get(name), value)

    def same_value(self, name: str, a: Scalar, b: Scalar) -> bool:
        """Whether `a` and `b` mean the same setting ('1GB' == '1024MB' == '131072' for 8kB units).

        Values that cannot be parsed (or unknown names) fall back to comparing the text.
        """
        try:
            return self.normalize(name, a) == self.normalize(name, b)
        except ParameterError:
            return _show(a).strip() == _show(b).strip()


# -- parsing (mirrors guc.c parse_int / parse_real / parse_bool / parse_enum) ------------------------


def _show(value: Scalar) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _parse(setting: Setting, value: Scalar) -> Normalized:
    if setting.vartype == "bool":
        return _parse_bool(setting, value)
    if setting.vartype == "enum":
        return _parse_enum(setting, value)
    if setting.vartype == "string":
        return _show(value)
    if isinstance(value, bool):
        raise _bad_number(setting, value)
    if setting.vartype == "integer":
        return _parse_integer(setting, value)
    return _parse_real(setting, value)


def _parse_bool(setting: Setting, value: Scalar) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text == "1":
        return True
    if text == "0":
        return False
    if text:
        for word, result in _BOOL_WORDS:
            if word.startswith(text):
                return result
        if len(text) >= 2:  # 'o' alone is ambiguous
            if "on".startswith(text):
                return True
            if "off".startswith(text):
                return False
    raise ParameterError(
        f"{setting.name}: '{value}' is not a boolean; use on or off (also true/false, yes/no, 1/0)",
        parameter=setting.name,
        value=str(value),
    )


def _parse_enum(setting: Setting, value: Scalar) -> str:
    text = _show(value).strip()
    for option in setting.enumvals:
        if option.lower() == text.lower():
            return option
    raise ParameterError(
        f"{setting.name}: '{text}' is not one of {', '.join(setting.enumvals)}",
        parameter=setting.name,
        value=text,
    )


def _split_number(text: str, *, integer: bool) -> tuple[float, str] | None:
    """Split '1.5GB' into (1.5, 'GB') the way strtol/strtod would; None if no number starts it."""
    if integer:
        m = _STRTOL_RE.match(text)
        if m and text[m.end() : m.end() + 1] not in (".", "e", "E"):
            digits = m.group(2)
            if digits[:2].lower() == "0x":
                base = 16
            elif digits.startswith("0") and len(digits) > 1:
                base = 8  # strtol's octal: '010' is 8, as in the server
            else:
                base = 10
            number = int(digits, base)
            return (float(-number if m.group(1) == "-" else number), text[m.end() :])
    m = _STRTOD_RE.match(text)
    if not m:
        return None
    return float(m.group(0)), text[m.end() :]


def _to_base_unit(unit: _Unit, number: float, unit_text: str) -> float | None:
    """Convert `number unit_text` to the setting's base unit, rounding like convert_to_base_unit."""
    table = unit.table
    wanted = unit_text.strip()
    if not wanted or any(ch.isspace() for ch in wanted):
        return None
    for i, (label, size) in enumerate(table):
        if label.lower() != wanted.lower():
            continue
        converted = number * size / unit.size
        if i + 1 < len(table):
            # A fractional '30.1GB' is rounded to a whole number of the next smaller unit.
            step = table[i + 1][1] / unit.size
            converted = round(converted / step) * step
        return converted
    return None


def _parse_number(setting: Setting, value: Scalar, *, integer: bool) -> float:
    unit = _parse_unit(setting.unit)
    if isinstance(value, int | float):
        number = float(value)
    else:
        split = _split_number(str(value), integer=integer)
        if split is None:
            raise _bad_number(setting, value)
        number, rest = split
        if rest.strip():
            if unit is None:
                raise _bad_number(setting, value)
            converted = _to_base_unit(unit, number, rest)
            if converted is None:
                raise _bad_number(setting, value)
            number = converted
    if math.isnan(number) or math.isinf(number):
        raise _bad_number(setting, value)
    return number


def _parse_integer(setting: Setting, value: Scalar) -> int:
    number = round(_parse_number(setting, value, integer=True))
    if not _INT_MIN <= number <= _INT_MAX:
        raise ParameterError(
            f"{setting.name}: '{value}' exceeds the integer range ({_range_text(setting)})",
            parameter=setting.name,
            value=str(value),
        )
    return number


def _parse_real(setting: Setting, value: Scalar) -> float:
    return _parse_number(setting, value, integer=False)


def _bad_number(setting: Setting, value: Scalar) -> ParameterError:
    unit = _parse_unit(setting.unit)
    whole = "an integer" if setting.vartype == "integer" else "a number"
    hint = None
    if unit is None:
        what = "integer" if setting.vartype == "integer" else "number"
        message = f"{setting.name}: '{_show(value)}' is not a valid {what} (range {_range_text(setting)})"
    else:
        what = "size" if unit.kind == "memory" else "duration"
        labels = ", ".join(label for label, _ in reversed(unit.table))
        message = (
            f"{setting.name}: '{_show(value)}' is not a valid {what}; "
            f"use {whole} with one of {labels} (range {_range_text(setting)})"
        )
        hint = f"a number without a unit counts in {unit.label} units"
    return ParameterError(message, parameter=setting.name, value=_show(value), hint=hint)


def _check_range(setting: Setting, value: Scalar, parsed: Normalized) -> None:
    if setting.vartype not in ("integer", "real") or isinstance(parsed, bool | str):
        return
    low, high = setting.min_val, setting.max_val
    if (low is not None and parsed < low) or (high is not None and parsed > high):
        shown = _show(value).strip()
        interpreted = _format(setting, parsed)
        said = f"'{shown}'" if interpreted == shown else f"'{shown}' (= {interpreted})"
        raise ParameterError(
            f"{setting.name}: {said} is outside the allowed range {_range_text(setting)}",
            parameter=setting.name,
            value=shown,
        )


# -- formatting -------------------------------------------------------------------------------------


def _number_text(number: float) -> str:
    if number == int(number) and abs(number) < 1e15:
        return str(int(number))
    return repr(number)


def _format(setting: Setting, parsed: Normalized) -> str:
    """The canonical spelling of a parsed value (what `validate` returns)."""
    if isinstance(parsed, bool):
        return "on" if parsed else "off"
    if isinstance(parsed, str):
        return parsed
    unit = _parse_unit(setting.unit)
    if unit is None:
        return _number_text(parsed)
    if setting.vartype == "real":
        return f"{_number_text(parsed)}{unit.label}" if parsed else "0"
    if parsed <= 0:
        return str(int(parsed))
    amount = int(parsed) * unit.size
    for label, size in unit.table:
        if amount % size == 0:
            return f"{amount // size}{label}"
    return f"{int(parsed)}{unit.label}"  # unreachable: the smallest unit divides everything


def _approx(setting: Setting, bound: float) -> str:
    """A bound for messages: '8TB' rather than '8589934584kB'."""
    unit = _parse_unit(setting.unit)
    if unit is None:
        return f"{bound:g}" if setting.vartype == "real" else _number_text(bound)
    if bound <= 0:
        return _number_text(bound)
    amount = bound * unit.size
    for label, size in unit.table:
        if amount >= size:
            shown = f"{amount / size:.2f}".rstrip("0").rstrip(".")
            return f"{shown}{label}"
    return f"{bound:g}{unit.label}"


def _range_text(setting: Setting) -> str:
    low = "-inf" if setting.min_val is None else _approx(setting, setting.min_val)
    high = "inf" if setting.max_val is None else _approx(setting, setting.max_val)
    return f"{low} .. {high}"


# -- building from the installed server -------------------------------------------------------------

_BEGIN, _END = "PGBRIDGE-CATALOGUE:", ":PGBRIDGE-END"
_PAYLOAD_RE = re.compile(re.escape(_BEGIN) + r"([A-Za-z0-9+/=]*)" + re.escape(_END))
# One line (single-user mode ends a statement at a newline). COPY's text format escapes backslashes,
# which would mangle JSON, so the document travels as one line of base64 between markers.
_CATALOGUE_SQL = (
    "COPY (SELECT '" + _BEGIN + "' || translate(encode(convert_to(json_agg(json_build_object("
    "'name', name, 'vartype', vartype, 'unit', unit, 'min_val', min_val, 'max_val', max_val, "
    "'enumvals', enumvals, 'context', context, 'boot_val', boot_val, 'short_desc', short_desc"
    ") ORDER BY name)::text, 'UTF8'), 'base64'), E'\\n', '') || '" + _END + "' FROM pg_settings) TO STDOUT"
)
_TIMEOUT = 300.0


def _package_for(bindir: Path) -> str:
    m = re.search(r"postgresql/(\d+)/bin", str(bindir))
    return f"postgresql-{m.group(1)}" if m else "postgresql"


def _binary(bindir: Path, program: str) -> Path:
    path = bindir / program
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise MissingBinaryError(program, _package_for(bindir), path=str(path))
    return path


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _run(argv: list[str], *, what: str, stdin: str | None = None, cwd: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    try:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
            cwd=cwd,
            env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise HostError(f"{what} failed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{what} did not finish within {_TIMEOUT:.0f}s") from exc
    if proc.returncode != 0:
        raise HostError(f"{what} failed (exit code {proc.returncode}):\n{_tail(proc.stderr or proc.stdout)}")
    return proc.stdout


def server_version(bindir: Path) -> str:
    """`postgres --version` output, e.g. 'postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)'."""
    postgres = _binary(bindir, "postgres")
    return _run([str(postgres), "--version"], what="postgres --version").strip()


def build_catalogue(bindir: Path, *, run_as: str | None, workdir: Path) -> Catalogue:
    """Read pg_settings from the server in `bindir` without a running deployment.

    Runs `initdb` into a temporary folder under `workdir` and `postgres --single` on it (as `run_as`
    via runuser when given; the server refuses to run as root), then removes the folder.
    """
    initdb = _binary(bindir, "initdb")
    postgres = _binary(bindir, "postgres")
    prefix: list[str] = []
    owner: pwd.struct_passwd | None = None
    if run_as is not None:
        try:
            owner = pwd.getpwnam(run_as)
        except KeyError:
            raise UsageError(f"user '{run_as}' does not exist") from None
        if run_as != pwd.getpwuid(os.geteuid()).pw_name:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise MissingBinaryError("runuser", "util-linux")
            prefix = [runuser, "-u", run_as, "--"]
    elif os.geteuid() == 0:
        raise UsageError(
            "PostgreSQL cannot run as root; cannot build the parameter catalogue",
            hint="pass the PostgreSQL service user (e.g. run_as='postgres')",
        )
    version = server_version(bindir)
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="pgbridge-catalogue-", dir=workdir))
    try:
        if owner is not None:
            os.chown(tmp, owner.pw_uid, owner.pw_gid)
        datadir = tmp / "data"
        reach = f"; check that {workdir} is reachable by user '{run_as}'" if run_as else ""
        try:
            _run(
                [*prefix, str(initdb), "-D", str(datadir), "--no-sync", "-A", "trust", "-E", "UTF8", "--locale=C"],
                what=f"initdb{reach}",
                cwd=tmp,
            )
            out = _run(
                [*prefix, str(postgres), "--single", "-D", str(datadir), "postgres"],
                what="postgres --single",
                stdin=_CATALOGUE_SQL + "\n",
                cwd=tmp,
            )
        except HostError as exc:
            raise HostError(f"cannot read the parameter catalogue: {exc.message}", hint=exc.hint) from exc
        m = _PAYLOAD_RE.search(out)
        if m is None:
            raise HostError(
                "postgres --single printed no parameter catalogue:\n" + _tail(out),
            )
        rows = json.loads(base64.b64decode(m.group(1)).decode("utf-8"))
        return Catalogue.from_rows(rows, server_version=version)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_name(version: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", version).strip("-")
    return f"pg_settings-{slug}.json"


def load_catalogue(bindir: Path, *, run_as: str | None, cache_dir: Path) -> Catalogue:
    """The catalogue for the server in `bindir`, built once per server version and cached as JSON."""
    version = server_version(bindir)
    path = cache_dir / _cache_name(version)
    if path.is_file():
        try:
            cached = Catalogue.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, KeyError, TypeError):
            cached = None  # damaged or old format: rebuild
        if cached is not None and cached.server_version == version and len(cached):
            return cached
    catalogue = build_catalogue(bindir, run_as=run_as, workdir=cache_dir)
    tmp_name: str | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".pg_settings-", suffix=".tmp", dir=cache_dir)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(catalogue.to_json())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except OSError as exc:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        raise PgbridgeError(f"cannot write the parameter catalogue cache {path}: {exc}") from exc
    return catalogue
