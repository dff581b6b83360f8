"""Micro-benchmark: how many pgoutput Insert messages per second the pure decoder parses from memory.

Not a test. Run from the repository root:

    PYTHONPATH=src python bench/pgoutput_parse.py [--messages 500000] [--columns 6]

The synthetic rows look like a typical OLTP table (bigint id, short and medium text, numeric,
timestamptz, one null) in pgoutput's text format; every message is a distinct ``bytes`` object so
the run measures parsing, not caching.
"""

from __future__ import annotations

import argparse
import struct
import time

from pgbridge.cdc.pgoutput import Decoder, Insert, decode

_SAMPLE_VALUES: tuple[bytes | None, ...] = (
    b"{id}",
    b"customer-{id}@example.com",
    b"shipped",
    b"{id}.25",
    b"2024-05-17 12:34:56.789012+00",
    None,
    b"a slightly longer free-text note for row {id}",
    b"t",
)


def _column(value: bytes | None) -> bytes:
    if value is None:
        return b"n"
    return b"t" + struct.pack(">I", len(value)) + value


def build_stream(count: int, columns: int, relation_oid: int = 16384) -> list[bytes]:
    """``count`` Insert messages, each with ``columns`` columns cycling through the sample values."""
    messages = []
    for row in range(count):
        cells = []
        for i in range(columns):
            template = _SAMPLE_VALUES[i % len(_SAMPLE_VALUES)]
            cells.append(None if template is None else template.replace(b"{id}", str(row).encode()))
        body = b"".join(_column(c) for c in cells)
        messages.append(b"I" + struct.pack(">I", relation_oid) + b"N" + struct.pack(">h", columns) + body)
    return messages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500_000)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    stream = build_stream(args.messages, args.columns)
    size = sum(len(m) for m in stream)
    print(f"{len(stream):,} Insert messages, {args.columns} columns, {size / len(stream):.0f} bytes/message on average")
    first = decode(stream[0])
    assert isinstance(first, Insert) and len(first.new) == args.columns

    for label, fn in (("decode()", decode), ("Decoder().decode", Decoder().decode)):
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            for message in stream:
                fn(message)
            best = min(best, time.perf_counter() - start)
        rate = len(stream) / best
        print(
            f"{label:18s} {rate:>12,.0f} messages/s  ({best / len(stream) * 1e6:.2f} us/message, best of {args.rounds})"
        )


if __name__ == "__main__":
    main()
