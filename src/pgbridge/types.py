"""Small frozen value types: ports, byte sizes, durations and log sequence numbers.

They parse and print themselves so the rest of the code never juggles bare ints and strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

_SIZE_UNITS = {
    "b": 1,
    "kb": 1024,
    "mb": 1024**2,
    "gb": 1024**3,
    "tb": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


@dataclass(frozen=True, order=True)
class ByteSize:
    """A number of bytes; parses '512MB', '2GiB', '1024' (PostgreSQL units are powers of 1024)."""

    bytes: int

    @classmethod
    def parse(cls, text: str | int) -> ByteSize:
        if isinstance(text, int):
            return cls(text)
        m = _SIZE_RE.match(text)
        if not m or m.group(2).lower() not in _SIZE_UNITS | {"": 1}:
            raise ValueError(f"not a size: {text!r} (use e.g. 512MB, 2GB)")
        unit = _SIZE_UNITS.get(m.group(2).lower(), 1)
        return cls(int(float(m.group(1)) * unit))

    @property
    def mb(self) -> int:
        return self.bytes // 1024**2

    def pg(self) -> str:
        """Render in the largest PostgreSQL unit that keeps an integer (kB, MB, GB)."""
        for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
            if self.bytes % factor == 0 and self.bytes >= factor:
                return f"{self.bytes // factor}{unit}"
        return f"{max(1, self.bytes // 1024)}kB"

    def __str__(self) -> str:
        return self.pg()


@dataclass(frozen=True, order=True)
class Port:
    """A TCP port number in 1..65535."""

    number: int

    def __post_init__(self) -> None:
        if not 1 <= self.number <= 65535:
            raise ValueError(f"port {self.number} is outside 1..65535")

    def __int__(self) -> int:
        return self.number

    def __str__(self) -> str:
        return str(self.number)


@total_ordering
@dataclass(frozen=True)
class LSN:
    """A PostgreSQL log sequence number, printed as 'X/Y' like the server does."""

    value: int

    @classmethod
    def parse(cls, text: str) -> LSN:
        hi, sep, lo = text.partition("/")
        if not sep:
            raise ValueError(f"not an LSN: {text!r}")
        return cls((int(hi, 16) << 32) | int(lo, 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __int__(self) -> int:
        return self.value

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, LSN):
            return NotImplemented
        return self.value < other.value

    def __sub__(self, other: LSN) -> int:
        return self.value - other.value


def quote_ident(name: str) -> str:
    """A SQL identifier, double-quoted (PostgreSQL and DuckDB quote alike)."""
    return '"' + name.replace('"', '""') + '"'
