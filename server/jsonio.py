"""JSON in and out of the server: orjson, strict.

Strict in what it accepts, so that no client input can reach a 500: integers past 64 bits, numbers
that overflow a double (`1e400`), `NaN`/`Infinity` literals and nesting deeper than 1024 levels are
refused as malformed (`JSONError`, a `ValueError`), where the standard library would raise
"Exceeds the limit for integer string conversion" or RecursionError, or pass an infinity on.
Encoding writes numpy arrays directly (no per-element Python).
"""

from __future__ import annotations

from typing import Any

import orjson

JSONError = orjson.JSONDecodeError


NON_FINITE = (b"NaN", b"Infinity", b"-Infinity")


def loads(raw: bytes | bytearray | memoryview | str) -> Any:
    """Parse a JSON document; `JSONError` (a ValueError) for anything malformed or out of range."""
    try:
        return orjson.loads(raw)
    except JSONError as err:
        data = raw.encode() if isinstance(raw, str) else bytes(raw)
        if "infinity when parsed" in err.msg or data[err.pos:].startswith(NON_FINITE):
            raise JSONError(f"NaN or infinite numbers, and numbers too large for a double, are not allowed "
                            f"({err.msg})", err.doc, err.pos) from None
        raise


def dumps(doc: Any) -> bytes:
    """Compact JSON bytes; numpy arrays and scalars are written as JSON arrays and numbers."""
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
