"""``stream-scorer evaluate`` on the real broker: predictions joined with later outcomes.

Predictions are written with the project's ``PredictionEncoder``, outcomes with a small Avro
schema, both keyed by the event id on the same partition (co-partitioned). Every metric in the
evaluation topic is compared with reference formulas computed here with numpy on the same
pairs. The evaluator runs in a thread of the test (``Evaluator.run`` with a stop event).
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
import yaml
from confluent_kafka import Producer
from support import (
    REPO,
    load_raw,
    read_topic,
    reference_classifier,
    ride_config,
    train_payment_classifier,
    wait_for,
)

from stream_scorer.config import Config
from stream_scorer.contracts.manifest import read_manifest, write_manifest
from stream_scorer.errors import ConfigError
from stream_scorer.evaluate.rollout import AliasPair, FixedPair, RolloutCanary
from stream_scorer.evaluate.runner import Evaluator, read_evaluation
from stream_scorer.model.pack import reference_bins
from stream_scorer.model.rollout import Rollout
from stream_scorer.model.store import ModelStore, promote, read_rollout, start_rollout
from stream_scorer.registry import RegistryClient
from stream_scorer.stages.encode import PredictionEncoder

pytestmark = pytest.mark.integration

PARTITIONS = 3
OUTCOME_SCHEMA = {
    "type": "record",
    "name": "Outcome",
    "fields": [{"name": "input_id", "type": "string"}, {"name": "outcome", "type": "double"}],
}
#: Item: (event id, value bytes, Kafka timestamp ms).
Item = tuple[str, bytes, int]


def partition_of(event_id: str) -> int:
    """The test's partitioner, the same for both topics: co-partitioned by construction."""
    return zlib.crc32(event_id.encode()) % PARTITIONS


def produce(bootstrap: str, topic: str, items: Sequence[Item]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": "true"})
    errors: list[Any] = []
    for event_id, value, ts in items:
        producer.produce(
            topic,
            value,
            event_id.encode(),
            partition=partition_of(event_id),
            timestamp=ts,
            on_delivery=lambda err, _m: errors.append(err) if err else None,
        )
    assert producer.flush(30) == 0 and errors == []


ENCODER = PredictionEncoder(
    json.loads((REPO / "schemas" / "prediction.v1.avsc").read_text(encoding="utf-8"))
)
PARSED_OUTCOME = fastavro.parse_schema(OUTCOME_SCHEMA)


def prediction(event_id: str, p: float, label: int | None, version: str, t: int) -> Item:
    return event_id, ENCODER.encode(event_id, p, label, version, t, t), t


def outcome(event_id: str, y: float, t: int) -> Item:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED_OUTCOME, {"input_id": event_id, "outcome": y})
    return event_id, buf.getvalue(), t


class Setup:
    """Topics and a configuration for one test."""

    def __init__(
        self,
        tmp_path: Path,
        bootstrap: str,
        unique: Callable[[str], str],
        make_topics: Callable[[dict[str, int]], None],
        **evaluate: Any,
    ) -> None:
        self.bootstrap = bootstrap
        self.predictions, self.outcomes, self.evaluations = (
            unique("predictions"),
            unique("outcomes"),
            unique("evaluations"),
        )
        make_topics({self.predictions: PARTITIONS, self.outcomes: PARTITIONS, self.evaluations: 1})
        schema = tmp_path / "outcome.avsc"
        schema.write_text(json.dumps(OUTCOME_SCHEMA))
        self.raw = ride_config(
            tmp_path,
            kafka={"bootstrap_servers": bootstrap},
            output={"topic": self.predictions},
            evaluate={
                "group_id": unique("evaluate"),
                "topic": self.evaluations,
                "outcomes": {"topic": self.outcomes, "schema": str(schema)},
                "horizon_s": 120,
                "window_s": 3600,
                "metrics_port": 0,
                **evaluate,
            },
        )
        self.cfg: Config = load_raw(tmp_path, self.raw)

    def records(self) -> list[dict[str, Any]]:
        return [read_evaluation(m.value()) for m in read_topic(self.bootstrap, self.evaluations)]


@pytest.fixture
def running() -> Iterator[Callable[[Evaluator], threading.Event]]:
    """Start an evaluator in a thread; every one is stopped (and its error raised) at the end."""
    started: list[tuple[threading.Thread, threading.Event, list[BaseException]]] = []

    def start(evaluator: Evaluator) -> threading.Event:
        stop = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            try:
                evaluator.run(stop)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        started.append((thread, stop, errors))
        return stop

    yield start
    for thread, stop, errors in started:
        stop.set()
        thread.join(60)
        assert not thread.is_alive()
        assert errors == []


def stopped(evaluator: Evaluator, stop: threading.Event) -> None:
    stop.set()
    wait_for(lambda: evaluator._consumer is None, 60, "the evaluator to stop")


def check_window(record: dict[str, Any], p: np.ndarray, y: np.ndarray, lab: np.ndarray) -> None:
    want = reference_classifier(p, y, lab)
    assert record["outcomes"] == len(p) and record["positives"] == int(y.sum())
    for name in ("log_loss", "brier", "precision", "recall"):
        assert record[name] == pytest.approx(want[name], rel=1e-9), name
    assert abs(record["auc"] - want["auc"]) <= record["auc_error_bound"] + 1e-12


def outcomes_of(n: int, seed: int) -> np.ndarray:
    """Outcomes, 30% of them 1."""
    return (np.random.default_rng(seed).random(n) < 0.3).astype(np.float64)


def scores(y: np.ndarray, seed: int, quality: float) -> np.ndarray:
    """Probabilities for outcomes ``y``; ``quality`` 0 = noise, 1 = separates well."""
    rng = np.random.default_rng(seed)
    signal = 0.2 + 0.6 * y + 0.1 * rng.normal(size=len(y))
    return np.clip((1 - quality) * rng.random(len(y)) + quality * signal, 0.001, 0.999)


def test_live_metrics_per_version_and_restart_rebuilds_the_join(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    running: Callable[[Evaluator], threading.Event],
) -> None:
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics, window_events=200)
    n = 400
    y = outcomes_of(n, seed=1)
    p = scores(y, seed=11, quality=0.6)
    labels = (p >= 0.5).astype(np.float64)
    versions = np.array(["v2" if i % 4 == 0 else "v1" for i in range(n)])
    t0 = int(time.time() * 1000) - 30_000
    ids = [f"e{i}" for i in range(n)]
    produce(
        kafka_bootstrap,
        s.predictions,
        [prediction(ids[i], p[i], int(labels[i]), versions[i], t0 + i) for i in range(n)],
    )
    # the first half's outcomes arrive a second after their predictions
    produce(kafka_bootstrap, s.outcomes, [outcome(ids[i], y[i], t0 + i + 1000) for i in range(200)])
    first = Evaluator(s.cfg)
    stop = running(first)
    wait_for(lambda: len(s.records()) == 2, 60, "the first window's two records")
    stopped(first, stop)
    # while it is stopped, the second half's outcomes arrive; a new evaluator must find their
    # predictions again (read back over the horizon) and count only the new pairs
    produce(
        kafka_bootstrap, s.outcomes, [outcome(ids[i], y[i], t0 + i + 2000) for i in range(200, n)]
    )
    second = Evaluator(s.cfg)
    running(second)
    wait_for(lambda: len(s.records()) == 4, 60, "the second window's two records")
    records = s.records()
    for window, rows in ((0, slice(0, 200)), (1, slice(200, n))):
        for version in ("v1", "v2"):
            (record,) = [
                r for r in records[2 * window : 2 * window + 2] if r["model_version"] == version
            ]
            mask = np.zeros(n, dtype=bool)
            mask[rows] = True
            mask &= versions == version
            check_window(record, p[mask], y[mask], labels[mask])
            assert record["task"] == "classification" and record["unlabelled"] == 0
    # the Prometheus gauges hold the last window's values
    last_v1 = next(r for r in records[2:] if r["model_version"] == "v1")
    got = second.metrics.prometheus.get_sample_value(
        "stream_scorer_evaluation_brier", {"model": "model", "version": "v1"}
    )
    assert got == pytest.approx(last_v1["brier"])


def test_outcomes_within_and_beyond_the_horizon_are_counted(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    running: Callable[[Evaluator], threading.Event],
) -> None:
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics, window_events=40)
    rng = np.random.default_rng(5)
    truth = rng.normal(20, 4, 50)
    guess = truth + rng.normal(0.7, 2.0, 50)
    t0 = int(time.time() * 1000) - 60_000
    ids = [f"r{i}" for i in range(50)]
    evaluator = Evaluator(s.cfg)
    running(evaluator)
    produce(
        kafka_bootstrap,
        s.predictions,
        [prediction(ids[i], guess[i], None, "reg-1", t0 + i) for i in range(50)],
    )
    try:
        wait_for(lambda: len(evaluator.state.predictions) == 50, 60, "the predictions read")
    except TimeoutError as exc:
        raise AssertionError(
            f"{exc}: {len(evaluator.state.predictions)} read, failure {evaluator._failure!r}, "
            f"committed {evaluator._committed}"
        ) from exc
    on_time = [outcome(ids[i], truth[i], t0 + i + 5_000) for i in range(40)]
    ghosts = [outcome(f"ghost{i}", 1.0, t0 - 1000) for i in range(3)]  # no prediction
    produce(kafka_bootstrap, s.outcomes, on_time + ghosts)
    wait_for(lambda: len(s.records()) == 1, 60, "the window of the 40 joined outcomes")
    (record,) = s.records()
    e = guess[:40] - truth[:40]
    assert record["task"] == "regression" and record["outcomes"] == 40
    assert record["mae"] == pytest.approx(float(np.mean(np.abs(e))), rel=1e-9)
    assert record["rmse"] == pytest.approx(float(np.sqrt(np.mean(e**2))), rel=1e-9)
    assert record["bias"] == pytest.approx(float(np.mean(e)), rel=1e-9)
    # ids 40..44: outcomes 1 ms past the horizon; 45..49: none
    late = [outcome(ids[i], truth[i], t0 + i + 120_001) for i in range(40, 45)]
    produce(kafka_bootstrap, s.outcomes, late)
    sample = evaluator.metrics.prometheus.get_sample_value
    labels = {"model": "model", "version": "reg-1"}

    def counted(late: int, unlabelled: int, unmatched: int) -> Callable[[], bool]:
        return lambda: (
            sample("stream_scorer_evaluation_late_outcomes_total") == late
            and sample("stream_scorer_evaluation_unlabelled_total", labels) == unlabelled
            and sample("stream_scorer_evaluation_unmatched_outcomes_total") == unmatched
        )

    # the late outcomes move the stream time past the ghosts' horizon (unmatched), not yet
    # past that of ids 45..49
    wait_for(counted(5, 5, 3), 60, "5 late outcomes (their predictions unlabelled), 3 unmatched")
    # a far later outcome moves the stream time past every horizon: ids 45..49 had none
    produce(kafka_bootstrap, s.outcomes, [outcome("tick", 0.0, t0 + 200_000)])
    wait_for(counted(5, 10, 3), 60, "10 unlabelled predictions")
    assert sample("stream_scorer_evaluation_joined_total", labels) == 40
    assert sample("stream_scorer_evaluation_pending", {"kind": "prediction"}) == 0


def test_canary_decisions_in_dry_run(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    running: Callable[[Evaluator], threading.Event],
) -> None:
    rule = {
        "metric": "log_loss",
        "min_outcomes": 100,
        "promote_margin": 0.0,
        "rollback_margin": 0.05,
    }
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics, window_events=1000, decide=rule)
    n = 1000
    y = outcomes_of(n, seed=2)
    good, bad, better = scores(y, 3, 0.7), scores(y, 4, 0.1), scores(y, 5, 0.9)
    t0 = int(time.time() * 1000) - 30_000
    # 80% champion v1; 20% canary: v2 (worse) or v3 (better), alternating
    version: list[str] = []
    value: list[float] = []
    for i in range(n):
        name, values = ("v1", good) if i % 5 else ("v2", bad) if i % 10 else ("v3", better)
        version.append(name)
        value.append(float(values[i]))
    produce(
        kafka_bootstrap,
        s.predictions,
        [prediction(f"c{i}", value[i], int(value[i] >= 0.5), version[i], t0 + i) for i in range(n)],
    )
    produce(kafka_bootstrap, s.outcomes, [outcome(f"c{i}", y[i], t0 + i + 1000) for i in range(n)])
    decided: dict[str, dict[str, Any]] = {}
    for challenger in ("v2", "v3"):
        cfg = load_raw(
            tmp_path, {**s.raw, "evaluate": {**s.raw["evaluate"], "group_id": unique("decide")}}
        )
        ev = Evaluator(cfg, rollout=FixedPair("v1", challenger), apply=False)
        running(ev)
        wait_for(lambda ev=ev: ev.report.decisions, 60, f"a decision on {challenger}")
        decided[challenger] = ev.report.decisions[0]
    assert decided["v2"]["action"] == "rollback" and decided["v3"]["action"] == "promote"
    assert not decided["v2"]["applied"] and not decided["v3"]["applied"]
    # each decision and its evidence is in the evaluation topic, on the challenger's record
    records = s.records()
    for challenger, action in (("v2", "rollback"), ("v3", "promote")):
        rec = next(
            r for r in records if r["model_version"] == challenger and r["decision"] is not None
        )
        d = rec["decision"]
        champion = next(
            r
            for r in records
            if r["model_version"] == "v1" and r["window_end"] == rec["window_end"]
        )
        assert d["action"] == action and d["metric"] == "log_loss"
        assert d["challenger_outcomes"] == rec["outcomes"] == 100
        assert d["champion_outcomes"] == champion["outcomes"] == 800
        assert d["challenger_value"] == pytest.approx(rec["log_loss"])
        assert d["champion_value"] == pytest.approx(champion["log_loss"])
        assert d["gap"] == pytest.approx(rec["log_loss"] - champion["log_loss"])
    # not a dry run: the worse challenger is rolled back through the model store's aliases
    store = alias_store(tmp_path)
    cfg = load_raw(
        tmp_path, {**s.raw, "evaluate": {**s.raw["evaluate"], "group_id": unique("act")}}
    )
    ev = Evaluator(cfg, rollout=AliasPair(store, "champion", "challenger"), apply=True)
    running(ev)
    wait_for(lambda: ev.report.decisions, 60, "the decision carried out")
    assert ev.report.decisions[0]["action"] == "rollback" and ev.report.decisions[0]["applied"]
    assert store.get_alias("challenger") == "v1" and store.get_alias("champion") == "v1"
    wait_for(
        lambda: any(r["decision"] and r["decision"]["applied"] for r in s.records()),
        60,
        "the applied decision in the evaluation topic",
    )
    # the canary as a rollout record (model rollout --canary v2 --percent 20): the worse
    # challenger's rollout is ended, every key back on the champion
    store = alias_store(tmp_path / "canary")
    start_rollout(store, Rollout("canary", "v1", (("v2", 20.0),)), "champion")
    cfg = load_raw(
        tmp_path, {**s.raw, "evaluate": {**s.raw["evaluate"], "group_id": unique("canary")}}
    )
    ev = Evaluator(cfg, rollout=RolloutCanary(store, "champion"), apply=True)
    running(ev)
    wait_for(lambda: ev.report.decisions, 60, "the rollout's decision carried out")
    assert ev.report.decisions[0]["action"] == "rollback" and ev.report.decisions[0]["applied"]
    assert read_rollout(store, "champion") is None and store.get_alias("champion") == "v1"


def alias_store(folder: Path) -> ModelStore:
    """A model store with versions v1 and v2: champion v1, challenger v2."""
    store = ModelStore(folder / "store", "fraud")
    manifest = train_payment_classifier(folder / "src" / "v1")
    for version in ("v1", "v2"):
        if version != "v1":
            shutil.copytree(folder / "src" / "v1", folder / "src" / version)
        write_manifest(
            folder / "src" / version, dataclasses.replace(manifest, model_version=version)
        )
        store.publish(folder / "src" / version)
    promote(store, "v1", "champion")
    promote(store, "v2", "challenger")
    return store


def drift_store(folder: Path) -> ModelStore:
    """A store with v1 (champion) and v2 (challenger) packed with reference bins: predictions
    uniform on [0, 1] (10 decile bins of 10,000 rows)."""
    store = alias_store(folder)
    rng = np.random.default_rng(11)
    for version in ("v1", "v2"):
        manifest = read_manifest(store.version_dir(version))
        features = {
            f.name: reference_bins(rng.random(10_000), len(f.categories)) for f in manifest.features
        }
        reference = {
            "rows": 10_000,
            "features": features,
            "prediction": reference_bins(rng.random(10_000)),
        }
        write_manifest(
            store.version_dir(version), dataclasses.replace(manifest, reference=reference)
        )
    return store


def test_a_challenger_whose_predictions_drift_is_rolled_back_without_outcomes(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    running: Callable[[Evaluator], threading.Event],
) -> None:
    rule = {
        "metric": "log_loss",
        "min_outcomes": 100,
        "rollback_margin": 0.05,
        "max_prediction_psi": 0.2,
    }
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics, window_s=1, decide=rule)
    store = drift_store(tmp_path)
    start_rollout(store, Rollout("canary", "v1", (("v2", 20.0),)), "champion")
    rng = np.random.default_rng(12)
    t0 = int(time.time() * 1000) - 30_000
    # the champion's predictions look like its reference; the challenger's all sit in the
    # upper half (a shifted score distribution); no outcome at all is written
    items = []
    for i in range(2000):
        version, p = ("v2", 0.5 + 0.5 * rng.random()) if i % 2 else ("v1", rng.random())
        items.append(prediction(f"d{i}", p, int(p >= 0.5), version, t0 + i))
    produce(kafka_bootstrap, s.predictions, items)
    ev = Evaluator(
        s.cfg, rollout=RolloutCanary(store, "champion"), apply=True, fetch=store.version_dir
    )
    running(ev)
    wait_for(
        lambda: any(d["applied"] for d in ev.report.decisions), 60, "the drift rollback applied"
    )
    d = next(d for d in ev.report.decisions if d["applied"])
    assert d["action"] == "rollback" and d["psi_bound"] == 0.2
    assert d["challenger"]["n"] == 0 and d["challenger"]["predictions"] >= 100
    assert d["challenger"]["psi"] - d["challenger"]["psi_expected"] > 0.2
    assert read_rollout(store, "champion") is None and store.get_alias("champion") == "v1"
    # the evidence in the evaluation topic: the challenger's record and its decision; the
    # champion's predictions, drawn like its reference, stay near the no-drift noise
    wait_for(
        lambda: any(r["decision"] and r["decision"]["applied"] for r in s.records()),
        60,
        "the applied decision in the evaluation topic",
    )

    def champion_records() -> list[dict[str, Any]]:
        return [r for r in s.records() if r["model_version"] == "v1" and r["predictions"]]

    wait_for(
        lambda: sum(r["predictions"] for r in champion_records()) == 1000,
        60,
        "every champion prediction counted once",
    )
    records = s.records()
    rec = next(r for r in records if r["decision"] and r["decision"]["applied"])
    assert rec["model_version"] == "v2" and rec["outcomes"] == 0
    assert rec["decision"]["challenger_psi"] == rec["prediction_psi"] > 0.2
    assert rec["decision"]["psi_bound"] == 0.2
    assert rec["decision"]["challenger_predictions"] == rec["predictions"]
    big = max(champion_records(), key=lambda r: r["predictions"])
    assert big["prediction_psi"] < 5 * big["prediction_psi_expected"] + 0.05


def test_topics_not_co_partitioned_stop_the_start(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics)
    other = unique("outcomes")
    make_topics({other: PARTITIONS + 1})
    raw = {
        **s.raw,
        "evaluate": {
            **s.raw["evaluate"],
            "outcomes": {**s.raw["evaluate"]["outcomes"], "topic": other},
        },
    }
    ev = Evaluator(load_raw(tmp_path, raw))
    with pytest.raises(ConfigError) as info:
        ev.run(threading.Event())
    assert info.value.field == "evaluate.outcomes.topic" and "partition counts differ" in str(
        info.value
    )


def test_the_command_prints_its_dry_run_decisions(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    """``stream-scorer evaluate --decide --dry-run``, its own process: a JSON line per decision."""
    rule = {"metric": "brier", "min_outcomes": 20, "rollback_margin": 0.05}
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics, window_events=200, decide=rule)
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump(s.raw))
    n = 200
    y = outcomes_of(n, seed=8)
    good, bad = scores(y, 9, 0.8), scores(y, 10, 0.0)
    t0 = int(time.time() * 1000) - 30_000
    p = [float(bad[i] if i % 2 else good[i]) for i in range(n)]
    produce(
        kafka_bootstrap,
        s.predictions,
        [prediction(f"d{i}", p[i], int(p[i] >= 0.5), f"v{1 + i % 2}", t0 + i) for i in range(n)],
    )
    produce(kafka_bootstrap, s.outcomes, [outcome(f"d{i}", y[i], t0 + i + 10) for i in range(n)])
    command = [sys.executable, "-m", "stream_scorer", "evaluate", "--config", str(path)]
    command += ["--decide", "--dry-run", "--champion", "v1", "--challenger", "v2"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        lines.extend(line.strip() for line in proc.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_for(lambda: any('"action"' in line for line in lines), 60, "a decision printed")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        reader.join(30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert code == 0
    decision = json.loads(next(line for line in lines if '"action"' in line))
    assert decision["action"] == "rollback" and decision["applied"] is False
    assert decision["challenger"] == {
        "version": "v2",
        "n": 100,
        "value": pytest.approx(float(np.mean((np.array(p[1::2]) - y[1::2]) ** 2))),
    }
    assert json.loads(lines[-1]) == {"windows": 1, "pairs": 200}


def test_confluent_framed_outcomes_are_read_with_their_registered_schema(
    tmp_path: Path,
    kafka_bootstrap: str,
    schema_registry: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    running: Callable[[Evaluator], threading.Event],
) -> None:
    """Outcomes written by a Schema Registry serializer: frame parsed, writer schema fetched."""
    s = Setup(tmp_path, kafka_bootstrap, unique, make_topics, window_events=30)
    # the writer has one more field than the reader (outcome.avsc): resolved, not refused
    writer = {
        **OUTCOME_SCHEMA,
        "fields": [*OUTCOME_SCHEMA["fields"], {"name": "source", "type": "string"}],
    }
    schema_id = RegistryClient(schema_registry).register(f"{s.outcomes}-value", json.dumps(writer))
    raw = {**s.raw, "registry": {"url": schema_registry}}
    raw["evaluate"] = {
        **raw["evaluate"],
        "outcomes": {**raw["evaluate"]["outcomes"], "format": "confluent"},
    }
    cfg = load_raw(tmp_path, raw)
    y = outcomes_of(30, seed=12)
    p = scores(y, 13, 0.5)
    t0 = int(time.time() * 1000) - 30_000
    produce(
        kafka_bootstrap,
        s.predictions,
        [prediction(f"f{i}", p[i], int(p[i] >= 0.5), "v1", t0 + i) for i in range(30)],
    )
    parsed = fastavro.parse_schema(writer)
    framed = []
    for i in range(30):
        buf = io.BytesIO()
        fastavro.schemaless_writer(
            buf, parsed, {"input_id": f"f{i}", "outcome": y[i], "source": "crm"}
        )
        framed.append(
            (f"f{i}", b"\x00" + schema_id.to_bytes(4, "big") + buf.getvalue(), t0 + i + 10)
        )
    produce(kafka_bootstrap, s.outcomes, framed)
    running(Evaluator(cfg))
    wait_for(lambda: len(s.records()) == 1, 60, "the window of 30 framed outcomes")
    (record,) = s.records()
    check_window(record, p, y, (p >= 0.5).astype(np.float64))
