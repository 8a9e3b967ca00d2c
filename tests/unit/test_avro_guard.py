import io
from typing import Any

import fastavro
import pytest
from guard_schemas import EVERYTHING, LINKED

from stream_scorer.stages.avro_guard import DECODE_REASONS, AvroGuard


def varint(u: int) -> bytes:
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def v(n: int) -> bytes:
    """Avro's zigzag varint of ``n``."""
    return varint(n << 1 if n >= 0 else ((-n) << 1) - 1)


def rec(*types: Any) -> dict[str, Any]:
    return {
        "type": "record",
        "name": "R",
        "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(types)],
    }


COLOR = {"type": "enum", "name": "Color", "symbols": ["R", "G", "B"]}
BIG_ENUM = {"type": "enum", "name": "Big", "symbols": [f"S{i}" for i in range(100)]}
NOTHING = {"type": "record", "name": "Nothing", "fields": []}


def array(items: Any) -> dict[str, Any]:
    return {"type": "array", "items": items}


def amap(values: Any) -> dict[str, Any]:
    return {"type": "map", "values": values}


CASES: list[tuple[str, dict[str, Any], bytes, str | None]] = [
    # varints and ints
    ("int ok", rec("int"), v(-5), None),
    ("int max", rec("int"), v(2**31 - 1), None),
    ("int min", rec("int"), v(-(2**31)), None),
    ("int non-canonical zero", rec("int"), b"\x80\x80\x00", None),
    ("no bytes", rec("int"), b"", "truncated"),
    ("varint cut", rec("int"), b"\x80", "truncated"),
    ("varint cut at 9", rec("long"), b"\x80" * 9, "truncated"),
    ("varint 11 bytes", rec("long"), b"\x80" * 10 + b"\x00", "varint_too_long"),
    ("varint 10 continuation bytes", rec("long"), b"\xff" * 10, "varint_too_long"),
    ("int over 32 bits", rec("int"), v(2**31), "int_out_of_range"),
    ("int under 32 bits", rec("int"), v(-(2**31) - 1), "int_out_of_range"),
    ("long max", rec("long"), v(2**63 - 1), None),
    ("long min", rec("long"), v(-(2**63)), None),
    ("long over 64 bits", rec("long"), varint(2**64), "int_out_of_range"),
    # strings and bytes
    ("string ok", rec("string"), v(2) + "é".encode(), None),
    ("string negative length", rec("string"), v(-1), "negative_length"),
    ("string longer than payload", rec("string"), v(5) + b"abc", "truncated"),
    ("string of 2**40 bytes", rec("string"), v(2**40) + b"abc", "truncated"),
    ("string invalid utf8", rec("string"), v(2) + b"\xff\xfe", "invalid_utf8"),
    ("string surrogate", rec("string"), v(3) + b"\xed\xa0\x80", "invalid_utf8"),
    ("string long length varint", rec("string"), v(200) + b"a" * 200, None),
    ("string long length, negative", rec("string"), v(-200) + b"a" * 200, "negative_length"),
    ("bytes any", rec("bytes"), v(2) + b"\xff\xfe", None),
    ("bytes negative length", rec("bytes"), v(-3), "negative_length"),
    ("bytes too long", rec("bytes"), v(3) + b"ab", "truncated"),
    # fixed-size values
    ("boolean 1", rec("boolean"), b"\x01", None),
    ("boolean 2", rec("boolean"), b"\x02", "malformed_avro"),
    ("boolean missing", rec("int", "boolean"), v(1), "truncated"),
    ("float short", rec("float"), b"\x00\x00\x00", "truncated"),
    ("double short", rec("double"), b"\x00" * 7, "truncated"),
    ("double ok", rec("double"), b"\x00" * 8, None),
    ("fixed short", rec({"type": "fixed", "name": "F", "size": 4}), b"abc", "truncated"),
    ("fixed ok", rec({"type": "fixed", "name": "F", "size": 4}), b"abcd", None),
    # enums and unions
    ("enum last", rec(COLOR), v(2), None),
    ("enum past the end", rec(COLOR), v(3), "bad_enum_index"),
    ("enum -1", rec(COLOR), v(-1), "bad_enum_index"),
    ("enum index over 32 bits", rec(COLOR), v(2**33), "int_out_of_range"),
    ("enum two-byte index", rec(BIG_ENUM), v(99), None),
    ("enum two-byte index past the end", rec(BIG_ENUM), v(100), "bad_enum_index"),
    ("union ok", rec(["null", "string"]), v(1) + v(1) + b"a", None),
    ("union null", rec(["null", "string"]), v(0), None),
    ("union past the end", rec(["null", "string"]), v(2), "bad_union_index"),
    ("union -1", rec(["null", "string"]), v(-1), "bad_union_index"),
    ("union huge", rec(["null", "string"]), v(2**40), "bad_union_index"),
    ("union branch truncated", rec(["null", "string"]), v(1) + v(4) + b"a", "truncated"),
    ("union branch enum bad", rec(["null", COLOR]), v(1) + v(7), "bad_enum_index"),
    # arrays and maps
    ("array ok", rec(array("int")), v(3) + v(1) + v(2) + v(3) + v(0), None),
    ("array block ok", rec(array("int")), v(-2) + v(2) + v(1) + v(2) + v(0), None),
    ("array no terminator", rec(array("int")), v(1) + v(1), "truncated"),
    ("array 50M ints", rec(array("int")), v(50_000_000) + v(0), "count_too_large"),
    ("array 2**62 ints", rec(array("int")), v(2**62) + v(0), "count_too_large"),
    ("array count over 64 bits", rec(array("int")), varint(2**65), "int_out_of_range"),
    ("array doubles over bytes left", rec(array("double")), v(2) + b"\x00" * 15, "count_too_large"),
    ("array block negative size", rec(array("int")), v(-2) + v(-1), "negative_length"),
    ("array block size past end", rec(array("int")), v(-2) + v(100) + v(1), "truncated"),
    (
        "array block size wrong",
        rec(array("int")),
        v(-2) + v(3) + v(1) + v(2) + v(0),
        "malformed_avro",
    ),
    ("array<null> 50M", rec(array("null")), v(50_000_000) + v(0), "count_too_large"),
    ("array<null> 50M block", rec(array("null")), v(-50_000_000) + v(0) + v(0), "count_too_large"),
    ("array<null> at the cap", rec(array("null")), v(10_000) + v(0), None),
    ("array<null> over the cap", rec(array("null")), v(10_001) + v(0), "count_too_large"),
    (
        "array<null> cap over blocks",
        rec(array("null")),
        v(6000) + v(6000) + v(0),
        "count_too_large",
    ),
    ("array<empty record> over cap", rec(array(NOTHING)), v(10_001) + v(0), "count_too_large"),
    (
        "nested array<null> over cap",
        rec(array(array("null"))),
        v(3) + (v(4000) + v(0)) * 3 + v(0),
        "count_too_large",
    ),
    ("map ok", rec(amap("int")), v(1) + v(1) + b"k" + v(7) + v(0), None),
    ("map<null> 50M", rec(amap("null")), v(50_000_000) + v(0), "count_too_large"),
    ("map key invalid utf8", rec(amap("null")), v(1) + v(1) + b"\xff" + v(0), "invalid_utf8"),
    ("map key negative", rec(amap("null")), v(1) + v(-1) + v(0), "negative_length"),
    # whole payload
    ("trailing byte", rec("int"), v(1) + b"\x00", "trailing_bytes"),
    ("first problem wins", rec("string", COLOR), v(1) + b"\xff" + v(9), "invalid_utf8"),
    ("empty record, empty payload", rec(), b"", None),
    ("empty record, one byte", rec(), b"\x00", "trailing_bytes"),
]


@pytest.mark.parametrize(
    ("schema", "payload", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_guard_reason(schema: dict[str, Any], payload: bytes, reason: str | None) -> None:
    got = AvroGuard(schema).check(payload)
    assert (None if got is None else got.reason) == reason
    if got is not None:
        assert got.reason in DECODE_REASONS
        assert got.message
    else:  # what the guard passes, fastavro reads to the last byte
        buf = io.BytesIO(payload)
        fastavro.schemaless_reader(buf, fastavro.parse_schema(schema), None)
        assert buf.tell() == len(payload)


def test_zero_size_cap_is_configurable() -> None:
    payload = v(500) + v(0)
    assert AvroGuard(rec(array("null"))).check(payload) is None
    got = AvroGuard(rec(array("null")), max_zero_size_items=499).check(payload)
    assert got is not None and got.reason == "count_too_large"


def link_chain(depth: int) -> bytes:
    """A Link list ``depth`` records deep: each record v=1, then branch 1 (another Link)."""
    return (v(1) + v(1)) * (depth - 1) + v(1) + v(0)


@pytest.mark.parametrize(
    ("depth", "max_depth", "reason"),
    [
        (1, 64, None),
        (65, 64, None),
        (66, 64, "malformed_avro"),
        (11, 10, None),
        (12, 10, "malformed_avro"),
        (50_000, 64, "malformed_avro"),
    ],
)
def test_recursion_depth_is_bounded(depth: int, max_depth: int, reason: str | None) -> None:
    got = AvroGuard(LINKED, max_depth=max_depth).check(link_chain(depth))
    assert (None if got is None else got.reason) == reason


def test_guard_accepts_what_fastavro_writes_for_every_type() -> None:
    import datetime
    import decimal
    import uuid

    leaf: dict[str, Any] = {"label": "leaf", "children": [], "next": None}
    record = {
        "i": -(2**31),
        "l": 2**62,
        "f": 1.5,
        "d": float("nan"),
        "flag": True,
        "s": "héllo ✓",
        "raw": b"\x00\xff",
        "color": "G",
        "four": b"abcd",
        "choice": "B",
        "tags": ["a", "b"],
        "nulls": [None] * 3,
        "scores": {"x": None, "y": [1, -2, 3]},
        "when": datetime.datetime(2026, 11, 23, 12, tzinfo=datetime.UTC),
        "day": datetime.date(2026, 11, 23),
        "price": decimal.Decimal("-12.34"),
        "uid": uuid.UUID(int=7),
        "tree": {"label": "root", "children": [leaf, leaf], "next": {**leaf, "next": leaf}},
        "nothings": [{}, {}],
        "nested": [[None], [], [None, None]],
        "lookup": {"a": None, "b": 5, "c": leaf},
    }
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(EVERYTHING), record)
    payload = buf.getvalue()
    guard = AvroGuard(fastavro.parse_schema(EVERYTHING))
    assert guard.check(payload) is None
    got = guard.check(payload + b"\x00")
    assert got is not None and got.reason == "trailing_bytes"
    # every strict prefix is refused (an array cut short announces more items than bytes left)
    refusals = [guard.check(payload[:n]) for n in range(len(payload))]
    assert all(r is not None for r in refusals)
    assert {r.reason for r in refusals if r} == {"truncated", "count_too_large"}


def test_a_top_level_union_with_a_recursive_record() -> None:
    schema = [
        "null",
        {"type": "record", "name": "A", "fields": [{"name": "next", "type": ["null", "A"]}]},
    ]
    guard = AvroGuard(schema)
    assert guard.check(v(1) + v(1) + v(0)) is None  # an A whose next is an A whose next is null
    got = guard.check(v(1) + v(1) + v(2))
    assert got is not None and got.reason == "bad_union_index"
