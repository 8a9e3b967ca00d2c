"""``model pack`` and ``model check``: bring your own booster; the training-side features."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
import xgboost as xgb

from stream_scorer.cli import main
from stream_scorer.contracts.manifest import read_manifest
from stream_scorer.errors import ModelError, SchemaError
from stream_scorer.example.rides import (
    FEATURES,
    RIDE_SCHEMA_PATH,
    generate_rides,
    load_ride_schema,
)
from stream_scorer.model.pack import check, pack, parse_feature_flag, training_matrix
from stream_scorer.stages.columns import AvroColumns
from stream_scorer.stages.decode import Decoder
from stream_scorer.stages.features import FeatureBuilder

NAMES = [f.name for f in FEATURES]


def _mapping() -> dict[str, Any]:
    """The example's features as a mapping file would list them."""
    features = []
    for f in FEATURES:
        entry: dict[str, Any] = {"name": f.name, "field": f.field, "transform": f.transform}
        if f.categories:
            entry["categories"] = list(f.categories)
        features.append(entry)
    return {"features": features}


@pytest.fixture(scope="module")
def rides() -> list[dict[str, Any]]:
    return generate_rides(600, seed=5)


@pytest.fixture(scope="module")
def booster(tmp_path_factory: pytest.TempPathFactory, rides: list[dict[str, Any]]) -> Path:
    """A booster trained on the worker's matrix, saved in the three formats XGBoost writes."""
    x = training_matrix(rides, FEATURES).matrix
    y = x[:, 0] * 2.0 + np.nan_to_num(x[:, 8], nan=1.0)
    dtrain = xgb.DMatrix(x, label=y, feature_names=NAMES)
    model = xgb.train({"max_depth": 3, "nthread": 1}, dtrain, 10)
    root = tmp_path_factory.mktemp("booster")
    for suffix in ("ubj", "json"):
        model.save_model(str(root / f"model.{suffix}"))
    return root / "model.ubj"


def test_the_training_matrix_is_the_matrix_the_worker_builds(rides: list[dict[str, Any]]) -> None:
    schema = load_ride_schema()
    encoded = [_encode(schema, r) for r in rides]
    worker = AvroColumns(Decoder(schema, 1 << 20), FeatureBuilder(FEATURES), id_field="ride_id")
    cols = worker.run(encoded)
    built = training_matrix(rides, FEATURES)
    assert built.kept.all()
    np.testing.assert_array_equal(built.matrix, cols.matrix)


def _encode(schema: dict[str, Any], record: dict[str, Any]) -> Any:
    import io

    from support import Msg

    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, record)
    return Msg(buf.getvalue())


def test_training_matrix_marks_the_rows_the_worker_dead_letters() -> None:
    rides = generate_rides(3, seed=1)
    rides[1]["distance_km"] = float("nan")  # policy nan: dead_letter
    built = training_matrix(rides, FEATURES)
    assert built.kept.tolist() == [True, False, True]
    assert [r.reason for r in built.rejected] == ["nan_value"]


@pytest.mark.parametrize("suffix", ["ubj", "json"])
def test_pack_writes_a_model_directory_the_worker_loads(
    booster: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / "fraud"
    manifest = pack(booster.with_suffix(f".{suffix}"), load_ride_schema(), out, mapping=_mapping())
    assert manifest.objective == "reg:squarederror"
    assert manifest.feature_names == NAMES
    assert manifest.model_version.startswith("fraud-")
    assert manifest.xgboost_version == xgb.__version__
    assert read_manifest(out) == manifest
    assert check(out, load_ride_schema()) == manifest


def test_pack_stores_reference_bins_from_a_sample(
    booster: Path, tmp_path: Path, rides: list[dict[str, Any]]
) -> None:
    schema = load_ride_schema()
    avro = tmp_path / "sample.avro"
    with avro.open("wb") as fh:
        fastavro.writer(fh, schema, rides)
    sample_csv = tmp_path / "sample.csv"
    with sample_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rides[0]))
        writer.writeheader()
        for r in rides:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    refs = []
    for sample in (avro, sample_csv):
        manifest = pack(booster, schema, tmp_path / sample.stem, mapping=_mapping(), sample=sample)
        refs.append(json.loads((tmp_path / sample.stem / "manifest.json").read_text())["reference"])
        assert manifest.reference["rows"] == len(rides)
    assert refs[0] == refs[1]  # the same records through either file
    ref = refs[0]
    distance = ref["features"]["distance_km"]
    assert len(distance["shares"]) == len(distance["edges"]) + 1
    assert sum(distance["shares"]) + distance["missing"] == pytest.approx(1.0)
    assert ref["features"]["surge_multiplier"]["missing"] > 0.1  # ~20% null
    assert len(ref["features"]["vehicle_type"]["shares"]) == 4
    assert sum(ref["prediction"]["shares"]) == pytest.approx(1.0)


def test_pack_names_the_feature_that_does_not_fit(booster: Path, tmp_path: Path) -> None:
    schema = load_ride_schema()
    swapped = _mapping()
    swapped["features"][3], swapped["features"][4] = swapped["features"][4], swapped["features"][3]
    with pytest.raises(ModelError, match=r"feature 'weekday' \(column 3\): the booster has 'hour'"):
        pack(booster, schema, tmp_path / "a", mapping=swapped)
    short = {"features": _mapping()["features"][:-1]}
    with pytest.raises(ModelError, match="feature 'surge_multiplier': the booster has it"):
        pack(booster, schema, tmp_path / "b", mapping=short)
    typo = _mapping()
    typo["features"][0]["field"] = "distance"
    with pytest.raises(SchemaError, match="feature 'distance_km'"):
        pack(booster, schema, tmp_path / "c", mapping=typo)
    wrong_type = _mapping()
    wrong_type["features"][1]["field"] = "ride_id"
    with pytest.raises(SchemaError, match="feature 'pickup_zone': field 'ride_id' is string"):
        pack(booster, schema, tmp_path / "d", mapping=wrong_type)
    # without a mapping, each booster feature comes from the field of its name: 'hour' has none
    with pytest.raises(ModelError, match="feature 'hour'"):
        pack(booster, schema, tmp_path / "e")


def test_a_legacy_binary_booster_is_refused_with_how_to_convert_it(tmp_path: Path) -> None:
    legacy = tmp_path / "model.bin"
    legacy.write_bytes(b"\x00\x00\x00?\x03\x00\x00\x00binf" + bytes(64))
    with pytest.raises(ModelError, match=r"legacy binary format.*save it again as UBJSON"):
        pack(legacy, load_ride_schema(), tmp_path / "out", mapping=_mapping())


def test_check_refuses_a_changed_model_file(booster: Path, tmp_path: Path) -> None:
    out = tmp_path / "m"
    pack(booster, load_ride_schema(), out, mapping=_mapping())
    data = bytearray((out / "model.ubj").read_bytes())
    data[-5] ^= 0xFF
    (out / "model.ubj").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        check(out, load_ride_schema())


def test_feature_flags() -> None:
    assert parse_feature_flag("hour=requested_at:hour_of_day") == {
        "name": "hour",
        "field": "requested_at",
        "transform": "hour_of_day",
    }
    assert parse_feature_flag("v=vehicle_type:category:A,B")["categories"] == ["A", "B"]
    with pytest.raises(ModelError, match="NAME=FIELD"):
        parse_feature_flag("hour")


def test_the_commands_exit_2_naming_the_feature(
    booster: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = [
        f"--feature={f.name}={f.field}:{f.transform}"
        + (":" + ",".join(f.categories) if f.categories else "")
        for f in FEATURES
    ]
    out = tmp_path / "cli"
    args = ["model", "pack", str(booster), "--schema", str(RIDE_SCHEMA_PATH), "--out", str(out)]
    assert main([*args, *flags]) == 0
    assert main(["model", "check", str(out), "--schema", str(RIDE_SCHEMA_PATH)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main([*args, *flags[:-1]]) == 2
    mapping = tmp_path / "features.yaml"
    mapping.write_text(json.dumps({"features": _mapping()["features"][::-1]}))
    assert main([*args, "--features", str(mapping)]) == 2
