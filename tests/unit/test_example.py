import io
import math
from pathlib import Path

import fastavro
import numpy as np
import pytest
import xgboost as xgb
from support import Msg

from stream_scorer.decode import Decoder
from stream_scorer.example.produce import MALFORMED_KINDS, RideEncoder
from stream_scorer.example.rides import (
    FEATURES,
    feature_matrix,
    generate_columns,
    generate_rides,
    to_records,
)
from stream_scorer.example.train import train
from stream_scorer.features import FeatureBuilder
from stream_scorer.manifest import read_manifest, sha256_file
from stream_scorer.records import DeadLetter, Decoded

ENCODER = RideEncoder()
RIDE = generate_rides(1, seed=3)[0]


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "truncated"),
        ("trailing_bytes", "trailing_bytes"),
        ("empty", "empty"),
        ("bad_enum_index", "malformed_avro"),
        ("invalid_utf8", "invalid_utf8"),
        ("negative_length", "truncated"),
        ("wrong_schema", "truncated"),
    ],
)
def test_every_malformed_kind_fails_the_guarded_decoder(kind: str, reason: str) -> None:
    out = Decoder(ENCODER.schema, 1 << 20).decode(Msg(ENCODER.malformed(kind, RIDE)))
    assert isinstance(out, DeadLetter)
    assert out.reason == reason


def test_infinite_distance_decodes_and_is_rejected_by_the_feature_stage() -> None:
    out = Decoder(ENCODER.schema, 1 << 20).decode(Msg(ENCODER.malformed("infinite_distance", RIDE)))
    assert isinstance(out, Decoded)
    _, rejected = FeatureBuilder(FEATURES).build([out.record])
    assert [r.reason for r in rejected] == ["non_finite"]


def test_kinds_list_is_complete() -> None:
    assert len(MALFORMED_KINDS) == 8
    with pytest.raises(ValueError, match="unknown malformed kind"):
        ENCODER.malformed("gremlins", RIDE)


def test_rides_round_trip_and_are_deterministic() -> None:
    rides = generate_rides(500, seed=9, start_ms=1_700_000_000_000)
    assert rides == generate_rides(500, seed=9, start_ms=1_700_000_000_000)
    assert len({r["ride_id"] for r in rides}) == 500
    assert any(r["surge_multiplier"] is None for r in rides)
    for ride in rides[:50]:
        back = fastavro.schemaless_reader(io.BytesIO(ENCODER.encode(ride)), ENCODER.schema, None)
        assert back["ride_id"] == ride["ride_id"]
        assert back["vehicle_type"] == ride["vehicle_type"]
        assert back["surge_multiplier"] == ride["surge_multiplier"]


def test_training_features_equal_what_the_worker_builds_from_decoded_events() -> None:
    cols = generate_columns(300, seed=4)
    decoded = [
        fastavro.schemaless_reader(io.BytesIO(ENCODER.encode(r)), ENCODER.schema, None)
        for r in to_records(cols)
    ]
    built, rejected = FeatureBuilder(FEATURES).build(decoded)
    assert rejected == []
    np.testing.assert_array_equal(built, feature_matrix(cols))


@pytest.mark.parametrize("objective", ["reg:squarederror", "binary:logistic"])
def test_training_beats_the_baseline_and_writes_a_consistent_manifest(
    tmp_path: Path, objective: str
) -> None:
    manifest = train(tmp_path, rows=4000, n_estimators=30, objective=objective)
    assert read_manifest(tmp_path) == manifest
    assert manifest.model_sha256 == sha256_file(tmp_path / "model.ubj")
    assert (
        xgb.Booster(model_file=str(tmp_path / "model.ubj")).feature_names == manifest.feature_names
    )
    val, base = manifest.metrics["validation"], manifest.metrics["baseline"]
    if objective == "binary:logistic":
        assert val["accuracy"] > base["accuracy"] + 0.1
        assert val["logloss"] < base["logloss"]
    else:
        assert val["rmse"] < base["rmse"] / 2
        assert val["mae"] < base["mae"] / 2
    assert not math.isnan(val[next(iter(val))])
