# The C extension built from _rowwalk.c (wire.WireConnection.read's framing, columnar's walk and text arrays).
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
def strings(arr: Any, starts: Any, lengths: Any, valid: Any, /) -> tuple[bytes, bytes, bytes | None, int]: ...
def walk(arr: Any, off: Any, limit: int, kinds: Any, starts: Any, lengths: Any, /) -> bool: ...
