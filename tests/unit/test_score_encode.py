import io
import json
from pathlib import Path

import fastavro
import numpy as np
import pytest
import xgboost as xgb
from support import (
    PAYMENT_FEATURES,
    payment_matrix,
    payments,
    read_record,
    train_model,
    train_payment_classifier,
)

from stream_scorer.contracts.manifest import FeatureSpec, read_manifest
from stream_scorer.errors import ModelError, SchemaError
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.score import Scorer

PREDICTION_SCHEMA = Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc"


def _regressor(tmp_path: Path) -> Path:
    x = np.random.default_rng(1).normal(size=(300, 2)).astype(np.float32)
    specs = (FeatureSpec("a", "a"), FeatureSpec("b", "b"))
    train_model(tmp_path, specs, x, x[:, 0] * 3 + x[:, 1], "reg:squarederror")
    return tmp_path


def test_regression_predictions_equal_xgboost_on_the_same_rows(tmp_path: Path) -> None:
    scorer = Scorer(_regressor(tmp_path))
    x = np.array([[0.5, -1.0], [np.nan, 2.0], [0.0, 0.0]], dtype=np.float32)
    booster = xgb.Booster(model_file=str(tmp_path / "model.ubj"))
    out = scorer.predict(x)
    assert out.labels is None
    np.testing.assert_array_equal(out.values, booster.inplace_predict(x))
    assert scorer.predict(np.empty((0, 2), dtype=np.float32)).values.shape == (0,)


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_binary_labels_follow_the_threshold(tmp_path: Path, threshold: float) -> None:
    train_payment_classifier(tmp_path)
    scorer = Scorer(tmp_path, threshold=threshold)
    x = payment_matrix(payments(200, seed=5))
    out = scorer.predict(x)
    assert out.labels is not None
    assert ((out.values >= 0) & (out.values <= 1)).all()
    np.testing.assert_array_equal(out.labels, (out.values >= threshold).astype(np.int8))


@pytest.mark.parametrize("damage", ["sha", "features", "missing_file"])
def test_inconsistent_model_fails_at_load(tmp_path: Path, damage: str) -> None:
    _regressor(tmp_path)
    manifest_path = tmp_path / "manifest.json"
    text = manifest_path.read_text()
    if damage == "sha":
        (tmp_path / "model.ubj").write_bytes((tmp_path / "model.ubj").read_bytes() + b" ")
    elif damage == "features":
        raw = json.loads(text)
        raw["features"][1]["name"] = "c"
        manifest_path.write_text(json.dumps(raw))
        assert read_manifest(tmp_path).feature_names == ["a", "c"]
    else:
        (tmp_path / "model.ubj").unlink()
    with pytest.raises(ModelError):
        Scorer(tmp_path)


def test_prediction_round_trips_through_the_published_schema() -> None:
    schema = load_schema(PREDICTION_SCHEMA)
    data = PredictionEncoder(schema).encode(
        "id-1", 12.5, None, "v7", 1_700_000_000_123, 1_700_000_000_456
    )
    got = read_record(schema, data)
    assert got["input_id"] == "id-1"
    assert got["prediction"] == 12.5
    assert got["label"] is None
    assert got["model_version"] == "v7"
    assert int(got["event_time"].timestamp() * 1000) == 1_700_000_000_123
    assert int(got["scored_at"].timestamp() * 1000) == 1_700_000_000_456


def test_prediction_schema_without_required_field_is_refused() -> None:
    schema = load_schema(PREDICTION_SCHEMA)
    schema["fields"] = [f for f in schema["fields"] if f["name"] != "model_version"]
    with pytest.raises(SchemaError, match="model_version"):
        PredictionEncoder(schema)


def test_payment_features_match_the_generic_builder() -> None:
    from stream_scorer.stages.features import FeatureBuilder

    recs = payments(50, seed=3)
    for r in recs:  # what fastavro hands the builder: a datetime for timestamp-millis
        r["at"] = fastavro.schemaless_reader(
            io.BytesIO(fastavro_bytes(r["at"])),
            {"type": "long", "logicalType": "timestamp-millis"},
            None,
        )
    built, rejected = FeatureBuilder(PAYMENT_FEATURES).build(recs)
    assert rejected == []
    np.testing.assert_array_equal(built, payment_matrix(payments(50, seed=3)))


def fastavro_bytes(millis: int) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, {"type": "long"}, millis)
    return buf.getvalue()
