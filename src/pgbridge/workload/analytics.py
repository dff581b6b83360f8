"""Analytics packs: named sets of SQL files shipped in the package, run on the warehouse or source.

A pack is a folder `packs/<name>/` of `N_<query>.sql` files, run in N order. The first line of
each file is a `-- ` comment that titles it; `{schema}` stands for the application schema (the
warehouse keeps the source's schema names). The SQL is written in the dialect DuckDB and
PostgreSQL share, so the same file runs on both: that is what makes the offload measurable.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any

from pgbridge.errors import UsageError
from pgbridge.types import quote_ident

_FILE = re.compile(r"^(\d+)_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class PackQuery:
    name: str
    title: str
    template: str

    def sql(self, schema: str) -> str:
        return self.template.replace("{schema}", quote_ident(schema))


@dataclass
class QueryResult:
    name: str
    title: str
    columns: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _root() -> Any:
    return resources.files("pgbridge.workload").joinpath("packs")


def pack_names() -> list[str]:
    return sorted(p.name for p in _root().iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def parse_query(filename: str, text: str) -> PackQuery:
    m = _FILE.match(filename)
    if m is None:
        raise ValueError(f"{filename}: pack files are named N_name.sql")
    first = text.lstrip().splitlines()[0] if text.strip() else ""
    title = first[2:].strip() if first.startswith("--") else m.group(2).replace("_", " ")
    return PackQuery(m.group(2), title, text.strip().rstrip(";"))


@functools.cache  # shipped read-only with the package; the demo asks every second
def load_pack(name: str) -> list[PackQuery]:
    if name not in pack_names():
        raise UsageError(f"unknown analytics pack {name!r}", hint="known packs: " + ", ".join(pack_names()))
    files = [f for f in _root().joinpath(name).iterdir() if _FILE.match(f.name)]
    files.sort(key=lambda f: int(_FILE.match(f.name).group(1)))  # type: ignore[union-attr]
    return [parse_query(f.name, f.read_text()) for f in files]


Executor = Callable[[str], tuple[list[str], list[list[Any]]]]


def run(queries: list[PackQuery], schema: str, execute: Executor) -> list[QueryResult]:
    """Run each query; one that fails (`execute` raises PgbridgeError) is reported, the others still run."""
    out = []
    for q in queries:
        r = QueryResult(q.name, q.title)
        started = time.perf_counter()
        try:
            r.columns, r.rows = execute(q.sql(schema))
        except UsageError as e:  # a failed query: reported in the result; the caller decides what fails
            r.error = e.message
        r.seconds = time.perf_counter() - started
        out.append(r)
    return out
