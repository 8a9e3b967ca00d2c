"""The fast path against fastavro + FeatureBuilder, on generated schemas and records."""

from __future__ import annotations

import io
import itertools
import math
import warnings
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Msg, parse_record_schema

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.fast.path import FastColumns
from stream_scorer.fast.plan import Unsupported
from stream_scorer.stages.decode import Decoder
from stream_scorer.stages.features import FeatureBuilder, field_getter, unseen_message

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS_MIN, MS_MAX = -62_135_596_800_000, 253_402_300_799_999
SETTINGS = settings(
    derandomize=True,
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CATEGORY_WORDS = ("a", "b", "", "é")
UNSEEN_POLICIES = st.sampled_from(["pass", "dead_letter"])

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
        policy = {"unseen": draw(UNSEEN_POLICIES)} if transform == "category" else {}
        specs.append(
            FeatureSpec(f"x{i}", draw(st.sampled_from(paths)), transform, cats, policy=policy)
        )
    records = draw(st.lists(_values(schema), min_size=1, max_size=6))
    return schema, specs, records


# --- the reference: today's decoder and feature builder, one record at a time ---------------
class Reference(NamedTuple):
    """What the fastavro path makes of one record."""

    reason: str | None  # the dead letter's, or None
    message: str | None  # the dead letter's text (None: not compared)
    row: Any
    raw_id: Any
    when: Any
    unseen: dict[str, int]  # FeatureBuilder.unseen of the record


def _reference(schema: dict[str, Any], specs: list[FeatureSpec], msg: Msg) -> Reference:
    """The dead letter or the feature row, id and event time, as the fastavro path has it."""
    decoded, dead = Decoder(schema, 1 << 20).decode_batch([msg])
    if dead:
        return Reference(dead[0].reason, None, None, None, None, {})
    record = decoded[0].record
    unseen = FeatureBuilder(specs).unseen([record])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # float32 overflow: inf
            matrix, rejected = FeatureBuilder(specs).build([record])
    except (OverflowError, ValueError, OSError):  # features.py crashes; the fast path rejects
        return Reference("not_timestamp", None, None, None, None, unseen)
    # The fast path also rejects doubles too large for float32 (features.py stores inf):
    # the first failing column, in manifest order, names the dead letter.
    failing: list[tuple[int, str, str | None]] = [
        (int(j), "non_finite", None) for j in np.flatnonzero(np.isinf(matrix[0]))
    ]
    names = [s.name for s in specs]
    failing += [(names.index(r.feature), r.reason, r.message) for r in rejected]
    if failing:
        _col, reason, message = min(failing, key=lambda f: f[0])
        return Reference(reason, message, None, None, None, unseen)
    raw_id = field_getter("key")(record)
    when = field_getter("when")(record)
    if isinstance(when, datetime):
        micros = (when - EPOCH) // timedelta(microseconds=1)
        when = micros // 1000 if micros >= 0 else -((-micros) // 1000)
    elif not isinstance(when, int) or isinstance(when, bool):
        when = None
    return Reference(None, None, matrix[0], raw_id, when, unseen)


def _encode(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return buf.getvalue()


def _check(schema: dict[str, Any], specs: list[FeatureSpec], payloads: list[bytes]) -> None:
    try:
        fast = FastColumns(
            schema, specs, id_field="key", event_time_field="when", max_message_bytes=1 << 20
        )
    except Unsupported as exc:
        assert "map" in str(exc)  # the only generated construct it refuses
        return
    msgs = [Msg(p, o=i) for i, p in enumerate(payloads)]
    batch = fast.run(msgs)
    reasons = {d.message.offset(): d.reason for d in batch.dead}
    messages = {d.message.offset(): d.error_message for d in batch.dead}
    rows = {m.offset(): i for i, m in enumerate(batch.messages)}
    unseen: Counter[str] = Counter()
    for msg in msgs:
        ref = _reference(schema, specs, msg)
        assert reasons.get(msg.offset()) == ref.reason, (msg.value(), ref.reason)
        if ref.reason == "unseen_category":  # the value quoted in the same words
            assert messages[msg.offset()] == ref.message
        if ref.reason is None:
            i = rows[msg.offset()]
            np.testing.assert_array_equal(batch.matrix[i], ref.row)
            assert str(batch.ids[i]) == str(ref.raw_id) and type(batch.ids[i]) is type(ref.raw_id)
            assert batch.event_ms[i] == ref.when
        unseen.update(ref.unseen)
    assert batch.unseen == dict(unseen)


@SETTINGS
@given(cases())
def test_generated_schemas_and_records_match_fastavro_and_feature_builder(
    case: tuple[dict[str, Any], list[FeatureSpec], list[dict[str, Any]]],
) -> None:
    raw, specs, records = case
    schema = parse_record_schema(raw)
    _check(schema, specs, [_encode(schema, r) for r in records])


@SETTINGS
@given(cases(), st.data())
def test_mutated_payloads_fail_when_fastavro_fails(
    case: tuple[dict[str, Any], list[FeatureSpec], list[dict[str, Any]]], data: st.DataObject
) -> None:
    raw, specs, records = case
    schema = parse_record_schema(raw)
    try:
        fast = FastColumns(schema, specs, id_field="key", max_message_bytes=1 << 20)
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


# --- bounds and float32's range, one ulp either side -------------------------------------
F32_MAX = float(np.finfo(np.float32).max)
F32_HALFWAY = F32_MAX + 2.0**103  # doubles from here on round to infinity as float32
BEYOND_INT64 = 9.3e18


def _ulps(x: float) -> list[float]:
    """``x`` and the doubles just below and above it."""
    return [math.nextafter(x, -math.inf), x, math.nextafter(x, math.inf)]


def _float32s(x: float) -> list[float]:
    """The float32 nearest ``x`` and its float32 neighbours (what a ``float`` field can hold)."""
    with np.errstate(over="ignore"):  # beyond float32: infinity, and its neighbour
        near = np.float32(x)
        down, up = np.float32(-np.inf), np.float32(np.inf)
        return [float(np.nextafter(near, down)), float(near), float(np.nextafter(near, up))]


def _ulps32(x: float) -> list[float]:
    """The float32 nearest ``x`` and its float32 neighbours, each with its double neighbours."""
    return [v for s in _float32s(x) for v in _ulps(s)]


def _ints(*bounds: float) -> list[int]:
    """The integers next to each bound."""
    return sorted(
        {
            i
            for b in bounds
            for base in (math.floor(b), math.ceil(b))
            for i in (base - 1, base, base + 1)
        }
    )


INT64 = (-(2**63), 2**63 - 1)
NON_FINITE = [*_ulps(F32_MAX), *_ulps(F32_HALFWAY), *_ulps(-F32_MAX), *_ulps(-F32_HALFWAY)]
BOUND_CASES: list[tuple[str, Any, dict[str, Any], list[Any]]] = [
    (
        "double 0..1000",
        "double",
        {"min": 0.0, "max": 1000.0},
        [
            *_ulps(0.0),
            -0.0,
            -1e-46,
            -5e-324,
            *_ulps(1000.0),
            1000.0000001,
            1000.00001,
            *_ulps32(1000.0),
            *_ulps32(0.0),
            math.nan,
            math.inf,
            -math.inf,
        ],
    ),
    (
        "double, bounds not representable in float32",
        "double",
        {"min": 0.1, "max": 0.7},
        [*_ulps(0.1), *_ulps32(0.1), *_ulps(0.7), *_ulps32(0.7)],
    ),
    (
        "double, negative bounds beyond 2**24",
        "double",
        {"min": -16777217.0, "max": -3.3},
        [*_ulps(-16777217.0), *_ulps32(-16777217.0), *_ulps(-3.3), *_ulps32(-3.3)],
    ),
    (
        "double near float32's range",
        "double",
        {"max": 3e38},
        [*_ulps(3e38), *_ulps32(3e38), *NON_FINITE],
    ),
    ("double beyond float32, no bounds", "double", {}, [*NON_FINITE, 1e39, math.inf, math.nan]),
    (
        "double beyond float32, infinite: pass",
        "double",
        {"min": -1.0, "policy": {"infinite": "pass"}},
        [*NON_FINITE, math.inf, -math.inf, *_ulps(-1.0)],
    ),
    (
        "double, out_of_range: pass",
        "double",
        {"min": 0.1, "max": 0.7, "policy": {"out_of_range": "pass"}},
        [*_ulps(0.1), *_ulps32(0.7)],
    ),
    (
        "double, nan: dead_letter with bounds",
        "double",
        {"min": 0.0, "max": 1.0, "policy": {"nan": "dead_letter"}},
        [math.nan, *_ulps(1.0)],
    ),
    (
        "float, bounds not representable in float32",
        "float",
        {"min": 0.1, "max": 0.7},
        [*_float32s(0.1), *_float32s(0.7)],
    ),
    (
        "float, bounds of float32",
        "float",
        {"min": -1000.0, "max": 1000.0},
        [*_float32s(-1000.0), *_float32s(1000.0), *_float32s(0.0)],
    ),
    ("float, infinities", "float", {"max": 1.0}, [F32_MAX, -F32_MAX, math.inf, math.nan]),
    ("int", "int", {"min": -5.0, "max": 1000.0}, _ints(-5.0, 1000.0)),
    ("int, bounds between integers", "int", {"min": 0.5, "max": 2.5}, _ints(0.5, 2.5)),
    (
        "int beyond 2**24",
        "int",
        {"min": -16777217.0, "max": 16777217.0},
        _ints(-16777217.0, 16777217.0),
    ),
    ("int beyond 2**24, bound 2**24", "int", {"max": 16777216.0}, _ints(16777216.0)),
    ("int near 2**31", "int", {"max": 2147483646.5}, [2147483645, 2147483646, 2147483647]),
    ("int near -2**31", "int", {"min": -2147483647.5}, [-(2**31), -(2**31) + 1]),
    ("long beyond 2**53", "long", {"min": -(2.0**53), "max": 2.0**53}, _ints(-(2.0**53), 2.0**53)),
    ("long beyond 2**62", "long", {"min": -(2.0**62), "max": 2.0**62}, _ints(-(2.0**62), 2.0**62)),
    (
        "long, the largest double below 2**63",
        "long",
        {"min": -9223372036854774784.0, "max": 9223372036854774784.0},
        [*_ints(-9223372036854774784.0, 9223372036854774784.0), *INT64],
    ),
    ("long, bounds at 2**63", "long", {"min": -(2.0**63), "max": 2.0**63}, [*INT64, 0]),
    ("long, min beyond int64", "long", {"min": BEYOND_INT64}, [*INT64, 0]),
    ("long, max beyond int64", "long", {"max": -BEYOND_INT64}, [*INT64, 0]),
    ("long, bounds beyond int64", "long", {"min": -BEYOND_INT64, "max": BEYOND_INT64}, [*INT64]),
    (
        "long, out_of_range: pass",
        "long",
        {"max": 2.0**53, "policy": {"out_of_range": "pass"}},
        _ints(2.0**53),
    ),
    ("boolean above a min", "boolean", {"min": 0.5}, [False, True]),
    ("boolean below a max", "boolean", {"max": 0.5}, [False, True]),
    (
        "union of int, double and boolean",
        ["null", "int", "double", "boolean"],
        {"min": 0.5, "max": 16777217.0},
        [None, False, True, *_ints(0.5, 16777217.0), *_ulps(0.5), *_ulps32(16777217.0)],
    ),
]


@pytest.mark.parametrize(
    ("avro_type", "bounds", "values"),
    [case[1:] for case in BOUND_CASES],
    ids=[case[0] for case in BOUND_CASES],
)
def test_values_one_ulp_around_bounds_and_float32s_range_match_the_fastavro_path(
    avro_type: Any, bounds: dict[str, Any], values: list[Any]
) -> None:
    raw = {
        "type": "record",
        "name": "Bounded",
        "fields": [{"name": "key", "type": "string"}, {"name": "v", "type": avro_type}],
    }
    schema = parse_record_schema(raw)
    specs = [FeatureSpec("x", "v", **bounds)]
    payloads = [_encode(schema, {"key": f"k{i}", "v": v}) for i, v in enumerate(values)]
    # reasons and, for the records that pass, the feature matrix
    _check(schema, specs, payloads)
    # the dead letters quote the value as sent, in the fastavro path's words
    fast = FastColumns(schema, specs, id_field="key", max_message_bytes=1 << 20)
    msgs = [Msg(p, o=i) for i, p in enumerate(payloads)]
    fast_messages = {d.message.offset(): d.error_message for d in fast.run(msgs).dead}
    for msg in msgs:
        decoded, _dead = Decoder(schema, 1 << 20).decode_batch([msg])
        _matrix, rejected = FeatureBuilder(specs).build([decoded[0].record])
        if rejected and rejected[0].reason in ("out_of_range", "non_finite"):
            assert fast_messages[msg.offset()] == rejected[0].message


def _near(bound: float, kind: str) -> st.SearchStrategy[Any]:
    """Values of an Avro ``kind`` next to ``bound``, or anywhere in its range."""
    if kind in ("int", "long"):
        lo, hi = (-(2**31), 2**31 - 1) if kind == "int" else INT64
        clamped = min(max(bound, -(2.0**64)), 2.0**64)
        return st.one_of(
            st.sampled_from([min(max(i, lo), hi) for i in _ints(clamped)]), st.integers(lo, hi)
        )
    if kind == "float":
        return st.one_of(st.sampled_from(_float32s(bound)), st.floats(width=32))
    return st.one_of(st.sampled_from([*_ulps(bound), *_ulps32(bound)]), st.floats())


SPECIAL_BOUNDS = [2.0**24 + 1, 2.0**31, 2.0**53, 2.0**63, 9223372036854774784.0, F32_MAX, 0.1]
BOUNDS = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(-1e3, 1e3),
    st.integers(-(2**64), 2**64).map(float),
    st.sampled_from([*SPECIAL_BOUNDS, *(-b for b in SPECIAL_BOUNDS), 0.0, -0.0]),
)
NUMBER_KINDS = ("boolean", "int", "long", "float", "double")


@SETTINGS
@given(st.data())
def test_values_around_generated_bounds_match_the_fastavro_path(data: st.DataObject) -> None:
    bounds = sorted(data.draw(st.lists(BOUNDS, min_size=2, max_size=2)))
    low = data.draw(st.sampled_from([None, bounds[0]]))
    high = data.draw(st.sampled_from([None, bounds[1]]))
    raw = {
        "type": "record",
        "name": "Bounded",
        "fields": [
            {"name": "key", "type": "string"},
            *({"name": kind, "type": kind} for kind in NUMBER_KINDS),
        ],
    }
    schema = parse_record_schema(raw)
    specs = [FeatureSpec(kind, kind, min=low, max=high) for kind in NUMBER_KINDS]
    near = bounds[data.draw(st.integers(0, 1))]
    records = data.draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "key": st.just("k"),
                    "boolean": st.booleans(),
                    **{kind: _near(near, kind) for kind in NUMBER_KINDS[1:]},
                }
            ),
            min_size=1,
            max_size=8,
        )
    )
    _check(schema, specs, [_encode(schema, r) for r in records])


# --- unseen categories, under both policies ------------------------------------------------
UNSEEN_SCHEMA = {
    "type": "record",
    "name": "Categorical",
    "fields": [
        {"name": "key", "type": "string"},
        {"name": "s", "type": "string"},
        {"name": "e", "type": {"type": "enum", "name": "Symbol", "symbols": ["A", "B", "C"]}},
        {"name": "u", "type": ["null", "string", "long", "double"]},
        {"name": "r", "type": {"type": "record", "name": "Inner", "fields": []}},
    ],
}
UNSEEN_RECORDS: list[dict[str, Any]] = [
    {"s": "a", "e": "A", "u": "a", "r": {}},
    {"s": "z", "e": "A", "u": "a", "r": {}},  # s unseen
    {"s": "a", "e": "B", "u": None, "r": {}},  # e unseen; u missing (not unseen)
    {"s": "é", "e": "C", "u": "", "r": {}},  # u: the empty string is a category
    {"s": "", "e": "C", "u": 7, "r": {}},  # s: the empty string is not; u is a long
    {"s": "ab", "e": "B", "u": 1.5, "r": {}},  # all unseen
    {"s": "A", "e": "A", "u": "b", "r": {}},  # s: case matters
    {"s": "a", "e": "C", "u": 7, "r": {}},  # only u, a long
    {"s": "a", "e": "A", "u": "zz", "r": {}},  # only u, a string
]


@pytest.mark.parametrize("policy", ["pass", "dead_letter"])
def test_unseen_categories_under_both_policies_match_the_fastavro_path(policy: str) -> None:
    schema = parse_record_schema(UNSEEN_SCHEMA)
    unseen = {"unseen": policy}
    specs = [
        FeatureSpec("s", "s", "category", ("a", "é"), policy=unseen),
        FeatureSpec("e", "e", "category", ("C", "A"), policy=unseen),
        FeatureSpec("u", "u", "category", ("", "a"), policy=unseen),
        FeatureSpec("r", "r", "category", ("x",)),  # a record: unseen, passed as NaN
    ]
    payloads = [_encode(schema, {**r, "key": f"k{i}"}) for i, r in enumerate(UNSEEN_RECORDS)]
    _check(schema, specs, payloads)  # reasons, messages, matrices and counts
    batch = FastColumns(schema, specs, id_field="key", max_message_bytes=1 << 20).run(
        [Msg(p, o=i) for i, p in enumerate(payloads)]
    )
    assert batch.unseen == {"s": 4, "e": 2, "u": 5, "r": 9}
    if policy == "pass":
        assert batch.dead == []
        assert batch.matrix[:, :3].tolist()[0] == [0.0, 1.0, 1.0]  # positions in categories
        assert np.isnan(batch.matrix[1:, :3]).sum() == 4 + 2 + 5 + 1  # and u's null
    else:
        assert [(d.message.offset(), d.reason, d.error_message) for d in batch.dead] == [
            (1, "unseen_category", "s: value 'z' is not one of the categories"),
            (2, "unseen_category", "e: value 'B' is not one of the categories"),
            (4, "unseen_category", "s: value '' is not one of the categories"),
            (5, "unseen_category", "s: value 'ab' is not one of the categories"),
            (6, "unseen_category", "s: value 'A' is not one of the categories"),
            (7, "unseen_category", f"u: {unseen_message(7)}"),
            (8, "unseen_category", "u: value 'zz' is not one of the categories"),
        ]
        assert [m.offset() for m in batch.messages] == [0, 3]
