# The C extension built from _copybin.c (see there for the buffers it returns).
_Field = tuple[bytes, bytes | None] | tuple[bytes, bytes, bytes | None]

def decode(buf: bytes, kinds: bytes, scales: bytes, /) -> tuple[int, list[_Field]] | None: ...
