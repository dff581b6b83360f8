# The C extension built from _rowwalk.c (columnar._tuple's compiled form).
from typing import Any

def walk(arr: Any, off: Any, limit: int, kinds: Any, starts: Any, lengths: Any, /) -> bool: ...
