"""The Confluent wire format on a real Schema Registry (Apicurio) and a real broker."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
import xgboost as xgb
from confluent_kafka import Producer
from conftest import start_local_registry
from support import (
    committed_lag,
    free_ports,
    http_server,
    produce_raw,
    read_record,
    read_topic,
    wait_for,
)

from stream_scorer import headers as hdr
from stream_scorer.errors import RefusedError
from stream_scorer.example.produce import confluent_frame, expected_reasons, produce_events
from stream_scorer.example.rides import (
    FEATURES,
    evolved_ride_schemas,
    generate_rides,
    load_ride_schema,
    ride_as,
)
from stream_scorer.ops.replay import ReplayFilter, replay
from stream_scorer.registry import RegistryClient
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.features import FeatureBuilder

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "deploy" / "config" / "rides.yaml"
SCHEMAS = evolved_ride_schemas()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("registry-model") / "rides"
    done = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "train", "--out", str(path), "--rows", "4000",
         "--trees", "20"],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return path


def _env(
    bootstrap: str, registry: str, model: Path, topics: tuple[str, str, str, str], **extra: str
) -> dict[str, str]:
    topic, preds, dlq, group = topics
    return {
        **os.environ,
        "STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "STREAM_SCORER_INPUT__TOPIC": topic,
        "STREAM_SCORER_INPUT__GROUP_ID": group,
        "STREAM_SCORER_INPUT__FORMAT": "confluent",
        "STREAM_SCORER_OUTPUT__TOPIC": preds,
        "STREAM_SCORER_OUTPUT__FORMAT": "confluent",
        "STREAM_SCORER_DEAD_LETTER__TOPIC": dlq,
        "STREAM_SCORER_MODEL__PATH": str(model),
        "STREAM_SCORER_METRICS__PORT": "0",
        "STREAM_SCORER_REGISTRY__URL": registry,
        **extra,
    }


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    with log.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_scorer", "run", "--config", str(CONFIG)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )  # fmt: skip


def _stop(worker: subprocess.Popen[str], log: Path) -> dict[str, Any]:
    worker.send_signal(signal.SIGTERM)
    out, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, log.read_text()[-3000:]
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return report


def _body(version: str, ride: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(SCHEMAS[version]), ride_as(version, ride))
    return buf.getvalue()


def _frame(schema_id: int) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big")


def _expected(model: Path, rides: list[dict[str, Any]]) -> np.ndarray:
    """The model's own predictions on the rides' v1 features."""
    matrix, rejected = FeatureBuilder(FEATURES).build(rides)
    assert not rejected
    result: np.ndarray = xgb.Booster(model_file=str(model / "model.ubj")).inplace_predict(matrix)
    return result


def _read_with_stock_deserializer(registry: str, messages: list[Any]) -> list[dict[str, Any]]:
    """Predictions read with confluent-kafka's stock AvroDeserializer and nothing else."""
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    out = []
    with SchemaRegistryClient({"url": registry}) as client:
        deserializer = AvroDeserializer(client)
        for msg in messages:
            ctx = SerializationContext(msg.topic(), MessageField.VALUE, msg.headers())
            value = deserializer(msg.value(), ctx)
            assert isinstance(value, dict)
            out.append(value)
    return out


def test_framed_events_are_scored_and_predictions_read_with_the_stock_deserializer(
    tmp_path: Path,
    kafka_bootstrap: str,
    schema_registry: str,
    model_dir: Path,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topics = (unique("rides"), unique("preds"), unique("dlq"), unique("grp"))
    topic, preds, dlq, _ = topics
    make_topics({topic: 2, preds: 2, dlq: 1})
    frame = confluent_frame(schema_registry, topic)
    report = produce_events(
        kafka_bootstrap, topic, 1500, malformed_fraction=0.02, seed=21, frame=frame
    )
    ride = generate_rides(1, seed=3)[0]
    body = _body("v1", ride)
    bad_frames = [
        (b"magic", b"\x05" + frame[1:] + body),  # a wrong magic byte
        (b"short", b"\x00\x00\x01"),  # shorter than the frame
        (b"unknown", _frame(987_654) + body),  # no such id in the registry
        (b"schemaless", body),  # not framed at all: starts with the id's length, not 0
    ]
    produce_raw(kafka_bootstrap, topic, bad_frames, 2)
    # the header form (confluent-kafka-python 2.10+): Apicurio's ccompat API serves no GUIDs
    guid = Producer({"bootstrap.servers": kafka_bootstrap})
    guid.produce(topic, body, b"guid", headers=[(hdr.VALUE_SCHEMA_ID, b"\x01" + bytes(16))])
    assert guid.flush(30) == 0
    log = tmp_path / "worker.log"
    worker = _worker(_env(kafka_bootstrap, schema_registry, model_dir, topics), log)
    try:
        wait_for(
            lambda: sum(committed_lag(kafka_bootstrap, topics[3], topic).values()) == 0,
            120,
            "the worker did not commit every framed event",
        )
    finally:
        _stop(worker, log)

    inputs = {m.key(): m for m in read_topic(kafka_bootstrap, topic)}
    predictions = read_topic(kafka_bootstrap, preds)
    dead = read_topic(kafka_bootstrap, dlq)
    assert len(predictions) == report.valid
    reasons = Counter((dict(m.headers())[hdr.REASON].decode()) for m in dead)
    wanted: Counter[str] = Counter()
    for (_stage, reason), n in expected_reasons(report.malformed_by_kind).items():
        wanted[reason.value] += n
    wanted.update(["bad_magic_byte", "short_frame", "unknown_schema_id", "bad_magic_byte"])
    wanted.update(["unknown_schema_id"])  # the GUID header
    assert reasons == wanted
    for msg in dead:  # the original frames, byte for byte
        assert msg.value() == inputs[msg.key()].value()
    unknown = next(m for m in dead if m.key() == b"unknown")
    assert b"schema id 987654" in dict(unknown.headers())[hdr.CONNECT_EXCEPTION_MESSAGE]
    by_guid = next(m for m in dead if m.key() == b"guid")
    assert b"schema GUID 00000000-" in dict(by_guid.headers())[hdr.CONNECT_EXCEPTION_MESSAGE]
    # dlq replay republishes the framed dead letters as they came (frame and header kept)
    replayed = f"{topic}-replayed"
    make_topics({replayed: 1})
    flt = ReplayFilter(reasons=frozenset({"unknown_schema_id", "bad_magic_byte"}))
    replay(kafka_bootstrap, dlq, replayed, flt)
    again = {m.key(): m for m in read_topic(kafka_bootstrap, replayed)}
    assert set(again) == {b"unknown", b"guid", b"magic", b"schemaless"}
    for key, msg in again.items():
        assert msg.value() == inputs[key].value()
    assert (hdr.VALUE_SCHEMA_ID, b"\x01" + bytes(16)) in again[b"guid"].headers()

    decoded = _read_with_stock_deserializer(schema_registry, predictions)
    ride_schema = load_ride_schema()
    events = [read_record(ride_schema, inputs[m.key()].value()[5:]) for m in predictions]
    np.testing.assert_allclose(
        [d["prediction"] for d in decoded], _expected(model_dir, events), rtol=1e-6
    )
    assert [d["input_id"] for d in decoded] == [e["ride_id"] for e in events]
    subject = RegistryClient(schema_registry).subject_version(f"{preds}-value")
    assert all(m.value()[1:5] == subject[0].to_bytes(4, "big") for m in predictions)


def test_v1_and_v2_interleaved_over_two_topics_score_as_v1_and_an_incompatible_v3_is_dead_lettered(
    tmp_path: Path,
    kafka_bootstrap: str,
    schema_registry: str,
    model_dir: Path,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topics = (unique("rides"), unique("preds"), unique("dlq"), unique("grp"))
    topic, preds, dlq, group = topics
    second = f"{topic}-second"  # input.topics: a pattern, the same group and writer schemas
    make_topics({topic: 2, second: 2, preds: 2, dlq: 1})
    client = RegistryClient(schema_registry)
    subject = f"{topic}-value"
    client.register(subject, json.dumps(SCHEMAS["v1"]))
    client.set_compatibility(subject, "BACKWARD")  # v2 reads v1: accepted
    ids = {v: client.register(subject, json.dumps(SCHEMAS[v])) for v in ("v1", "v2")}
    client.set_compatibility(subject, "FORWARD")
    with pytest.raises(RefusedError) as refusal:  # v2's readers cannot read v3: refused
        client.register(subject, json.dumps(SCHEMAS["v3"]))
    assert refusal.value.status == 409  # a configuration error, not an outage: Apicurio's words
    assert "Incompatible artifact" in str(refusal.value) and "distance_km" in str(refusal.value)
    client.set_compatibility(subject, "NONE")
    ids["v3"] = client.register(subject, json.dumps(SCHEMAS["v3"]))
    assert len(set(ids.values())) == 3
    rides = generate_rides(900, seed=8)
    versions = ["v1" if i % 2 else "v2" for i in range(len(rides))]
    versions[::30] = ["v3"] * len(versions[::30])
    items = [
        (r["ride_id"].encode(), _frame(ids[v]) + _body(v, r))
        for v, r in zip(versions, rides, strict=True)
    ]
    produce_raw(kafka_bootstrap, topic, items[::2], 2)
    produce_raw(kafka_bootstrap, second, items[1::2], 2)
    env = _env(
        kafka_bootstrap, schema_registry, model_dir, topics,
        STREAM_SCORER_OUTPUT__FORMAT="schemaless",
        STREAM_SCORER_INPUT__TOPICS=json.dumps([f"^{second}$"]),
        # the reader schema from the registry: the subject's version 2 (v2; v3 is version 3)
        STREAM_SCORER_INPUT__READER_SUBJECT=subject, STREAM_SCORER_INPUT__READER_VERSION="2",
    )  # fmt: skip
    log = tmp_path / "worker.log"
    worker = _worker(env, log)
    try:
        wait_for(
            lambda: all(
                sum(committed_lag(kafka_bootstrap, group, t).values()) == 0 for t in (topic, second)
            ),
            120,
            "the worker did not commit every event of both topics",
        )
    finally:
        _stop(worker, log)
    dead = read_topic(kafka_bootstrap, dlq)
    v3_keys = {r["ride_id"].encode() for v, r in zip(versions, rides, strict=True) if v == "v3"}
    assert {m.key() for m in dead} == v3_keys
    for m in dead:
        headers = dict(m.headers())
        assert headers[hdr.REASON] == b"schema_mismatch"
        message = headers[hdr.CONNECT_EXCEPTION_MESSAGE].decode()
        assert f"schema id {ids['v3']}" in message and "distance_km" in message
    scored = [r for v, r in zip(versions, rides, strict=True) if v != "v3"]
    by_key = {m.key(): m for m in read_topic(kafka_bootstrap, preds)}
    assert len(by_key) == len(scored)
    prediction_schema = load_schema(ROOT / "schemas" / "prediction.v1.avsc")
    got = [read_record(prediction_schema, by_key[r["ride_id"].encode()].value()) for r in scored]
    np.testing.assert_allclose(
        [g["prediction"] for g in got], _expected(model_dir, scored), rtol=1e-6
    )
    text = log.read_text()
    assert f"reader schema: subject {subject} version 2" in text
    assert "path" in text  # each writer schema's plan is logged


@pytest.fixture
def own_registry(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    registry, url = start_local_registry(tmp_path / "registry")
    try:
        yield registry, url
    finally:
        registry.stop()


def test_a_registry_outage_waits_and_loses_nothing(
    tmp_path: Path,
    kafka_bootstrap: str,
    own_registry: tuple[Any, str],
    model_dir: Path,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    registry, url = own_registry
    topics = (unique("rides"), unique("preds"), unique("dlq"), unique("grp"))
    topic, preds, dlq, group = topics
    make_topics({topic: 2, preds: 2, dlq: 1})
    subject = f"{topic}-value"
    client = RegistryClient(url)
    ids = {v: client.register(subject, json.dumps(SCHEMAS[v])) for v in ("v1", "v2")}
    rides = generate_rides(400, seed=4)
    first = [(r["ride_id"].encode(), _frame(ids["v1"]) + _body("v1", r)) for r in rides[:200]]
    later = [(r["ride_id"].encode(), _frame(ids["v2"]) + _body("v2", r)) for r in rides[200:]]
    produce_raw(kafka_bootstrap, topic, first, 2)
    reader = tmp_path / "ride_request.v2.avsc"
    reader.write_text(json.dumps(SCHEMAS["v2"]))
    env = _env(kafka_bootstrap, url, model_dir, topics, STREAM_SCORER_INPUT__SCHEMA=str(reader),
               STREAM_SCORER_OUTPUT__FORMAT="schemaless",
               STREAM_SCORER_REGISTRY__UNAVAILABLE_TIMEOUT_S="120",
               STREAM_SCORER_REGISTRY__TIMEOUT_S="2")  # fmt: skip
    log = tmp_path / "worker.log"
    worker = _worker(env, log)
    try:
        wait_for(
            lambda: sum(committed_lag(kafka_bootstrap, group, topic).values()) == 0,
            120,
            "the worker did not score the first events",
        )
        registry.stop()  # v2 is not known to the worker yet
        produce_raw(kafka_bootstrap, topic, later, 2)
        wait_for(
            lambda: "registry not answering" in log.read_text(),
            60,
            "the worker did not retry the registry",
        )
        assert worker.poll() is None
        assert sum(committed_lag(kafka_bootstrap, group, topic).values()) > 0
        assert read_topic(kafka_bootstrap, dlq) == []  # waiting, not dead-lettering
        registry.start(timeout=120)  # its storage is kept: the same schemas and ids
        wait_for(
            lambda: sum(committed_lag(kafka_bootstrap, group, topic).values()) == 0,
            120,
            "the worker did not resume after the registry came back",
        )
    finally:
        _stop(worker, log)
    assert read_topic(kafka_bootstrap, dlq) == []
    keys = [m.key() for m in read_topic(kafka_bootstrap, preds)]
    assert sorted(keys) == sorted(r["ride_id"].encode() for r in rides)


def test_the_framed_bench_profile_sets_the_stock_deserializer_beside_the_fast_path(
    tmp_path: Path, schema_registry: str
) -> None:
    from stream_scorer.devtools.bench import example_config, example_payloads, profile_framed
    from stream_scorer.example.train import train

    train(tmp_path, rows=1_000, n_estimators=5)
    got = profile_framed(example_config(tmp_path), example_payloads(300), schema_registry)
    assert set(got) == {
        "schemaless_fast",
        "framed_fast",
        "framed_fast_evolved",
        "stock_deserializer",
        "stock_deserializer_plus_features",
        "stock_evolved",
    }
    assert all(v > 0 for v in got.values())


@pytest.mark.slow  # the whole demo again, framed (test_example_stream runs it plain)
def test_the_demo_balances_its_books_with_framed_events() -> None:
    # every port reserved: --port + 1 (the controller's default) may be another process's
    port, controller, registry_port, _management = free_ports(4)
    demo = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "demo", "--events", "2000", "--port", str(port),
         "--controller-port", str(controller), "--registry-port", str(registry_port),
         "--paced-rate", "400", "--paced-seconds", "1",
         "--format", "confluent"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "events framed with schema id" in demo.stdout
    assert "OK: every event has exactly one prediction" in demo.stdout
    assert "schema registry stopped" in demo.stdout


def test_local_registry_command_starts_reports_and_stops(tmp_path: Path) -> None:
    port, management = free_ports(2)
    base = [sys.executable, "-m", "stream_scorer", "local-registry"]
    where = ["--port", str(port), "--management-port", str(management), "--dir", str(tmp_path)]

    def cli(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, action, *where], capture_output=True, text=True, timeout=180, check=False
        )

    started = cli("start")
    try:
        assert started.returncode == 0, started.stderr
        url = f"http://127.0.0.1:{port}/apis/ccompat/v7"
        assert started.stdout.strip().endswith(url)
        status = cli("status")
        assert status.returncode == 0 and "answering" in status.stdout
        assert RegistryClient(url).register("probe-value", json.dumps(SCHEMAS["v1"])) > 0
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    after = cli("status")
    assert after.returncode == 1 and "not running" in after.stdout


def test_a_registry_refusing_the_credentials_stops_the_worker_at_once_with_exit_2(
    tmp_path: Path,
    kafka_bootstrap: str,
    model_dir: Path,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    """A real HTTP server answering 401; credentials given in registry.url, never printed."""
    topics = (unique("rides"), unique("preds"), unique("dlq"), unique("grp"))
    topic, preds, dlq, _ = topics
    make_topics({topic: 1, preds: 1, dlq: 1})
    ride = generate_rides(1, seed=8)[0]
    produce_raw(kafka_bootstrap, topic, [(b"r", _frame(7) + _body("v1", ride))], 1)
    secret = "hunter2-sr-9"

    def unauthorized(method: str, path: str) -> tuple[int, Any]:
        return 401, {"error_code": 401, "message": "Unauthorized"}

    with http_server(unauthorized) as (url, seen):
        bare = url[len("http://") :]
        env = _env(kafka_bootstrap, f"http://bob:{secret}@{bare}/apis/ccompat/v7", model_dir,
                   topics, STREAM_SCORER_OUTPUT__FORMAT="schemaless")  # fmt: skip
        check = subprocess.run(
            [sys.executable, "-m", "stream_scorer", "config", "check", str(CONFIG)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )  # fmt: skip
        log = tmp_path / "worker.log"
        worker = _worker(env, log)
        out, _ = worker.communicate(timeout=300)
    text = log.read_text()
    assert check.returncode == 0, check.stdout + check.stderr
    assert worker.returncode == 2, text[-3000:]
    assert secret not in check.stdout + check.stderr + text + out
    assert len(seen) == 1  # asked once: not retried as an outage
    assert seen[0][1] == "/apis/ccompat/v7/schemas/ids/7"
    assert seen[0][2] == "Basic " + base64.b64encode(f"bob:{secret}".encode()).decode()
    assert f"schema registry {url}/apis/ccompat/v7 refused the credentials of user 'bob'" in text
    assert "registry not answering" not in text
    assert read_topic(kafka_bootstrap, dlq) == []  # nothing dead-lettered, nothing scored
