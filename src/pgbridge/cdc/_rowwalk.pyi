# The C extension built from _rowwalk.c (wire.WireConnection.read's framing, columnar._tuple's walk).
from typing import Any

def split(
    buf: bytes,
    off: int,
    size: int,
    max_messages: int,
    max_bytes: int,
    out: list[bytes],
    tags: bytearray,
    positions: list[int] | None,
    /,
) -> tuple[int, int, int]: ...
def walk(arr: Any, off: Any, limit: int, kinds: Any, starts: Any, lengths: Any, /) -> bool: ...
