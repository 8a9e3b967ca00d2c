"""The guard walks a schema once: a value's violation reads the same wherever the value sits.

A record's fields are checked by generated code; array items, map entries, the general case of
a union and a schema that is not a record used to be checked by a second implementation of the
same walk, whose messages differed (an invalid string was placed at its length, not its bytes).
"""

from typing import Any

import pytest

from stream_scorer.stages.avro_guard import AvroGuard
from stream_scorer.stages.records import Reason


def v(n: int) -> bytes:
    """Avro's zigzag varint of ``n`` (``n`` >= 0)."""
    u, out = n << 1, bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def rec(t: Any) -> dict[str, Any]:
    return {"type": "record", "name": "R", "fields": [{"name": "f", "type": t}]}


#: 69 enums, then ``string``: index 69 takes two bytes, past the inline one-byte branches.
WIDE_UNION = [{"type": "enum", "name": f"E{i}", "symbols": ["A"]} for i in range(69)] + ["string"]
BAD = b"\xff"  # not UTF-8: "invalid start byte"

# (schema, payload, where the bad string's bytes start)
PLACES: dict[str, tuple[Any, bytes, int]] = {
    "record field": (rec("string"), v(1) + BAD, 1),
    "array item": (rec({"type": "array", "items": "string"}), v(1) + v(1) + BAD + v(0), 2),
    "map key": (rec({"type": "map", "values": "int"}), v(1) + v(1) + BAD + v(0) + v(0), 2),
    "map value": (
        rec({"type": "map", "values": "string"}),
        v(1) + v(1) + b"k" + v(1) + BAD + v(0),
        4,
    ),
    "union branch 69": (rec(WIDE_UNION), v(69) + v(1) + BAD, 3),
    "top-level string": ("string", v(1) + BAD, 1),
}


@pytest.mark.parametrize("place", list(PLACES))
def test_an_invalid_string_is_reported_at_its_bytes_wherever_it_sits(place: str) -> None:
    schema, payload, start = PLACES[place]
    got = AvroGuard(schema).check(payload)
    assert got is not None and got.reason is Reason.INVALID_UTF8
    assert got.message == f"string at byte {start} is not UTF-8: invalid start byte"


@pytest.mark.parametrize("place", list(PLACES))
def test_a_string_cut_short_is_truncated_wherever_it_sits(place: str) -> None:
    schema, payload, start = PLACES[place]
    cut = payload[: start - 1] + v(5) + b"ab"  # announces 5 bytes, 2 follow
    got = AvroGuard(schema).check(cut)
    assert got is not None and got.reason is Reason.TRUNCATED
    assert got.message == f"string at byte {start - 1} announces 5 bytes, 2 left"
