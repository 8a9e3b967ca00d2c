"""The fast path: every reason code, feature policies, fallbacks, and the example end to end."""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from support import Msg, avro, offset_of, parse_record_schema

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.example.produce import MALFORMED_KINDS, RideEncoder
from stream_scorer.example.rides import FEATURES, RIDE_SCHEMA_PATH, generate_rides
from stream_scorer.example.train import train
from stream_scorer.fast.path import FastColumns, build_fast_path
from stream_scorer.fast.plan import Unsupported
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.score import Scorer

ALL_TYPES: dict[str, Any] = {
    "type": "record",
    "name": "All",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "n", "type": "int"},
        {"name": "big", "type": "long"},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["R", "G"]}},
        {"name": "maybe", "type": ["null", "double"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "nothing", "type": {"type": "array", "items": "null"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    ],
}
SPECS = [
    FeatureSpec("n", "n"),
    FeatureSpec("color", "color", "category", ("G", "R")),
    FeatureSpec("maybe", "maybe"),
    FeatureSpec("hour", "at", "hour_of_day"),
]
GOOD = {
    "id": "x",
    "n": 5,
    "big": 7,
    "color": "G",
    "maybe": 1.5,
    "tags": ["t"],
    "nothing": [None, None],
    "at": 3_600_000,
}


def zz(n: int) -> bytes:
    """Avro's zigzag varint of ``n``."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        low, z = z & 0x7F, z >> 7
        if z:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def fields_bytes(**over: bytes) -> bytes:
    """GOOD's encoding, field by field, with some fields' bytes replaced."""
    parts = {
        "id": zz(1) + b"x",
        "n": zz(5),
        "big": zz(7),
        "color": zz(1),
        "maybe": zz(1) + np.float64(1.5).tobytes(),
        "tags": zz(1) + zz(1) + b"t" + zz(0),
        "nothing": zz(2) + zz(0),
        "at": zz(3_600_000),
    }
    parts.update(over)
    return b"".join(parts.values())


@pytest.fixture(scope="module")
def fast() -> FastColumns:
    schema = parse_record_schema(ALL_TYPES)
    return FastColumns(schema, SPECS, id_field="id", event_time_field="at", max_message_bytes=64)


def test_hand_encoding_matches_fastavro() -> None:
    assert fields_bytes() == avro(ALL_TYPES, GOOD)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null_value"),
        (b"", "empty"),
        (fields_bytes(tags=zz(1) + zz(60) + b"x" * 60 + zz(0)), "too_large"),
        (fields_bytes()[:5], "truncated"),
        (b"\x80", "truncated"),  # the input ends inside a varint
        (fields_bytes(id=zz(50) + b"x"), "truncated"),  # a length past the bytes left
        (fields_bytes()[:10], "truncated"),  # inside the double
        (fields_bytes(big=b"\xff" * 10 + b"\x01"), "varint_too_long"),
        (fields_bytes(big=b"\xff" * 9 + b"\x02"), "int_out_of_range"),
        (fields_bytes(n=zz(2**31)), "int_out_of_range"),
        (fields_bytes(n=zz(-(2**31) - 1)), "int_out_of_range"),
        (fields_bytes(id=zz(-1)), "negative_length"),
        (fields_bytes(color=zz(2)), "bad_enum_index"),
        (fields_bytes(color=zz(-1)), "bad_enum_index"),
        (fields_bytes(maybe=zz(2)), "bad_union_index"),
        (fields_bytes(maybe=zz(-1)), "bad_union_index"),
        (fields_bytes(tags=zz(30) + b"t"), "count_too_large"),
        (fields_bytes(tags=zz(-(2**63))), "count_too_large"),
        (fields_bytes(nothing=zz(10_001) + zz(0)), "count_too_large"),
        (fields_bytes(nothing=zz(6_000) + zz(6_000) + zz(0)), "count_too_large"),
        (fields_bytes(color=zz(2**40)), "int_out_of_range"),  # an enum index is an int
        (fields_bytes(tags=zz(-1) + zz(-3) + zz(1) + b"t" + zz(0)), "negative_length"),
        (fields_bytes(tags=zz(-1) + zz(50) + zz(1) + b"t" + zz(0)), "truncated"),
        (fields_bytes(tags=zz(-1) + zz(3) + zz(1) + b"t" + zz(0)), "malformed_avro"),
        (fields_bytes(id=zz(1) + b"\xff"), "invalid_utf8"),
        (fields_bytes(id=zz(3) + b"\xed\xa0\x80"), "invalid_utf8"),  # a surrogate
        (fields_bytes(id=zz(2) + b"\xc0\x80"), "invalid_utf8"),  # an over-long encoding
        (fields_bytes(id=zz(2) + b"\xe2\x82"), "invalid_utf8"),  # a sequence cut short
        (fields_bytes() + b"\x00", "trailing_bytes"),
        (fields_bytes(at=zz(253_402_300_800_000)), "malformed_avro"),  # past year 9999
    ],
)
def test_every_decode_reason(fast: FastColumns, value: bytes | None, reason: str) -> None:
    batch = fast.run([Msg(fields_bytes(), o=0), Msg(value, o=1), Msg(fields_bytes(), o=2)])
    assert [(d.message.offset(), d.stage.value, d.reason) for d in batch.dead] == [
        (1, "decode", reason)
    ]
    assert batch.dead[0].message.value() == value  # the original bytes travel unchanged
    assert batch.dead[0].error_message
    assert [m.offset() for m in batch.messages] == [0, 2]


def test_block_counts_are_bounded_by_the_items_smallest_encoding() -> None:
    raw = {"type": "record", "name": "D", "fields": [
        {"name": "id", "type": "string"},
        {"name": "xs", "type": {"type": "array", "items": "double"}},
    ]}  # fmt: skip
    fast = FastColumns(parse_record_schema(raw), [], id_field="id", max_message_bytes=99)
    two = zz(2) + np.float64(1.0).tobytes() * 2 + zz(0)
    three = zz(3) + np.float64(1.0).tobytes() * 2 + zz(0)  # 3 doubles cannot fit in 17 bytes
    batch = fast.run([Msg(zz(1) + b"a" + two, o=0), Msg(zz(1) + b"a" + three, o=1)])
    assert [(d.message.offset(), d.reason) for d in batch.dead] == [(1, "count_too_large")]


def test_a_boolean_byte_other_than_0_or_1_is_malformed() -> None:
    raw = {"type": "record", "name": "B", "fields": [{"name": "b", "type": "boolean"}]}
    fast = FastColumns(
        parse_record_schema(raw), [FeatureSpec("b", "b")], id_field="b", max_message_bytes=9
    )
    batch = fast.run([Msg(b"\x01", o=0), Msg(b"\x02", o=1)])
    assert [(d.message.offset(), d.reason) for d in batch.dead] == [(1, "malformed_avro")]
    assert batch.ids == [True] and batch.matrix.tolist() == [[1.0]]


def test_blocks_with_negative_counts_and_sizes_decode(fast: FastColumns) -> None:
    tags = zz(-2) + zz(4) + zz(1) + b"a" + zz(1) + b"b" + zz(0)
    batch = fast.run([Msg(fields_bytes(tags=tags), o=0)])
    assert batch.dead == [] and batch.ids == ["x"]


def test_values_ids_and_event_times(fast: FastColumns) -> None:
    batch = fast.run([Msg(fields_bytes(), o=0), Msg(fields_bytes(maybe=zz(0)), o=1)])
    np.testing.assert_array_equal(batch.matrix, [[5, 0, 1.5, 1], [5, 0, math.nan, 1]])
    assert batch.ids == ["x", "x"] and batch.event_ms == [3_600_000, 3_600_000]


@pytest.mark.parametrize(
    ("millis", "hour", "weekday"),
    [
        (0, 0, 3),  # Thursday 1970-01-01
        (-1, 23, 2),
        (-86_400_000, 0, 2),
        (1_764_000_000_000, 16, 0),
    ],
)
def test_hours_and_weekdays_before_and_after_1970(millis: int, hour: int, weekday: int) -> None:
    schema = parse_record_schema(
        {"type": "record", "name": "T", "fields": [{"name": "t", "type": "long"}]}
    )
    specs = [FeatureSpec("h", "t", "hour_of_day"), FeatureSpec("d", "t", "day_of_week")]
    fast = FastColumns(schema, specs, id_field="t", max_message_bytes=100)
    batch = fast.run([Msg(zz(millis))])
    ref, _ = FeatureBuilder(specs).build([{"t": millis}])
    np.testing.assert_array_equal(batch.matrix, [[hour, weekday]])
    np.testing.assert_array_equal(batch.matrix, ref)
    assert batch.ids == [millis] and datetime.fromtimestamp(millis / 1000, UTC).hour == hour


@pytest.mark.parametrize(
    ("maybe_spec", "maybe", "reason"),
    [
        ({}, None, None),
        ({"policy": {"missing": "dead_letter"}}, None, "missing_value"),
        ({}, math.nan, None),
        ({"policy": {"nan": "dead_letter"}}, math.nan, "nan_value"),
        ({}, math.inf, "non_finite"),
        ({"policy": {"infinite": "pass"}}, -math.inf, None),
        ({}, 1e39, "non_finite"),  # finite, but not as float32
        ({"min": 0.0, "max": 2.0}, 2.5, "out_of_range"),
        ({"min": 0.0, "max": 2.0}, 2.0, None),
        ({"min": 0.0}, -0.5, "out_of_range"),
        ({"min": 0.0, "policy": {"out_of_range": "pass"}}, -0.5, None),
    ],
)
def test_feature_policies(
    maybe_spec: dict[str, Any], maybe: float | None, reason: str | None
) -> None:
    schema = parse_record_schema(ALL_TYPES)
    specs = [*SPECS[:2], FeatureSpec("maybe", "maybe", **maybe_spec), SPECS[3]]
    fast = FastColumns(schema, specs, id_field="id", max_message_bytes=100)
    payload = avro(ALL_TYPES, {**GOOD, "maybe": maybe})
    batch = fast.run([Msg(payload)])
    assert [(d.stage.value, d.reason) for d in batch.dead] == (
        [] if reason is None else [("features", reason)]
    )
    # the fastavro path reads the same policy (one type, ``ValuePolicy``) to the same verdict
    decoded, _ = Decoder(schema, 100).decode_batch([Msg(payload)])
    _matrix, rejected = FeatureBuilder(specs).build([decoded[0].record])
    assert [r.reason for r in rejected] == ([] if reason is None else [reason])


@pytest.mark.parametrize("value", [math.inf, -math.inf, 1e39])
def test_infinities_that_pass_reach_the_model_as_nan(value: float) -> None:
    schema = parse_record_schema(ALL_TYPES)
    specs = [*SPECS[:2], FeatureSpec("maybe", "maybe", policy={"infinite": "pass"}), SPECS[3]]
    fast = FastColumns(schema, specs, id_field="id", max_message_bytes=100)
    batch = fast.run([Msg(avro(ALL_TYPES, {**GOOD, "maybe": value}))])
    assert batch.dead == [] and math.isnan(batch.matrix[0, 2]) and batch.matrix[0, 0] == 5


def test_unseen_categories_are_nan_even_when_missing_values_are_dead_letters() -> None:
    schema = parse_record_schema(ALL_TYPES)
    specs = [FeatureSpec("color", "color", "category", ("G",), policy={"missing": "dead_letter"})]
    fast = FastColumns(schema, specs, id_field="id", max_message_bytes=100)
    batch = fast.run([Msg(avro(ALL_TYPES, {**GOOD, "color": "R"}))])
    assert batch.dead == [] and math.isnan(batch.matrix[0, 0])


def test_first_failing_feature_names_the_dead_letter() -> None:
    schema = parse_record_schema(ALL_TYPES)
    specs = [FeatureSpec("id_as_number", "id"), FeatureSpec("maybe", "maybe")]
    fast = FastColumns(schema, specs, id_field="id", max_message_bytes=100)
    batch = fast.run([Msg(avro(ALL_TYPES, {**GOOD, "maybe": math.inf}))])
    assert [d.reason for d in batch.dead] == ["not_numeric"]
    assert batch.dead[0].error_message.startswith("id_as_number:")


@pytest.mark.parametrize(
    ("fields", "specs", "why"),
    [
        (
            [{"name": "m", "type": {"type": "map", "values": "double"}}],
            [FeatureSpec("v", "m.k")],
            "map",
        ),
        (
            [
                {
                    "name": "n",
                    "type": [
                        "null",
                        {
                            "type": "record",
                            "name": "N",
                            "fields": [{"name": "next", "type": ["null", "N"]}],
                        },
                    ],
                }
            ],
            [FeatureSpec("v", "id")],
            "recursive",
        ),
        ([{"name": "u", "type": {"type": "string", "logicalType": "uuid"}}], [], "uuid"),
    ],
)
def test_schemas_it_cannot_specialise_fall_back(
    fields: list[dict[str, Any]],
    specs: list[FeatureSpec],
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = {"type": "record", "name": "S", "fields": [{"name": "id", "type": "string"}, *fields]}
    schema = parse_record_schema(raw)
    specs = specs or [FeatureSpec("v", "id")]
    with pytest.raises(Unsupported, match=why):
        FastColumns(schema, specs, id_field="id", max_message_bytes=100)
    with caplog.at_level(logging.INFO, logger="stream_scorer.fast.path"):
        assert (
            build_fast_path(
                schema, specs, id_field="id", event_time_field="", max_message_bytes=100
            )
            is None
        )
    assert why in caplog.text and "fastavro path" in caplog.text


def test_switched_off_by_configuration(caplog: pytest.LogCaptureFixture) -> None:
    schema = parse_record_schema(ALL_TYPES)
    with caplog.at_level(logging.INFO, logger="stream_scorer.fast.path"):
        out = build_fast_path(
            schema, SPECS, id_field="id", event_time_field="", max_message_bytes=9, enabled=False
        )
    assert out is None and "input.fast_path" in caplog.text


# --- the shipped example ------------------------------------------------------------------
@pytest.fixture(scope="module")
def ride_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rides")
    train(out, rows=2_000, n_estimators=20)
    return out


def test_example_events_and_every_malformed_kind_match_the_fastavro_path(
    ride_model: Path,
) -> None:
    schema = load_schema(RIDE_SCHEMA_PATH)
    encoder = RideEncoder(schema)
    rides = generate_rides(400, seed=3)
    rides[5]["surge_multiplier"] = None
    payloads: list[bytes | None] = [encoder.encode(r) for r in rides]
    for i, kind in enumerate(MALFORMED_KINDS):
        payloads[10 + 7 * i] = encoder.malformed(kind, rides[10 + 7 * i])
    msgs = [Msg(p, o=i) for i, p in enumerate(payloads)]

    fast = FastColumns(
        schema,
        FEATURES,
        id_field="ride_id",
        event_time_field="requested_at",
        max_message_bytes=1 << 20,
    )
    batch = fast.run(msgs)
    good, dead = Decoder(schema, 1 << 20).decode_batch(msgs)
    matrix, rejected = FeatureBuilder(FEATURES).build([d.record for d in good])
    ref_dead = [(d.message.offset(), d.reason) for d in dead]
    ref_dead += [(good[r.index].message.offset(), r.reason) for r in rejected]
    fast_dead = [(d.message.offset(), d.reason) for d in batch.dead]
    # the same records fail, with the same reasons as the guarded fastavro path
    assert sorted(fast_dead) == sorted(ref_dead)
    assert {r for _o, r in fast_dead} >= {"negative_length", "bad_enum_index", "non_finite"}
    keep = [i for i in range(len(good)) if i not in {r.index for r in rejected}]
    np.testing.assert_array_equal(batch.matrix, matrix[keep])
    assert batch.ids == [good[i].record["ride_id"] for i in keep]
    assert batch.event_ms == [rides[offset_of(m)]["requested_at"] for m in batch.messages]

    # predictions: identical to xgboost's own inplace_predict on the same rows
    scorer = Scorer(ride_model)
    booster = xgb.Booster(model_file=str(ride_model / "model.ubj"))
    ours = scorer.predict(batch.matrix).values
    theirs = booster.inplace_predict(matrix[keep]).astype(np.float64)
    np.testing.assert_array_equal(ours, theirs)
