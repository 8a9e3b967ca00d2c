"""The fast path against fastavro + FeatureBuilder, on generated schemas and records."""

from __future__ import annotations

import io
import itertools
import math
import warnings
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Msg

from stream_scorer.fast.path import FastDecoder
from stream_scorer.fast.plan import Unsupported
from stream_scorer.model.manifest import FeatureSpec
from stream_scorer.stages.decode import Decoder
from stream_scorer.stages.features import FeatureBuilder, field_getter

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS_MIN, MS_MAX = -62_135_596_800_000, 253_402_300_799_999
SETTINGS = settings(
    derandomize=True,
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CATEGORY_WORDS = ("a", "b", "", "é")

_names = itertools.count()


def _name(prefix: str) -> str:
    return f"{prefix}{next(_names)}"


# --- schemas and the values that fit them --------------------------------------------------
def _leaf_types() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(["null", "boolean", "int", "long", "float", "double", "string", "bytes"]),
        st.sampled_from(["timestamp-millis", "timestamp-micros"]).map(
            lambda lt: {"type": "long", "logicalType": lt}
        ),
        st.just({"type": "int", "logicalType": "date"}),
        st.lists(st.sampled_from(["A", "B", "a", "C"]), min_size=1, max_size=4, unique=True).map(
            lambda syms: {"type": "enum", "name": _name("E"), "symbols": syms}
        ),
        st.integers(0, 3).map(lambda n: {"type": "fixed", "name": _name("F"), "size": n}),
    )


def _types(depth: int) -> st.SearchStrategy[Any]:
    leaf = _leaf_types()
    if depth <= 0:
        return leaf
    inner = _types(depth - 1)
    return st.one_of(
        leaf,
        leaf.filter(lambda t: t != "null").map(lambda t: ["null", t]),
        leaf.filter(lambda t: t != "null").map(lambda t: [t, "null"]),
        st.just(["null", "string", "long"]),
        inner.map(lambda t: {"type": "array", "items": t}),
        inner.map(lambda t: {"type": "map", "values": t}),
        _records(depth - 1),
        _records(depth - 1).map(lambda r: ["null", r]),
    )


def _records(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.lists(_types(depth), min_size=1, max_size=4).map(
        lambda types: {
            "type": "record",
            "name": _name("R"),
            "fields": [{"name": f"f{i}", "type": t} for i, t in enumerate(types)],
        }
    )


def _values(schema: Any) -> st.SearchStrategy[Any]:
    if isinstance(schema, list):
        return st.one_of(*[_values(b) for b in schema])
    if isinstance(schema, str):
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(10**13), 10**13)),
            "float": st.floats(width=32),
            "double": st.one_of(st.floats(), st.sampled_from([1e39, -1e39, math.nan])),
            "string": st.one_of(st.sampled_from(CATEGORY_WORDS), st.text(max_size=6)),
            "bytes": st.binary(max_size=5),
        }[schema]
    kind = schema["type"]
    logical = schema.get("logicalType")
    if logical == "timestamp-millis":
        return st.integers(MS_MIN, MS_MAX)
    if logical == "timestamp-micros":
        return st.integers(MS_MIN * 1000, MS_MAX * 1000 + 999)
    if logical == "date":
        return st.integers(-719_162, 2_932_896)
    if kind == "enum":
        return st.sampled_from(schema["symbols"])
    if kind == "fixed":
        return st.binary(min_size=schema["size"], max_size=schema["size"])
    if kind == "array":
        return st.lists(_values(schema["items"]), max_size=3)
    if kind == "map":
        return st.dictionaries(st.text(max_size=3), _values(schema["values"]), max_size=3)
    if kind == "record":
        return st.fixed_dictionaries({f["name"]: _values(f["type"]) for f in schema["fields"]})
    return _values(kind)


def _paths(schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every field, through records and nullable records."""
    out = []
    for f in schema["fields"]:
        path = prefix + f["name"]
        out.append(path)
        t = f["type"]
        for branch in t if isinstance(t, list) else [t]:
            if isinstance(branch, dict) and branch.get("type") == "record":
                out.extend(_paths(branch, path + "."))
    return out


ID_TYPES = ["string", "long", "int", "boolean", "double", ["null", "string"], "bytes"]
TIME_TYPES: list[Any] = [
    "long",
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "long", "logicalType": "timestamp-micros"},
    ["null", "long"],
    "string",
]


@st.composite
def cases(draw: st.DrawFn) -> tuple[dict[str, Any], list[FeatureSpec], list[dict[str, Any]]]:
    body = draw(_records(2))
    fields = list(body["fields"])
    fields.insert(
        draw(st.integers(0, len(fields))), {"name": "key", "type": draw(st.sampled_from(ID_TYPES))}
    )
    fields.insert(
        draw(st.integers(0, len(fields))),
        {"name": "when", "type": draw(st.sampled_from(TIME_TYPES))},
    )
    schema = {**body, "fields": fields}
    paths = [*_paths(schema), "nowhere", "f0.deeper.still"]
    specs = []
    for i in range(draw(st.integers(1, 5))):
        transform = draw(st.sampled_from(["number", "category", "hour_of_day", "day_of_week"]))
        cats = ("A", "a", "", "é", "C") if transform == "category" else ()
        specs.append(FeatureSpec(f"x{i}", draw(st.sampled_from(paths)), transform, cats))
    records = draw(st.lists(_values(schema), min_size=1, max_size=6))
    return schema, specs, records


# --- the reference: today's decoder and feature builder, one record at a time ---------------
def _reference(
    schema: dict[str, Any], specs: list[FeatureSpec], msg: Msg
) -> tuple[str | None, Any, Any, Any]:
    """(dead-letter reason or None, feature row, id, event time) as the fastavro path has it."""
    decoded, dead = Decoder(schema, 1 << 20).decode_batch([msg])
    if dead:
        return dead[0].reason, None, None, None
    record = decoded[0].record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float32 overflow: inf
            matrix, rejected = FeatureBuilder(specs).build([record])
    except (OverflowError, ValueError, OSError):
        return "not_timestamp", None, None, None  # features.py crashes; the fast path rejects
    # The fast path also rejects doubles too large for float32 (features.py stores inf):
    # the first failing column, in manifest order, names the dead letter.
    failing = [(j, "non_finite") for j in np.flatnonzero(np.isinf(matrix[0]))]
    names = [s.name for s in specs]
    failing += [(names.index(r.feature), r.reason) for r in rejected]
    if failing:
        return min(failing)[1], None, None, None
    raw_id = field_getter("key")(record)
    when = field_getter("when")(record)
    if isinstance(when, datetime):
        micros = (when - EPOCH) // timedelta(microseconds=1)
        when = micros // 1000 if micros >= 0 else -((-micros) // 1000)
    elif not isinstance(when, int) or isinstance(when, bool):
        when = None
    return None, matrix[0], raw_id, when


def _encode(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _check(schema: dict[str, Any], specs: list[FeatureSpec], payloads: list[bytes]) -> None:
    try:
        fast = FastDecoder(
            schema, specs, id_field="key", event_time_field="when", max_message_bytes=1 << 20
        )
    except Unsupported as exc:
        assert "map" in str(exc)  # the only generated construct it refuses
        return
    msgs = [Msg(p, o=i) for i, p in enumerate(payloads)]
    batch = fast.run(msgs)
    reasons = {d.message.offset(): d.reason for d in batch.dead}
    rows = {m.offset(): i for i, m in enumerate(batch.messages)}
    for msg in msgs:
        reason, row, raw_id, when = _reference(schema, specs, msg)
        assert reasons.get(msg.offset()) == reason, (msg.value(), reason)
        if reason is None:
            i = rows[msg.offset()]
            np.testing.assert_array_equal(batch.matrix[i], row)
            assert str(batch.ids[i]) == str(raw_id) and type(batch.ids[i]) is type(raw_id)
            assert batch.event_ms[i] == when


@SETTINGS
@given(cases())
def test_generated_schemas_and_records_match_fastavro_and_feature_builder(
    case: tuple[dict[str, Any], list[FeatureSpec], list[dict[str, Any]]],
) -> None:
    raw, specs, records = case
    schema = fastavro.parse_schema(raw)
    _check(schema, specs, [_encode(schema, r) for r in records])


@SETTINGS
@given(cases(), st.data())
def test_mutated_payloads_fail_when_fastavro_fails(
    case: tuple[dict[str, Any], list[FeatureSpec], list[dict[str, Any]]], data: st.DataObject
) -> None:
    raw, specs, records = case
    schema = fastavro.parse_schema(raw)
    try:
        fast = FastDecoder(schema, specs, id_field="key", max_message_bytes=1 << 20)
    except Unsupported:
        return
    payloads = []
    for r in records:
        good = bytearray(_encode(schema, r))
        cut = data.draw(st.integers(0, len(good)))
        flips = data.draw(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=3))
        for at, value in flips:
            if good:
                good[at % len(good)] = value
        extra = data.draw(st.binary(max_size=2))
        payloads.append(bytes(good[:cut] if cut < len(good) else good + extra))
    msgs = [Msg(p, o=i) for i, p in enumerate(payloads)]
    batch = fast.run(msgs)
    fast_dead = {d.message.offset(): d for d in batch.dead if d.stage.value == "decode"}
    for msg in msgs:
        _good, ref_dead = Decoder(schema, 1 << 20).decode_batch([msg])
        if ref_dead:  # what fastavro cannot read, the fast path cannot either
            assert msg.offset() in fast_dead, (msg.value(), ref_dead[0].reason)
        elif msg.offset() in fast_dead:  # only a guard fastavro lacks may add a dead letter
            assert fast_dead[msg.offset()].reason in {
                "malformed_avro",  # a boolean byte above 1, a block byte size not filled
                "negative_length",  # of a block byte size, which fastavro ignores
                "bad_enum_index",
                "bad_union_index",
                "varint_too_long",
                "int_out_of_range",
                "count_too_large",
            }, (msg.value(), fast_dead[msg.offset()].reason)
