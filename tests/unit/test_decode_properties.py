"""Property-based tests of the guarded decoder (hypothesis, derandomized so CI repeats)."""

import io
import tracemalloc
from collections.abc import Callable
from typing import Any

import fastavro
import pytest
from guard_schemas import EVERYTHING
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import PAYMENT_SCHEMA, Msg, parse_record_schema

from stream_scorer.example.rides import load_ride_schema
from stream_scorer.stages.decode import DECODE_REASONS, Decoder
from stream_scorer.stages.records import DeadLetter, Decoded, Stage

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_BYTES = 1 << 20
SCHEMAS: dict[str, dict[str, Any]] = {
    "ride": load_ride_schema(),
    "payment": parse_record_schema(PAYMENT_SCHEMA),
    "everything": parse_record_schema(EVERYTHING),
}
DECODERS = {name: Decoder(schema, MAX_BYTES) for name, schema in SCHEMAS.items()}
_EPOCH_MAX_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z


def values(
    schema: Any, named: dict[str, Any], stack: tuple[str, ...] = ()
) -> st.SearchStrategy[Any]:
    """A strategy for values of ``schema`` (parsed); recursion stops three records deep."""
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    if isinstance(schema, list):
        usable = [b for b in schema if not (isinstance(b, str) and b in stack)]
        return st.one_of([values(b, named, stack) for b in usable])
    if isinstance(schema, str):
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "float": st.floats(width=32, allow_nan=False),
            "double": st.floats(allow_nan=False),
            "bytes": st.binary(max_size=12),
            "string": st.text(max_size=12),
        }[schema]
    kind, logical = schema["type"], schema.get("logicalType")
    if logical == "timestamp-millis":
        return st.integers(0, _EPOCH_MAX_MS)
    if logical == "date":
        return st.dates()
    if logical == "decimal":
        return st.decimals(min_value=-(10**9), max_value=10**9, places=schema["scale"])
    if logical == "uuid":
        return st.uuids()
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if kind == "array":
        items = schema["items"]
        if isinstance(items, str) and items in stack and len(stack) > 3:
            return st.just([])
        return st.lists(values(items, named, stack), max_size=4)
    if kind == "map":
        return st.dictionaries(
            st.text(max_size=4), values(schema["values"], named, stack), max_size=3
        )
    if kind == "record":
        inner = (*stack, schema["name"]) if len(stack) < 3 else (*stack, schema["name"], *named)
        return st.fixed_dictionaries(
            {f["name"]: values(f["type"], named, inner) for f in schema["fields"]}
        )
    return values(kind, named, stack)


def write(schema: dict[str, Any], record: Any) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def read(schema: dict[str, Any], payload: bytes) -> Any:
    return fastavro.schemaless_reader(io.BytesIO(payload), schema, None)


def payloads(name: str) -> st.SearchStrategy[bytes]:
    schema = SCHEMAS[name]
    return values(schema, schema["__named_schemas"]).map(lambda r: write(schema, r))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_generated_records_decode_exactly_as_fastavro_reads_them(name: str) -> None:
    schema, decoder = SCHEMAS[name], DECODERS[name]

    @PROPERTY
    @given(payloads(name))
    def check(payload: bytes) -> None:
        out = decoder.decode(Msg(payload))
        assert isinstance(out, Decoded), out
        assert out.record == read(schema, payload)

    check()


# --- mutated payloads ----------------------------------------------------------------------

_BIG_COUNTS = [2**31, 2**62, 50_000_000, -50_000_000, -1, 127, 2**63 - 1]


def _zigzag_varint(n: int) -> bytes:
    u = n << 1 if n >= 0 else ((-n) << 1) - 1
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


Mutation = Callable[[bytes], bytes]


@st.composite
def mutation(draw: st.DrawFn) -> Mutation:
    kind = draw(
        st.sampled_from(["flip", "truncate", "insert", "replace", "inflate", "long_varint"])
    )
    at = draw(st.floats(0.0, 1.0))  # a relative position, whatever the payload's length
    if kind == "flip":
        bit = draw(st.integers(0, 7))
        return lambda p: _at(p, at, lambda b, i: b[:i] + bytes([b[i] ^ (1 << bit)]) + b[i + 1 :])
    if kind == "truncate":
        return lambda p: p[: int(len(p) * at)]
    if kind == "insert":
        extra = draw(st.binary(min_size=1, max_size=4))
        return lambda p: _at(p, at, lambda b, i: b[:i] + extra + b[i:])
    if kind == "replace":
        byte = draw(st.integers(0, 255))
        return lambda p: _at(p, at, lambda b, i: b[:i] + bytes([byte]) + b[i + 1 :])
    if kind == "inflate":
        big = _zigzag_varint(draw(st.sampled_from(_BIG_COUNTS)))
        return lambda p: _at(p, at, lambda b, i: b[:i] + big + b[i + 1 :])
    pad = b"\x80" * draw(st.integers(9, 12))  # a varint padded to 10 bytes or more
    return lambda p: _at(p, at, lambda b, i: b[:i] + pad + b[i:])


# Refusals checked against fastavro: it would allocate what a hostile count announces
# (count_too_large, and counts it misreads: varint_too_long, int_out_of_range), and it reads
# and writes ints beyond 32 bits unchanged.
_ORACLE_REASONS = set(DECODE_REASONS) - {"count_too_large", "varint_too_long", "int_out_of_range"}


def _canonical(schema: dict[str, Any], payload: bytes) -> bool:
    """Whether fastavro reads ``payload`` and writes the value back to the very same bytes."""
    try:
        return bool(payload) and write(schema, read(schema, payload)) == payload
    except Exception:
        return False


def _at(payload: bytes, at: float, change: Callable[[bytes, int], bytes]) -> bytes:
    if not payload:
        return payload
    return change(payload, min(len(payload) - 1, int(len(payload) * at)))


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_mutated_payloads_decode_validly_or_become_dead_letters(name: str) -> None:
    schema, decoder = SCHEMAS[name], DECODERS[name]

    @PROPERTY
    @given(payloads(name), st.lists(mutation(), min_size=1, max_size=3))
    def check(payload: bytes, mutations: list[Mutation]) -> None:
        for change in mutations:
            payload = change(payload)
        out = decoder.decode(Msg(payload))  # must not raise
        if isinstance(out, DeadLetter):
            assert out.stage is Stage.DECODE
            assert out.reason in DECODE_REASONS
            assert out.message.value() == payload
            if out.reason in _ORACLE_REASONS:
                assert not _canonical(schema, payload), f"refused a valid payload: {out}"
            return
        assert isinstance(out, Decoded)
        # what passes is what fastavro reads, re-encodes, and reads back to the same value
        again = write(schema, out.record)
        assert write(schema, read(schema, payload)) == again
        back = decoder.decode(Msg(again))
        assert isinstance(back, Decoded)
        assert write(schema, back.record) == again

    check()


# --- hostile counts: refused quickly, without allocating what they announce ----------------

_NULLS = parse_record_schema(
    {
        "type": "record",
        "name": "Hostile",
        "fields": [
            {"name": "nulls", "type": {"type": "array", "items": "null"}},
            {
                "name": "nested",
                "type": {"type": "array", "items": {"type": "array", "items": "null"}},
            },
            {"name": "m", "type": {"type": "map", "values": "null"}},
            {"name": "ints", "type": {"type": "array", "items": "int"}},
        ],
    }
)
_Z = _zigzag_varint
_EMPTY_REST = _Z(0) * 3


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (_Z(50_000_000) + _Z(0) + _EMPTY_REST, "count_too_large"),
        (_Z(-50_000_000) + _Z(0) + _Z(0) + _EMPTY_REST, "count_too_large"),
        (_Z(2**63 - 1) + _Z(0) + _EMPTY_REST, "count_too_large"),
        (_Z(0) + _Z(2) + (_Z(9_000) + _Z(0)) * 2 + _Z(0) + _Z(0) * 2, "count_too_large"),
        (_Z(0) + _Z(1_000) + (_Z(1_000) + _Z(0)) * 1_000 + _Z(0) + _Z(0) * 2, "count_too_large"),
        (_Z(0) * 2 + _Z(50_000_000) + _Z(0) + _Z(0), "count_too_large"),
        (_Z(0) * 3 + _Z(50_000_000) + _Z(1) * 10 + _Z(0), "count_too_large"),
        (_Z(10_000) + _Z(0) + _EMPTY_REST, None),  # exactly the default cap: decodes
    ],
    ids=["nulls", "nulls-block", "nulls-max", "nested", "nested-many", "map", "ints", "at-cap"],
)
def test_hostile_counts_are_refused_with_bounded_memory(payload: bytes, reason: str | None) -> None:
    decoder = Decoder(_NULLS, MAX_BYTES)
    decoder.decode(Msg(payload))  # warm up: compiled walkers, fastavro's caches
    tracemalloc.start()
    try:
        out = decoder.decode(Msg(payload))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if reason is None:
        assert isinstance(out, Decoded)
        assert len(out.record["nulls"]) == 10_000
    else:
        assert isinstance(out, DeadLetter) and out.reason == reason
    assert peak < 512 * 1024, f"peak {peak} bytes"  # 50M Nones would be 400 MB


def test_deep_recursion_is_refused_without_a_recursion_error() -> None:
    schema = parse_record_schema(
        {
            "type": "record",
            "name": "Link",
            "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Link"]}],
        }
    )
    payload = (_Z(1) + _Z(1)) * 200_000 + _Z(1) + _Z(0)
    out = Decoder(schema, MAX_BYTES).decode(Msg(payload))
    assert isinstance(out, DeadLetter) and out.reason == "malformed_avro"
    assert "deeper than 64" in out.error_message
