"""Framed input (Confluent wire format): frames, schema resolution, fast path vs fastavro."""

from __future__ import annotations

import io
import json
import struct
import warnings
from typing import Any

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import Msg, parse_record_schema

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.example.produce import malformed_payload
from stream_scorer.example.rides import FEATURES, evolved_ride_schemas, generate_rides, ride_as
from stream_scorer.fast.framed import build_framed_columns
from stream_scorer.headers import VALUE_SCHEMA_ID
from stream_scorer.registry import SchemaKey
from stream_scorer.stages.columns import event_millis
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.framing import FramedColumns, frame_key
from stream_scorer.stages.records import Columns, Reason
from stream_scorer.stages.resolution import Kind, resolve_pair

SCHEMAS = evolved_ride_schemas()
READER = parse_record_schema(SCHEMAS["v2"])
PATHS = [f.field for f in FEATURES] + ["ride_id", "requested_at"]
IDS = {"v1": 11, "v2": 12, "v3": 13}


def _body(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parse_record_schema(schema), record)
    return buf.getvalue()


def _resolve(body: bytes, writer: dict[str, Any], reader: dict[str, Any] | None) -> dict[str, Any]:
    record = fastavro.schemaless_reader(io.BytesIO(body), writer, reader)
    assert isinstance(record, dict)
    return record


def _framed(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + body


def _columns(*, fast: bool, reader: dict[str, Any] = READER, features: Any = FEATURES) -> Any:
    return build_framed_columns(
        reader,
        features,
        id_field="ride_id",
        event_time_field="requested_at",
        max_message_bytes=4096,
        fast_path=fast,
    )


def _teach(cols: FramedColumns, schemas: dict[SchemaKey, dict[str, Any] | None]) -> None:
    for key, schema in schemas.items():
        cols.learn(key, None if schema is None else json.dumps(schema))


def _reference(
    writer: dict[str, Any], reader: dict[str, Any], bodies: list[bytes], features: Any
) -> tuple[np.ndarray, list[Any], list[int | None]]:
    """fastavro's own resolution, then the feature builder: what the fast path must equal."""
    w, r = parse_record_schema(writer), parse_record_schema(reader)
    records = [_resolve(b, w, r) for b in bodies]
    matrix, rejected = FeatureBuilder(features).build(records)
    assert not rejected
    return (
        matrix,
        [rec["ride_id"] for rec in records],
        [event_millis(rec["requested_at"]) for rec in records],
    )


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.array_equal(a, b, equal_nan=True))


def test_the_frame_key_is_read_from_the_prefix_or_the_header() -> None:
    assert frame_key(Msg(_framed(7, b"x"))) == ("id", 7)
    guid = bytes(range(16))
    header = Msg(b"\x00body", hdrs=[(VALUE_SCHEMA_ID, b"\x01" + guid)])
    assert frame_key(header) == ("guid", "00010203-0405-0607-0809-0a0b0c0d0e0f")
    assert frame_key(Msg(b"\x02abcd")) is Reason.BAD_MAGIC_BYTE
    assert frame_key(Msg(b"\x00\x00\x01")) is Reason.SHORT_FRAME
    assert frame_key(Msg(b"x", hdrs=[(VALUE_SCHEMA_ID, b"\x01abc")])) is Reason.SHORT_FRAME
    assert frame_key(Msg(None)) is Reason.NULL_VALUE
    assert frame_key(Msg(b"")) is Reason.EMPTY


def test_the_example_evolution_is_classified() -> None:
    v1, v2, v3 = (parse_record_schema(SCHEMAS[v]) for v in ("v1", "v2", "v3"))
    assert resolve_pair(v1, READER, PATHS).kind is Kind.FAST  # int->long, default, skipped field
    assert resolve_pair(v2, READER, PATHS).kind is Kind.FAST
    verdict = resolve_pair(v3, READER, PATHS)
    assert verdict.kind is Kind.MISMATCH
    assert "distance_km" in verdict.why and "no default" in verdict.why


@pytest.mark.parametrize("fast", [True, False])
def test_v1_and_v2_interleaved_score_exactly_as_fastavro_resolves_them(fast: bool) -> None:
    rides = generate_rides(300, seed=5)
    versions = ["v1" if i % 3 else "v2" for i in range(len(rides))]
    bodies = [_body(SCHEMAS[v], ride_as(v, r)) for v, r in zip(versions, rides, strict=True)]
    messages = [
        Msg(_framed(IDS[v], b), o=i) for i, (v, b) in enumerate(zip(versions, bodies, strict=True))
    ]
    cols = _columns(fast=fast)
    assert cols.schema_keys(messages) == {("id", 11), ("id", 12)}
    _teach(cols, {("id", 11): SCHEMAS["v1"], ("id", 12): SCHEMAS["v2"]})
    assert cols.schema_keys(messages) == set()
    out: Columns = cols.run(messages)
    assert not out.dead
    assert [m.offset() for m in out.messages] == list(range(len(rides)))  # input order kept
    expected = np.empty_like(out.matrix)
    ids: list[Any] = [None] * len(rides)
    times: list[Any] = [None] * len(rides)
    for v in ("v1", "v2"):
        rows = [i for i, x in enumerate(versions) if x == v]
        m, i_, t = _reference(SCHEMAS[v], SCHEMAS["v2"], [bodies[i] for i in rows], FEATURES)
        expected[rows] = m
        for j, r in enumerate(rows):
            ids[r], times[r] = i_[j], t[j]
    assert _same(out.matrix, expected)
    assert out.ids == ids
    assert out.event_ms == times
    # and the v1 schemaless reading of the same rides gives the same features
    v1 = parse_record_schema(SCHEMAS["v1"])
    plain = [_resolve(_body(SCHEMAS["v1"], r), v1, None) for r in rides]
    assert _same(out.matrix, FeatureBuilder(FEATURES).build(plain)[0])
    if fast:
        assert cols.plan_kind(("id", 11)) == "fast"


@pytest.mark.parametrize("fast", [True, False])
def test_bad_frames_unknown_ids_and_incompatible_writers_are_dead_letters(fast: bool) -> None:
    ride = generate_rides(1, seed=1)[0]
    good = _framed(12, _body(SCHEMAS["v2"], ride_as("v2", ride)))
    messages = [
        Msg(good, o=0),
        Msg(b"\x07" + good[1:], o=1),  # wrong magic byte
        Msg(b"\x00\x00\x00", o=2),  # shorter than the frame
        Msg(_framed(99, good[5:]), o=3),  # unknown id
        Msg(_framed(13, _body(SCHEMAS["v3"], ride_as("v3", ride))), o=4),  # incompatible
        Msg(good[:5] + good[5:-3], o=5),  # truncated body: the guards of today
        Msg(None, o=6),
        Msg(good, o=7),
    ]
    cols = _columns(fast=fast)
    _teach(cols, {("id", 12): SCHEMAS["v2"], ("id", 13): SCHEMAS["v3"], ("id", 99): None})
    out = cols.run(messages)
    assert [m.offset() for m in out.messages] == [0, 7]
    reasons = {d.message.offset(): d.reason for d in out.dead}
    assert reasons == {
        1: Reason.BAD_MAGIC_BYTE,
        2: Reason.SHORT_FRAME,
        3: Reason.UNKNOWN_SCHEMA_ID,
        4: Reason.SCHEMA_MISMATCH,
        5: Reason.TRUNCATED,
        6: Reason.NULL_VALUE,
    }
    mismatch = next(d for d in out.dead if d.reason is Reason.SCHEMA_MISMATCH)
    assert "schema id 13" in mismatch.error_message and "distance_km" in mismatch.error_message
    assert [d.message.offset() for d in out.dead] == sorted(reasons)


def test_framed_malformed_bodies_get_the_same_reasons_on_both_paths() -> None:
    rides = generate_rides(60, seed=9)
    v1 = parse_record_schema(SCHEMAS["v1"])
    kinds = ["truncated", "trailing_bytes", "bad_enum_index", "invalid_utf8", "negative_length"]
    messages = []
    for i, ride in enumerate(rides):
        body = _body(SCHEMAS["v1"], ride)
        if i % 4 == 0:
            bad = malformed_payload(kinds[i % len(kinds)], ride, v1)
            assert bad is not None
            body = bad
        messages.append(Msg(_framed(11, body), o=i))
    outs = []
    for fast in (True, False):
        cols = _columns(fast=fast)
        _teach(cols, {("id", 11): SCHEMAS["v1"]})
        outs.append(cols.run(messages))
    fast_out, slow_out = outs
    assert [(d.message.offset(), d.reason) for d in fast_out.dead] == [
        (d.message.offset(), d.reason) for d in slow_out.dead
    ]
    assert fast_out.dead
    assert _same(fast_out.matrix, slow_out.matrix)


# --- evolved schemas the fast path does not specialise: fastavro's resolution, exactly -------
_BASE = {
    "type": "record",
    "name": "E",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "int"},
        {"name": "x", "type": "float"},
        {"name": "kind", "type": {"type": "enum", "name": "K", "symbols": ["A", "B"]}},
        {"name": "extra", "type": "string"},
    ],
}
_FEATURES = (
    FeatureSpec("n", "n"),
    FeatureSpec("x", "x"),
    FeatureSpec("kind", "kind", "category", ("A", "B", "C")),
    FeatureSpec("d", "d"),
)


def _evolve(**types: Any) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(json.dumps(_BASE))
    for f in schema["fields"]:
        if f["name"] in types:
            f["type"] = types.pop(f["name"])
    for name, typ in types.items():
        schema["fields"].append({"name": name, **typ})
    return schema


_WRITER = _evolve(d={"type": "double"})
_CASES = {
    "identical": (_WRITER, Kind.FAST),
    "int to long": (_evolve(n="long", d={"type": "double"}), Kind.FAST),
    "int to double": (_evolve(n="double", d={"type": "double"}), Kind.FASTAVRO),
    "float to double": (_evolve(x="double", d={"type": "double"}), Kind.FASTAVRO),
    "a defaulted feature": (_evolve(d={"type": "double", "default": 2.5}), Kind.FASTAVRO),
    "enum gains a symbol": (
        _evolve(
            kind={"type": "enum", "name": "K", "symbols": ["A", "B", "C"]},
            d={"type": "double"},
        ),
        Kind.FAST,
    ),
    "nullable reader": (_evolve(n=["null", "int"], d={"type": "double"}), Kind.FASTAVRO),
    "string read as bytes": (_evolve(extra="bytes", d={"type": "double"}), Kind.FAST),
}


@pytest.mark.parametrize("case", sorted(_CASES))
def test_evolved_readers_give_exactly_fastavros_resolution(case: str) -> None:
    reader_raw, kind = _CASES[case]
    writer_raw = {**_WRITER, "fields": [f for f in _WRITER["fields"] if f["name"] != "d"]}
    if case != "a defaulted feature":
        writer_raw = _WRITER
    reader, writer = parse_record_schema(reader_raw), parse_record_schema(writer_raw)
    assert resolve_pair(writer, reader, ["n", "x", "kind", "d", "id"]).kind is kind
    rng = np.random.default_rng(3)
    records = [
        {
            "id": f"r{i}",
            "n": int(rng.integers(-(2**31), 2**31)),
            "x": float(np.float32(rng.normal() * 1e3)),
            "kind": "AB"[i % 2],
            "extra": "é" * (i % 3),
            "d": float(rng.normal()),
        }
        for i in range(50)
    ]
    bodies = [_body(writer_raw, r) for r in records]
    messages = [Msg(_framed(5, b), o=i) for i, b in enumerate(bodies)]
    resolved = [_resolve(b, writer, reader) for b in bodies]
    expected, rejected = FeatureBuilder(_FEATURES).build(resolved)
    for fast in (True, False):
        cols = build_framed_columns(
            reader, _FEATURES, id_field="id", event_time_field="", max_message_bytes=4096,
            fast_path=fast,
        )  # fmt: skip
        _teach(cols, {("id", 5): writer_raw})
        out = cols.run(messages)
        assert [d.message.offset() for d in out.dead] == [r.index for r in rejected]
        assert _same(out.matrix, np.delete(expected, [r.index for r in rejected], axis=0))
        assert out.ids == [
            r["id"] for i, r in enumerate(resolved) if i not in {x.index for x in rejected}
        ]
        assert cols.plan_kind(("id", 5)) == ("fast" if fast and kind is Kind.FAST else "fastavro")


def test_plans_are_bounded_and_learned_schemas_are_required() -> None:
    cols = build_framed_columns(
        parse_record_schema(_WRITER), _FEATURES, id_field="id", event_time_field="",
        max_message_bytes=4096, max_schemas=2,
    )  # fmt: skip
    body = _body(_WRITER, {"id": "a", "n": 1, "x": 1.0, "kind": "A", "extra": "", "d": 0.5})
    with pytest.raises(LookupError):
        cols.run([Msg(_framed(1, body))])
    for i in (1, 2, 3):
        cols.learn(("id", i), json.dumps(_WRITER))
        assert len(cols.run([Msg(_framed(i, body))]).messages) == 1
    assert cols.schema_keys([Msg(_framed(1, body))]) == {("id", 1)}  # the oldest plan went
    assert cols.schema_keys([Msg(_framed(3, body))]) == set()


# --- generated evolutions: the framed decoder against fastavro's own resolution ---------------
_LEAVES: dict[str, list[Any]] = {
    # writer type -> reader types Avro resolves it to (the first: unchanged)
    "int": ["int", "long", "float", "double", ["null", "int"], ["null", "long"]],
    "long": ["long", "float", "double", ["null", "long"]],
    "float": ["float", "double", ["null", "float"]],
    "double": ["double", ["null", "double"]],
    "string": ["string", "bytes", ["null", "string"]],
    "bytes": ["bytes", "string"],
    "boolean": ["boolean", ["null", "boolean"]],
    "enum": ["enum", "enum+"],
    "nullable": ["nullable"],
}
_SYMBOLS = ("A", "B", "C")


def _leaf_value(kind: str) -> st.SearchStrategy[Any]:
    return {
        "int": st.integers(-(2**31), 2**31 - 1),
        "long": st.integers(-(2**63), 2**63 - 1),
        "float": st.floats(width=32, allow_nan=False, allow_infinity=False),
        "double": st.floats(-1e30, 1e30, allow_nan=False),
        "string": st.sampled_from(["A", "B", "", "é", "zz"]),
        "bytes": st.sampled_from([b"A", b"", b"q"]),
        "boolean": st.booleans(),
        "enum": st.sampled_from(_SYMBOLS[:2]),
        "nullable": st.one_of(st.none(), st.floats(-1e6, 1e6)),
    }[kind]


@st.composite
def evolutions(
    draw: st.DrawFn,
) -> tuple[dict[str, Any], dict[str, Any], list[FeatureSpec], list[dict[str, Any]]]:
    kinds = draw(st.lists(st.sampled_from(sorted(_LEAVES)), min_size=1, max_size=6))
    wfields: list[dict[str, Any]] = [{"name": "key", "type": "string"}]
    rfields: list[dict[str, Any]] = [{"name": "key", "type": "string"}]
    for i, kind in enumerate(kinds):
        name = f"f{i}"
        if kind == "enum":
            wtype: Any = {"type": "enum", "name": f"E{i}", "symbols": list(_SYMBOLS[:2])}
        elif kind == "nullable":
            wtype = ["null", "double"]
        else:
            wtype = kind
        wfields.append({"name": name, "type": wtype})
        if draw(st.integers(0, 5)) == 0:
            continue  # dropped by the reader: skipped
        target = draw(st.sampled_from(_LEAVES[kind]))
        if target == "enum":
            rtype: Any = wtype
        elif target == "enum+":
            rtype = {"type": "enum", "name": f"E{i}", "symbols": list(_SYMBOLS)}
        elif target == "nullable":
            rtype = draw(st.sampled_from([["null", "double"], ["double", "null"]]))
        else:
            rtype = target
        rfields.append({"name": name, "type": rtype})
    for j in range(draw(st.integers(0, 2))):  # added by the reader, with defaults
        rfields.append(
            draw(
                st.sampled_from(
                    [
                        {"name": f"new{j}", "type": "double", "default": 1.5},
                        {"name": f"new{j}", "type": ["null", "long"], "default": None},
                        {"name": f"new{j}", "type": "string", "default": "B"},
                    ]
                )
            )
        )
    writer = {"type": "record", "name": "Evo", "fields": wfields}
    reader = {"type": "record", "name": "Evo", "fields": rfields}
    names = [f["name"] for f in rfields if f["name"] != "key"] + ["missing"]
    specs = []
    for n in range(draw(st.integers(1, 4))):
        transform = draw(st.sampled_from(["number", "category"]))
        cats = ("A", "B", "C", "") if transform == "category" else ()
        specs.append(FeatureSpec(f"x{n}", draw(st.sampled_from(names)), transform, cats))
    fields = {"key": st.text(max_size=4)}
    fields.update({f"f{i}": _leaf_value(k) for i, k in enumerate(kinds)})
    records = draw(st.lists(st.fixed_dictionaries(fields), min_size=1, max_size=5))
    return writer, reader, specs, records


@settings(
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(evolutions())
def test_generated_evolutions_read_exactly_as_fastavro_resolves_them(
    case: tuple[dict[str, Any], dict[str, Any], list[FeatureSpec], list[dict[str, Any]]],
) -> None:
    writer_raw, reader_raw, specs, records = case
    writer, reader = parse_record_schema(writer_raw), parse_record_schema(reader_raw)
    bodies = [_body(writer_raw, r) for r in records]
    resolved = [_resolve(b, writer, reader) for b in bodies]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float32 overflow of a long: inf
        expected, rejected = FeatureBuilder(specs).build(resolved)
    rejected_rows = {r.index: r.reason for r in rejected}
    # the fast path also refuses values beyond float32 (features.py stores inf): non_finite
    for i in np.flatnonzero(np.isinf(expected).any(axis=1)).tolist():
        rejected_rows.setdefault(i, Reason.NON_FINITE)
    keep = [i for i in range(len(records)) if i not in rejected_rows]
    messages = [Msg(_framed(9, b), o=i) for i, b in enumerate(bodies)]
    for fast in (True, False):
        cols = build_framed_columns(
            reader, specs, id_field="key", event_time_field="", max_message_bytes=4096,
            fast_path=fast,
        )  # fmt: skip
        _teach(cols, {("id", 9): writer_raw})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = cols.run(messages)
        if not fast:  # the fastavro path keeps features.py's inf; compare it row for row
            assert _same(out.matrix, np.delete(expected, [r.index for r in rejected], axis=0))
            continue
        got = {d.message.offset(): d.reason for d in out.dead}
        assert got == rejected_rows, (cols.plan_kind(("id", 9)), got, rejected_rows)
        assert _same(out.matrix, expected[keep])
        assert out.ids == [resolved[i]["key"] for i in keep]


def test_an_unknown_id_is_asked_again_after_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    cols = build_framed_columns(
        parse_record_schema(_WRITER), _FEATURES, id_field="id", event_time_field="",
        max_message_bytes=4096,
    )  # fmt: skip
    body = _body(_WRITER, {"id": "a", "n": 1, "x": 1.0, "kind": "A", "extra": "", "d": 0.5})
    msg = [Msg(_framed(4, body))]
    assert cols.schema_keys(msg) == {("id", 4)}
    cols.learn(("id", 4), None)  # a registry replica that does not have it yet
    assert cols.run(msg).dead[0].reason is Reason.UNKNOWN_SCHEMA_ID
    clock[0] += 10
    assert cols.schema_keys(msg) == set()  # not asked again at once
    clock[0] += 25
    assert cols.schema_keys(msg) == {("id", 4)}
    cols.learn(("id", 4), json.dumps(_WRITER))
    assert len(cols.run(msg).messages) == 1


def test_a_swapped_in_pipeline_learns_the_fetched_writer_schemas_without_the_registry() -> None:
    """After a model swap the new pipeline's decoder is taught from memory, not the registry."""
    from stream_scorer.worker.schemas import WriterSchemas

    asked: list[SchemaKey] = []

    class Source:
        def writer_schema(self, key: SchemaKey) -> str | None:
            asked.append(key)
            return json.dumps(SCHEMAS["v1"]) if key == ("id", IDS["v1"]) else None

    first, second = _columns(fast=True), _columns(fast=True)
    schemas = WriterSchemas(first, Source(), unavailable_timeout_s=1)
    record = ride_as("v1", generate_rides(1, seed=3)[0])
    batch = [Msg(_framed(IDS["v1"], _body(SCHEMAS["v1"], record)))]
    schemas.prepare(batch)
    assert asked == [("id", IDS["v1"])]
    schemas.follow(second)
    assert second.schema_keys(batch)  # a new decoder knows nothing yet
    schemas.prepare(batch)
    assert asked == [("id", IDS["v1"])]  # taught from memory: the registry was not asked again
    assert not second.schema_keys(batch)
    assert len(second.run(batch).ids) == 1


@pytest.mark.parametrize("fast", [True, False])
def test_a_schema_id_header_with_magic_0_is_read_as_the_stock_deserializer_reads_it(
    fast: bool,
) -> None:
    from confluent_kafka.schema_registry import dual_schema_id_deserializer
    from confluent_kafka.schema_registry.common.serde import SchemaId
    from confluent_kafka.serialization import MessageField, SerializationContext

    rides = generate_rides(6, seed=3)
    bodies = [_body(SCHEMAS["v2"], ride_as("v2", r)) for r in rides]
    header = SchemaId("AVRO", 12).id_to_bytes()  # magic 0 + 4-byte id
    assert header == b"\x00" + struct.pack(">I", 12)
    # the stock deserializer takes the id from this header and the whole value as the body
    ctx = SerializationContext("t", MessageField.VALUE, [(VALUE_SCHEMA_ID, header)])
    found = SchemaId("AVRO")
    assert dual_schema_id_deserializer(bodies[0], ctx, found).read() == bodies[0]
    assert found.id == 12
    # header-framed and prefix-framed records of one schema id, in one batch
    messages = [
        Msg(b, o=i, hdrs=[(VALUE_SCHEMA_ID, header)]) if i % 2 else Msg(_framed(12, b), o=i)
        for i, b in enumerate(bodies)
    ]
    assert frame_key(messages[1]) == ("id", 12)
    assert frame_key(Msg(b"x", hdrs=[(VALUE_SCHEMA_ID, b"\x00\x00\x01")])) is Reason.SHORT_FRAME
    assert frame_key(Msg(b"x", hdrs=[(VALUE_SCHEMA_ID, b"\x05" + bytes(16))])) is (
        Reason.BAD_MAGIC_BYTE
    )
    cols = _columns(fast=fast)
    assert cols.schema_keys(messages) == {("id", 12)}
    _teach(cols, {("id", 12): SCHEMAS["v2"]})
    out = cols.run(messages)
    assert not out.dead, [d.error_message for d in out.dead]
    assert [m.offset() for m in out.messages] == list(range(len(rides)))
    expected, ids, _ = _reference(SCHEMAS["v2"], SCHEMAS["v2"], bodies, FEATURES)
    assert _same(out.matrix, expected)
    assert out.ids == ids
