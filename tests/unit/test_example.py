import io
import math
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import fastavro
import numpy as np
import pytest
import xgboost as xgb
from support import Msg

from stream_scorer.contracts.manifest import read_manifest, sha256_file
from stream_scorer.errors import BrokerError
from stream_scorer.example import produce
from stream_scorer.example.produce import (
    EXPECTED_DEAD_LETTERS,
    MALFORMED_KINDS,
    UNDECODABLE_KINDS,
    RideEncoder,
    encode_ride,
    expected_reasons,
    malformed_payload,
    produce_events,
)
from stream_scorer.example.rides import (
    FEATURES,
    feature_matrix,
    generate_columns,
    generate_rides,
    load_ride_schema,
    to_records,
    trip_duration_minutes,
)
from stream_scorer.example.train import train
from stream_scorer.stages.decode import Decoder
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.records import DeadLetter, Stage

SCHEMA = load_ride_schema()
ENCODER = RideEncoder()
RIDE = generate_rides(1, seed=3)[0]
LONG_ID_RIDE = {**RIDE, "ride_id": "r" * 300}  # a two-byte length varint
RIDES = [RIDE, LONG_ID_RIDE, *generate_rides(20, seed=11)]


def strict_decode(payload: bytes | None) -> dict[str, Any]:
    """fastavro's reader plus the checks it lacks: every byte consumed (UTF-8 it checks)."""
    assert payload is not None  # a tombstone is no record
    buf = io.BytesIO(payload)
    record = fastavro.schemaless_reader(buf, SCHEMA, None)
    if buf.tell() != len(payload):
        raise ValueError(f"trailing bytes: record ends at {buf.tell()} of {len(payload)}")
    assert isinstance(record, dict)
    return record


def expected_decoded(ride: dict[str, Any]) -> dict[str, Any]:
    when = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ride["requested_at"])
    return {**ride, "requested_at": when}


DECODER = Decoder(SCHEMA, 1 << 20)
BUILDER = FeatureBuilder(FEATURES)


def outcome(value: bytes | None) -> tuple[Stage, str] | None:
    """What the worker's decode and feature stages make of a value: a dead letter or None."""
    out = DECODER.decode(Msg(value))
    if isinstance(out, DeadLetter):
        assert out.stage is Stage.DECODE
        return (out.stage, out.reason)
    _, rejected = BUILDER.build([out.record])
    return (Stage.FEATURES, rejected[0].reason) if rejected else None


# written out, not derived: the fault-injection suite counts dead letters by these
EXPECTED = {
    "truncated": ("decode", "truncated"),
    "trailing_bytes": ("decode", "trailing_bytes"),
    "empty": ("decode", "empty"),
    "bad_enum_index": ("decode", "bad_enum_index"),
    "invalid_utf8": ("decode", "invalid_utf8"),
    "negative_length": ("decode", "negative_length"),
    "wrong_schema": ("decode", "truncated"),
    "varint_too_long": ("decode", "varint_too_long"),
    "int_out_of_range": ("decode", "int_out_of_range"),
    "bad_union_index": ("decode", "bad_union_index"),
    "tombstone": ("decode", "null_value"),
    "timestamp_in_micros": ("decode", "malformed_avro"),
    "infinite_distance": ("features", "non_finite"),
    "nan_distance": ("features", "nan_value"),
    "too_many_passengers": ("features", "out_of_range"),
}


def test_the_expected_dead_letters_are_as_documented() -> None:
    assert {k: (s.value, r) for k, (s, r) in EXPECTED_DEAD_LETTERS.items()} == EXPECTED
    assert tuple(EXPECTED) == MALFORMED_KINDS
    assert len(set(EXPECTED.values())) >= 12  # distinct reasons; wrong_schema shares one
    assert set(MALFORMED_KINDS) - set(UNDECODABLE_KINDS) == {
        "infinite_distance",
        "nan_distance",
        "too_many_passengers",
    }
    with pytest.raises(ValueError, match="unknown malformed kind"):
        malformed_payload("gremlins", RIDE, SCHEMA)


@pytest.mark.parametrize("ride", RIDES, ids=lambda r: r["ride_id"][:12])
@pytest.mark.parametrize("kind", MALFORMED_KINDS)
@pytest.mark.parametrize("seeded", [False, True], ids=["no-rng", "rng"])
def test_every_kind_lands_on_its_dead_letter(kind: str, ride: dict[str, Any], seeded: bool) -> None:
    rng = np.random.default_rng(5) if seeded else None
    payload = malformed_payload(kind, ride, SCHEMA, rng)
    assert outcome(payload) == EXPECTED_DEAD_LETTERS[kind]


@pytest.mark.parametrize(
    ("kind", "field", "check"),
    [
        ("infinite_distance", "distance_km", lambda v: v == math.inf),
        ("nan_distance", "distance_km", math.isnan),
        ("too_many_passengers", "passenger_count", lambda v: v == 12),
    ],
)
@pytest.mark.parametrize("ride", RIDES[:3], ids=lambda r: r["ride_id"][:12])
def test_feature_kinds_are_valid_avro_with_one_bad_value(
    kind: str, field: str, check: Callable[[Any], bool], ride: dict[str, Any]
) -> None:
    record = strict_decode(malformed_payload(kind, ride, SCHEMA))
    assert check(record[field])
    assert {k: v for k, v in record.items() if k != field} == {
        k: v for k, v in expected_decoded(ride).items() if k != field
    }


def test_varint_too_long_pads_requested_at_to_eleven_bytes() -> None:
    good = ENCODER.encode(RIDE)
    bad = ENCODER.malformed("varint_too_long", RIDE)
    assert bad is not None
    start = 1 + len(RIDE["ride_id"])
    end = start + 11
    assert [b >> 7 for b in bad[start:end]] == [1] * 10 + [0]
    assert bad[:start] == good[:start]
    assert bad[end:] == good[len(good) - len(bad) + end :]


def test_tombstone_is_a_null_value() -> None:
    assert malformed_payload("tombstone", RIDE, SCHEMA) is None


def test_expected_reasons_counts_by_stage_and_reason() -> None:
    got = expected_reasons({"truncated": 2, "wrong_schema": 3, "nan_distance": 1})
    assert got == {(Stage.DECODE, "truncated"): 5, (Stage.FEATURES, "nan_value"): 1}


def test_trailing_bytes_with_an_rng_is_deterministic() -> None:
    def make(seed: int) -> bytes:
        payload = malformed_payload("trailing_bytes", RIDE, SCHEMA, np.random.default_rng(seed))
        assert payload is not None
        return payload

    assert make(1) == make(1)
    assert make(1).startswith(encode_ride(RIDE, SCHEMA))


@pytest.mark.parametrize("ride", RIDES, ids=lambda r: r["ride_id"][:12])
def test_valid_rides_round_trip_to_the_same_dict(ride: dict[str, Any]) -> None:
    payload = encode_ride(ride, SCHEMA)
    assert payload == ENCODER.encode(ride)
    assert strict_decode(payload) == expected_decoded(ride)


@pytest.mark.parametrize("seed", [0, 9, 12345])
def test_generate_rides_is_deterministic_with_unique_ids(seed: int) -> None:
    rides = generate_rides(2000, seed=seed, start_ms=1_700_000_000_000)
    assert rides == generate_rides(2000, seed=seed, start_ms=1_700_000_000_000)
    assert rides != generate_rides(2000, seed=seed + 1, start_ms=1_700_000_000_000)
    assert len({r["ride_id"] for r in rides}) == 2000
    null_surge = sum(r["surge_multiplier"] is None for r in rides) / len(rides)
    assert 0.15 < null_surge < 0.25
    assert all(1 <= r["pickup_zone"] <= 263 and 1 <= r["dropoff_zone"] <= 263 for r in rides)
    assert all(r["distance_km"] > 0 and 1 <= r["passenger_count"] <= 6 for r in rides)


def test_trip_duration_is_the_same_from_columns_dicts_and_decoded_events() -> None:
    cols = generate_columns(500, seed=4)
    rides = to_records(cols)
    decoded = [strict_decode(encode_ride(r, SCHEMA)) for r in rides]
    by_cols = trip_duration_minutes(cols, np.random.default_rng(1))
    np.testing.assert_array_equal(by_cols, trip_duration_minutes(rides, np.random.default_rng(1)))
    np.testing.assert_array_equal(by_cols, trip_duration_minutes(decoded, np.random.default_rng(1)))
    assert by_cols.min() >= 1.0
    assert 5.0 < float(np.median(by_cols)) < 40.0


def test_training_features_equal_what_the_worker_builds_from_decoded_events() -> None:
    cols = generate_columns(300, seed=4)
    decoded = [strict_decode(ENCODER.encode(r)) for r in to_records(cols)]
    built, rejected = FeatureBuilder(FEATURES).build(decoded)
    assert rejected == []
    np.testing.assert_array_equal(built, feature_matrix(cols))


@pytest.mark.parametrize("objective", ["reg:squarederror", "binary:logistic"])
def test_training_beats_the_baseline_and_writes_a_consistent_manifest(
    tmp_path: Path, objective: str
) -> None:
    manifest = train(tmp_path, rows=3000, n_estimators=20, objective=objective)
    assert read_manifest(tmp_path) == manifest
    assert manifest.features == FEATURES  # the value policies travel with the model
    assert read_manifest(tmp_path).features[0].effective_policy.nan == "dead_letter"
    assert manifest.model_sha256 == sha256_file(tmp_path / "model.ubj")
    assert manifest.model_version.endswith(manifest.model_sha256[:8])
    assert manifest.objective == objective
    assert manifest.metrics["rows"] == {"train": 2400, "validation": 600}
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
    assert not any(math.isnan(v) for v in val.values())


# --- produce_events against a fake producer (no Kafka) ------------------------------------


class FakeProducer:
    """Records produced messages; raises BufferError every ``full_every`` produce calls."""

    instances: ClassVar[list["FakeProducer"]] = []
    full_every: ClassVar[int] = 0
    fail_keys: ClassVar[frozenset[bytes]] = frozenset()

    def __init__(self, config: dict[str, str]) -> None:
        self.config = config
        self.sent: list[tuple[bytes, bytes | None, Callable[[Any, Any], None]]] = []
        self.calls = 0
        self.buffer_errors = 0
        FakeProducer.instances.append(self)

    def produce(
        self,
        topic: str,
        *,
        value: bytes | None,
        key: bytes,
        headers: Any,
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        self.calls += 1
        if self.full_every and self.calls % self.full_every == 0:
            self.buffer_errors += 1
            raise BufferError("queue full")
        self.sent.append((key, value, on_delivery))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        for key, _value, callback in self.sent:
            callback("boom" if key in self.fail_keys else None, None)
        return 0


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> type[FakeProducer]:
    FakeProducer.instances = []
    FakeProducer.full_every = 0
    FakeProducer.fail_keys = frozenset()
    monkeypatch.setattr(produce, "Producer", FakeProducer)
    return FakeProducer


@pytest.mark.parametrize(
    ("n", "fraction", "full_every"),
    [(100, 0.0, 0), (1000, 0.02, 0), (800, 0.1, 7), (16, 1.0, 3)],
)
def test_produce_events_mixes_exactly_the_asked_malformed_share(
    fake_producer: type[FakeProducer], n: int, fraction: float, full_every: int
) -> None:
    fake_producer.full_every = full_every
    seen: list[int] = []
    report = produce_events("x:9092", "rides", n, malformed_fraction=fraction, progress=seen.append)
    (producer,) = fake_producer.instances
    assert producer.config["acks"] == "all"
    assert producer.config["enable.idempotence"] == "true"
    assert len(producer.sent) == n == report.produced
    n_bad = round(n * fraction)
    assert report.valid == n - n_bad
    assert sum(report.malformed_by_kind.values()) == n_bad
    if n_bad >= len(MALFORMED_KINDS):
        assert set(report.malformed_by_kind) == set(MALFORMED_KINDS)
    assert len(set(report.malformed_keys)) == n_bad
    assert seen[-1] == n
    bad = set(report.malformed_keys)
    dead: Counter[tuple[Stage, str]] = Counter()
    for key, value, _ in producer.sent:
        got = outcome(value)
        assert (got is not None) == (key in bad)
        if got is not None:
            dead[got] += 1
        else:
            assert strict_decode(value)["ride_id"].encode() == key
    assert dead == expected_reasons(report.malformed_by_kind)
    if full_every:
        assert producer.buffer_errors > 0


def test_produce_events_raises_when_a_delivery_fails(fake_producer: type[FakeProducer]) -> None:
    fake_producer.fail_keys = frozenset({b"ride-1-3"})
    with pytest.raises(BrokerError, match="1 of 10 events were not acknowledged"):
        produce_events("x:9092", "rides", 10)


def test_produce_events_paces_to_the_rate(fake_producer: type[FakeProducer]) -> None:
    report = produce_events("x:9092", "rides", 50, rate=200.0)
    assert report.elapsed_s >= 50 / 200.0 * 0.9


def test_the_shipped_schemas_are_the_contracts_in_schemas() -> None:
    from stream_scorer.contracts import EVALUATION_SCHEMA_V1, PREDICTION_SCHEMA_V1
    from stream_scorer.example.rides import RIDE_SCHEMA_PATH

    top = Path(__file__).parents[2] / "schemas"
    shipped_files = (PREDICTION_SCHEMA_V1, EVALUATION_SCHEMA_V1, RIDE_SCHEMA_PATH)
    for shipped in shipped_files:
        assert shipped.read_bytes() == (top / shipped.name).read_bytes(), shipped.name
    assert sorted(p.name for p in top.iterdir()) == sorted(p.name for p in shipped_files)


def test_example_init_writes_a_config_that_loads(tmp_path: Path) -> None:
    from stream_scorer.cli import main
    from stream_scorer.config import load_config
    from stream_scorer.example.files import CONFIG_NAME, MODEL_SUBDIR

    assert main(["example", "init", str(tmp_path / "ex")]) == 0
    (tmp_path / "ex" / MODEL_SUBDIR).mkdir(parents=True)
    cfg = load_config(tmp_path / "ex" / CONFIG_NAME, environ={})
    assert cfg.input.schema == tmp_path / "ex" / "ride_request.v1.avsc"
    assert cfg.first.output.schema == tmp_path / "ex" / "prediction.v1.avsc"
    assert cfg.first.model.path == tmp_path / "ex" / MODEL_SUBDIR


def test_deploy_config_is_the_shipped_example_but_for_its_paths() -> None:
    import yaml

    from stream_scorer.example.files import CONFIG_NAME, example_files

    shipped = yaml.safe_load(example_files()[CONFIG_NAME].read_text())
    deployed = yaml.safe_load(
        (Path(__file__).parents[2] / "deploy" / "config" / "rides.yaml").read_text()
    )
    for section, key in (("input", "schema"), ("output", "schema"), ("model", "path")):
        assert Path(shipped[section].pop(key)).name == Path(deployed[section].pop(key)).name
    assert shipped == deployed
