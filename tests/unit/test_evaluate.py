"""``stream-scorer evaluate``'s pure parts: window metrics, the join state, the canary rule.

Every metric is checked against a reference formula written here with numpy on the same pairs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import yaml
from confluent_kafka import TopicPartition
from support import (
    REPO,
    avro,
    load_raw,
    reference_classifier,
    ride_config,
    train_payment_classifier,
)

from stream_scorer.cli import main
from stream_scorer.cli.watch import fetch_of
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.contracts.manifest import write_manifest
from stream_scorer.errors import ConfigError, ModelError
from stream_scorer.evaluate.decide import Evidence, Rule, decide
from stream_scorer.evaluate.join import JoinState, Outcome, Prediction
from stream_scorer.evaluate.metrics import EvaluationMetrics
from stream_scorer.evaluate.rollout import AliasPair, FixedPair, RolloutCanary
from stream_scorer.evaluate.runner import AvroReader, Evaluator
from stream_scorer.evaluate.stats import ClassifierStats, RegressorStats
from stream_scorer.model.pack import reference_bins
from stream_scorer.model.rollout import Rollout
from stream_scorer.model.store import ModelStore, promote, read_rollout, start_rollout
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.records import PlainMessage

F = npt.NDArray[np.float64]


def classifier_sample(n: int, seed: int) -> tuple[F, F, F]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.2).astype(np.float64)
    p = np.clip(rng.beta(2, 5, n) + 0.3 * y, 0, 1)
    return p, y, (p >= 0.4).astype(np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classifier_metrics_match_the_reference_formulas(seed: int) -> None:
    p, y, labels = classifier_sample(3000, seed)
    stats = ClassifierStats(bins=100)
    for pi, li, yi in zip(p.tolist(), labels.tolist(), y.tolist(), strict=True):
        stats.add(pi, int(li), int(yi))
    got = stats.summary()
    want = reference_classifier(p, y, labels)
    for name in ("log_loss", "brier", "precision", "recall"):
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
    assert got["auc"] is not None and got["auc_error_bound"] is not None
    # the histogram AUC is the exact one to within its own bound (and the bound is small)
    assert abs(got["auc"] - want["auc"]) <= got["auc_error_bound"] + 1e-12
    assert got["auc_error_bound"] < 0.01
    assert stats.n == 3000 and stats.positives == int(y.sum())


def test_histogram_auc_is_the_binned_formula() -> None:
    p, y, labels = classifier_sample(500, 7)
    stats = ClassifierStats(bins=10)
    for pi, li, yi in zip(p.tolist(), labels.tolist(), y.tolist(), strict=True):
        stats.add(pi, int(li), int(yi))
    b = np.minimum((p * 10).astype(int), 9)
    pos = np.bincount(b[y == 1], minlength=10)
    neg = np.bincount(b[y == 0], minlength=10)
    below = np.concatenate([[0], np.cumsum(neg)[:-1]])
    want = float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
    assert stats.summary()["auc"] == pytest.approx(want, rel=1e-12)


def test_undefined_metrics_are_none() -> None:
    stats = ClassifierStats(bins=10)
    stats.add(0.2, 0, 0)
    stats.add(0.3, 0, 0)
    got = stats.summary()
    assert got["auc"] is None and got["precision"] is None and got["recall"] is None
    assert got["log_loss"] == pytest.approx(-(math.log(0.8) + math.log(0.7)) / 2)
    assert ClassifierStats(bins=10).summary()["log_loss"] is None


def test_regressor_metrics_match_the_reference_formulas() -> None:
    rng = np.random.default_rng(3)
    y = rng.normal(10, 3, 2000)
    pred = y + rng.normal(0.5, 1.0, 2000)
    stats = RegressorStats()
    for a, b in zip(pred.tolist(), y.tolist(), strict=True):
        stats.add(a, b)
    got = stats.summary()
    e = pred - y
    assert got["mae"] == pytest.approx(float(np.mean(np.abs(e))), rel=1e-9)
    assert got["rmse"] == pytest.approx(float(np.sqrt(np.mean(e**2))), rel=1e-9)
    assert got["bias"] == pytest.approx(float(np.mean(e)), rel=1e-9)


# --- the join ------------------------------------------------------------------------------


def pred(t: int, version: str = "v1", seen: bool = False) -> Prediction:
    return Prediction(version, 0.7, 1, t, seen)


def test_join_pairs_either_order_within_the_horizon() -> None:
    state = JoinState(horizon_ms=1000, max_pending=10)
    assert state.add_prediction("a", pred(0)) is None
    pair = state.add_outcome("a", Outcome(1.0, 900))
    assert pair is not None and pair.prediction.version == "v1" and pair.counted
    assert state.add_outcome("b", Outcome(0.0, 950)) is None  # outcome first
    pair = state.add_prediction("b", pred(940))
    assert pair is not None and pair.outcome.value == 0.0
    assert not state.predictions and not state.outcomes


def test_late_outcomes_and_expiry_are_counted() -> None:
    state = JoinState(horizon_ms=1000, max_pending=10)
    state.add_prediction("edge", pred(0))
    assert state.add_outcome("edge", Outcome(1.0, 1000)) is not None  # the horizon: inclusive
    state.add_prediction("late", pred(5))
    state.add_prediction("never", pred(10, "v2"))
    state.add_outcome("orphan", Outcome(1.0, 20))
    assert state.add_outcome("late", Outcome(1.0, 1006)) is None  # 1 ms past its horizon
    counts = state.take_counts()
    assert counts.late == 1 and counts.unlabelled == {"v1": 1}
    assert counts.unmatched == 0
    state.add_prediction("x", pred(1021))  # stream time 1021: 'never' and 'orphan' expire
    counts = state.take_counts()
    assert counts.unlabelled == {"v2": 1} and counts.unmatched == 1 and counts.late == 0
    assert list(state.predictions) == ["x"] and not state.outcomes


def test_join_state_is_bounded_oldest_dropped() -> None:
    state = JoinState(horizon_ms=10**9, max_pending=3)
    for i in range(5):
        state.add_prediction(f"p{i}", pred(i))
        state.add_outcome(f"o{i}", Outcome(1.0, i))
    assert list(state.predictions) == ["p2", "p3", "p4"]
    assert list(state.outcomes) == ["o2", "o3", "o4"]
    counts = state.take_counts()
    assert counts.dropped_predictions == 2 and counts.dropped_outcomes == 2
    assert state.add_outcome("p0", Outcome(1.0, 5)) is None  # dropped: no longer joinable


def test_a_pair_read_before_the_restart_is_not_counted_again() -> None:
    state = JoinState(horizon_ms=1000, max_pending=10)
    state.add_prediction("a", pred(0, seen=True))
    pair = state.add_outcome("a", Outcome(1.0, 5, seen=True))
    assert pair is not None and not pair.counted
    state.add_prediction("b", pred(0, seen=True))
    pair = state.add_outcome("b", Outcome(1.0, 5, seen=False))
    assert pair is not None and pair.counted
    state.add_prediction("c", pred(0))
    state.add_prediction("c", Prediction("v9", 0.1, 0, 1))  # the latest prediction wins
    pair = state.add_outcome("c", Outcome(0.0, 5))
    assert pair is not None and pair.prediction.version == "v9"


# --- the canary rule -----------------------------------------------------------------------

LOSS = Rule("log_loss", min_outcomes=100, promote_margin=0.01, rollback_margin=0.05)
AUC = Rule("auc", min_outcomes=100, promote_margin=0.0, rollback_margin=0.02)


@pytest.mark.parametrize(
    ("rule", "champion", "challenger", "action"),
    [
        (LOSS, (1000, 0.30), (200, 0.30), "promote"),  # equal: no worse
        (LOSS, (1000, 0.30), (200, 0.309), "promote"),  # worse within the promote margin
        (LOSS, (1000, 0.30), (200, 0.25), "promote"),  # better
        (LOSS, (1000, 0.30), (200, 0.33), "keep"),  # between the margins
        (LOSS, (1000, 0.30), (200, 0.36), "rollback"),  # worse by more than 0.05
        (LOSS, (1000, 0.30), (99, 0.90), "keep"),  # too few outcomes, however bad
        (LOSS, (99, 0.30), (1000, 0.10), "keep"),  # the champion's too few
        (AUC, (500, 0.80), (500, 0.75), "rollback"),  # higher is better for AUC
        (AUC, (500, 0.80), (500, 0.81), "promote"),
        (AUC, (500, 0.80), (500, 0.79), "keep"),
        (AUC, (500, 0.80), (500, None), "keep"),  # undefined metric
    ],
)
def test_decide(
    rule: Rule,
    champion: tuple[int, float | None],
    challenger: tuple[int, float | None],
    action: str,
) -> None:
    d = decide(rule, Evidence("v1", *champion), Evidence("v2", *challenger))
    assert d.action == action, d.reason
    assert d.champion.version == "v1" and d.challenger.n == challenger[0]
    if action != "keep":
        assert d.gap is not None


DRIFT = Rule(
    "log_loss", min_outcomes=100, promote_margin=0.0, rollback_margin=0.05, max_prediction_psi=0.2
)


@pytest.mark.parametrize(
    ("rule", "outcomes", "log_loss", "predictions", "psi", "noise", "action"),
    [
        # drifted predictions: rolled back without a single outcome (labels not needed)
        (DRIFT, 0, None, 1000, 0.5, 0.01, "rollback"),
        # drifted, and the metric says promote: drift wins
        (DRIFT, 500, 0.25, 1000, 0.5, 0.01, "rollback"),
        # the bound is on the excess over the no-drift noise: 0.25 - 0.09 <= 0.2
        (DRIFT, 500, 0.25, 100, 0.25, 0.09, "promote"),
        (DRIFT, 500, 0.25, 100, 0.30, 0.09, "rollback"),  # 0.21 > 0.2
        # too few predictions: no drift check, however large the PSI
        (DRIFT, 0, None, 99, 3.0, 0.1, "keep"),
        # no reference for the version: no drift check
        (DRIFT, 500, 0.25, 1000, None, 0.0, "promote"),
        # the bound off: drift ignored
        (LOSS, 500, 0.25, 1000, 3.0, 0.01, "promote"),
        # within the bound, worse metric: the metric's rollback as before
        (DRIFT, 500, 0.40, 1000, 0.1, 0.01, "rollback"),
    ],
)
def test_decide_rolls_back_on_prediction_drift(
    rule: Rule,
    outcomes: int,
    log_loss: float | None,
    predictions: int,
    psi: float | None,
    noise: float,
    action: str,
) -> None:
    champion = Evidence("v1", 1000, 0.30, 5000, 0.01, 0.002)
    challenger = Evidence("v2", outcomes, log_loss, predictions, psi, noise)
    d = decide(rule, champion, challenger)
    assert d.action == action, d.reason
    assert d.psi_bound == rule.max_prediction_psi
    if action == "rollback" and d.gap is None:  # the drift trigger: its evidence in the reason
        assert psi is not None and f"{psi:.4g}" in d.reason and "bound 0.2" in d.reason


def test_a_drifting_champion_is_not_rolled_back() -> None:
    champion = Evidence("v1", 1000, 0.30, 5000, 2.0, 0.002)
    challenger = Evidence("v2", 1000, 0.30, 5000, 0.01, 0.002)
    assert decide(DRIFT, champion, challenger).action == "promote"


# --- metrics and configuration --------------------------------------------------------------


def test_version_labels_are_bounded() -> None:
    m = EvaluationMetrics("m", max_versions=2)
    for v in ("v1", "v2", "v3"):
        m.observe_window(v, 10, {"brier": 0.1})
    text = m.render().decode()
    assert 'version="v1"' not in text
    assert 'stream_scorer_evaluation_brier{model="m",version="v3"} 0.1' in text
    assert m.versions() == ["v2", "v3"]


def evaluate_section(**changes: Any) -> dict[str, Any]:
    section: dict[str, Any] = {
        "topic": "evaluations",
        "outcomes": {"topic": "outcomes", "format": "json"},
    }
    section.update(changes)
    return section


def test_evaluate_section_is_validated(tmp_path: Path) -> None:
    cfg = load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section()))
    assert cfg.evaluate.outcomes.id_field == "input_id" and cfg.evaluate.decide is None
    drift = evaluate_section(decide={"metric": "auc", "max_prediction_psi": 0.25})
    decide = load_raw(tmp_path, ride_config(tmp_path, evaluate=drift)).evaluate.decide
    assert decide is not None and decide.max_prediction_psi == 0.25
    off = load_raw(
        tmp_path, ride_config(tmp_path, evaluate=evaluate_section(decide={"metric": "auc"}))
    )
    assert off.evaluate.decide is not None and off.evaluate.decide.max_prediction_psi is None
    bad = [
        (evaluate_section(windw_s=3), "evaluate.windw_s"),
        (evaluate_section(outcomes={"topic": "o"}), "evaluate.outcomes.schema"),
        (evaluate_section(window_s=0, window_events=0), "evaluate.window_events"),
        (evaluate_section(topic="out"), "evaluate.topic"),
        (
            evaluate_section(decide={"metric": "auc", "promote_margin": 0.1}),
            "evaluate.decide.rollback_margin",
        ),
        (evaluate_section(decide={"metric": "accuracy"}), "evaluate.decide.metric"),
        (
            evaluate_section(decide={"metric": "auc", "max_prediction_psi": 0}),
            "evaluate.decide.max_prediction_psi",
        ),
        (
            evaluate_section(
                outcomes={
                    "topic": "o",
                    "format": "confluent",
                    "schema": str(REPO / "schemas" / "prediction.v1.avsc"),
                }
            ),
            "registry.url",
        ),
    ]
    for section, field in bad:
        with pytest.raises(ConfigError) as info:
            load_raw(tmp_path, ride_config(tmp_path, evaluate=section))
        assert info.value.field == field or field in str(info.value), (field, str(info.value))


def test_alias_pair_moves_the_aliases_through_the_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store", "fraud")
    source = tmp_path / "src"
    manifest = train_payment_classifier(source / "v1")
    write_manifest(source / "v1", manifest)
    for version in ("v1", "v2"):
        if version != "v1":
            shutil.copytree(source / "v1", source / version)
        write_manifest(source / version, dataclasses.replace(manifest, model_version=version))
        store.publish(source / version)
    pair = AliasPair(store, "champion", "challenger")
    assert pair.versions() is None  # no aliases yet: nothing to judge
    promote(store, "v1", "champion")
    promote(store, "v2", "challenger")
    assert pair.versions() == ("v1", "v2")
    assert "challenger: v2 -> v1" in pair.rollback()  # the canary's traffic back to v1
    assert store.get_alias("challenger") == "v1" and store.get_alias("champion") == "v1"
    promote(store, "v2", "challenger")
    assert "champion: v1 -> v2" in pair.promote()
    assert store.get_alias("champion") == "v2" and store.get_history("champion") == ["v1"]
    with pytest.raises(ConfigError):
        FixedPair("v1", "v2").rollback()


class StubConsumer:
    """The three consumer calls ``Evaluator._commit`` makes, recorded (no Kafka)."""

    def __init__(self, positions: dict[int, int]) -> None:
        self.positions = positions
        self.commits: list[list[tuple[str, int, int]]] = []

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("t", p) for p in self.positions]

    def position(self, parts: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(p.topic, p.partition, self.positions[p.partition]) for p in parts]

    def commit(self, *, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(p.topic, p.partition, p.offset) for p in offsets])


def test_a_window_never_commits_an_offset_backwards(tmp_path: Path) -> None:
    """While a restart reads back over the horizon, positions are below the committed offsets."""
    cfg = load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section()))
    ev = Evaluator(cfg)
    ev._committed = {("t", 0): 100, ("t", 1): 5}
    stub = StubConsumer({0: 40, 1: 9, 2: -1001})  # partition 2: no position yet
    ev._consumer = stub  # type: ignore[assignment]
    ev._commit()
    assert stub.commits == [[("t", 0, 100), ("t", 1, 9)]]
    assert ev._committed == {("t", 0): 100, ("t", 1): 9}


@pytest.mark.parametrize(
    ("section", "flags", "field"),
    [
        (None, [], "evaluate"),  # no evaluate: section at all
        (evaluate_section(), ["--decide"], "evaluate.decide"),  # --decide without a rule
        (
            evaluate_section(decide={"metric": "auc"}),
            ["--decide", "--champion", "v1", "--challenger", "v2"],  # fixed pair, not dry run
            "--champion",
        ),
        (evaluate_section(decide={"metric": "auc"}), ["--decide"], "evaluate.decide.store"),
    ],
)
def test_the_command_refuses_a_bad_configuration_with_exit_2(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    section: dict[str, Any] | None,
    flags: list[str],
    field: str,
) -> None:
    raw = ride_config(tmp_path) if section is None else ride_config(tmp_path, evaluate=section)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["evaluate", "--config", str(path), *flags]) == 2
    assert f"{field}:" in caplog.text


class StubSchemas:
    """Writer schemas by key, as the registry would answer (``framing.SchemaSource``)."""

    def __init__(self, known: dict[Any, str]) -> None:
        self.known = known

    def writer_schema(self, key: Any) -> str | None:
        return self.known.get(key)


def test_outcomes_are_read_as_json_or_confluent_framed_avro(tmp_path: Path) -> None:
    cfg = load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section()))
    ev = Evaluator(cfg)  # outcomes: json
    enc = PredictionEncoder(json.loads(PREDICTION_SCHEMA_V1.read_text(encoding="utf-8")))
    ev.handle(PlainMessage(enc.encode("a", 0.8, 1, "v1", 1000, 1000), t="out"))
    ev.handle(PlainMessage(b'{"input_id": "a", "outcome": true}', t="outcomes", ts=2000))
    ev.handle(PlainMessage(b"not json", t="outcomes"))
    ev.handle(PlainMessage(b'{"input_id": "x", "outcome": "yes"}', t="outcomes"))
    stats = ev.window.stats["v1"]
    assert isinstance(stats, ClassifierStats) and stats.n == 1 and stats.positives == 1
    invalid = ev.metrics.prometheus.get_sample_value
    assert invalid("stream_scorer_evaluation_invalid_total", {"kind": "outcome"}) == 2
    schema = {
        "type": "record",
        "name": "O",
        "fields": [{"name": "input_id", "type": "string"}, {"name": "outcome", "type": "int"}],
    }
    ev._outcomes = AvroReader(
        json.dumps(schema), True, StubSchemas({("id", 7): json.dumps(schema)})
    )
    body = avro(schema, {"input_id": "b", "outcome": 0})
    ev.handle(PlainMessage(enc.encode("b", 0.3, 0, "v1", 1000, 1000), t="out"))
    ev.handle(PlainMessage(b"\x00" + (7).to_bytes(4, "big") + body, t="outcomes", ts=2000))
    assert stats.n == 2 and stats.positives == 1
    ev.handle(PlainMessage(b"\x00" + (8).to_bytes(4, "big") + body, t="outcomes"))  # unknown id
    ev.handle(PlainMessage(body, t="outcomes"))  # no frame
    assert invalid("stream_scorer_evaluation_invalid_total", {"kind": "outcome"}) == 4
    assert invalid("stream_scorer_evaluation_invalid_total", {"kind": "prediction"}) == 0


def test_the_evaluator_refuses_the_incremental_group_protocol(tmp_path: Path) -> None:
    raw = ride_config(
        tmp_path,
        evaluate=evaluate_section(),
        kafka={"bootstrap_servers": "h:1", "consumer": {"group.protocol": "consumer"}},
    )
    ev = Evaluator(load_raw(tmp_path, raw))
    with pytest.raises(ConfigError) as info:
        ev._consumer_settings()
    assert info.value.field == "kafka.consumer.group.protocol"
    plain = Evaluator(load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section())))
    assert plain._consumer_settings()["partition.assignment.strategy"] == "range"


def test_the_rollout_canary_judges_one_challenger_and_acts_through_the_record(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "store", "fraud")
    source = tmp_path / "src"
    manifest = train_payment_classifier(source / "v1")
    for version in ("v1", "v2", "v3"):
        if version != "v1":
            shutil.copytree(source / "v1", source / version)
        write_manifest(source / version, dataclasses.replace(manifest, model_version=version))
        store.publish(source / version)
    promote(store, "v1", "champion")
    canary = RolloutCanary(store, "champion")
    assert canary.versions() is None  # no rollout in force: nothing judged
    with pytest.raises(ConfigError):
        canary.rollback()
    start_rollout(store, Rollout("ab", "v1", (("v2", 30.0), ("v3", 30.0))), "champion")
    assert canary.versions() is None  # an A/B split over two challengers is not a canary
    start_rollout(store, Rollout("canary", "v1", (("v2", 10.0),)), "champion")
    assert canary.versions() == ("v1", "v2")
    assert "rollout ended" in canary.rollback()
    assert read_rollout(store, "champion") is None and store.get_alias("champion") == "v1"
    start_rollout(store, Rollout("canary", "v1", (("v3", 10.0),)), "champion")
    assert "champion: v1 -> v3" in canary.promote()
    assert read_rollout(store, "champion") is None and store.get_alias("champion") == "v3"


def test_the_command_fetches_versions_from_the_decision_store_only_for_the_drift_check(
    tmp_path: Path,
) -> None:
    (tmp_path / "store" / "fraud" / "v7").mkdir(parents=True)
    rule: dict[str, Any] = {"metric": "auc", "store": f"store:{tmp_path / 'store' / 'fraud'}"}
    args = argparse.Namespace(decide=True)
    off = load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section(decide=rule)))
    assert fetch_of(args, off) is None
    rule["max_prediction_psi"] = 0.2
    cfg = load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section(decide=rule)))
    assert fetch_of(argparse.Namespace(decide=False), cfg) is None
    fetch = fetch_of(args, cfg)
    assert fetch is not None and fetch("v7") == tmp_path / "store" / "fraud" / "v7"
    with pytest.raises(ModelError):
        fetch("v8")


def test_prediction_drift_per_version_reference_cached_and_a_version_without_one_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = train_payment_classifier(tmp_path / "v1")
    shutil.copytree(tmp_path / "v1", tmp_path / "v0")  # v0: packed without reference bins
    rng = np.random.default_rng(3)
    prediction = reference_bins(rng.random(10_000))
    reference = {
        "rows": 10_000,
        "features": {
            f.name: reference_bins(rng.random(100), len(f.categories)) for f in manifest.features
        },
        "prediction": prediction,
    }
    write_manifest(tmp_path / "v1", dataclasses.replace(manifest, reference=reference))
    fetched: list[str] = []

    def fetch(version: str) -> Path:
        fetched.append(version)
        return tmp_path / version

    cfg = load_raw(tmp_path, ride_config(tmp_path, evaluate=evaluate_section()))
    ev = Evaluator(cfg, fetch=fetch)
    enc = PredictionEncoder(json.loads(PREDICTION_SCHEMA_V1.read_text(encoding="utf-8")))
    caplog.set_level("INFO", logger="stream_scorer.evaluate.runner")
    for _ in range(2):  # two windows
        for i in range(5000):  # the upper half only: a large PSI against uniform [0, 1]
            p = 0.5 + 0.5 * float(rng.random())
            ev.handle(PlainMessage(enc.encode(f"a{i}", p, 1, "v1", 1000, 1000), t="out"))
            ev.handle(PlainMessage(enc.encode(f"b{i}", p, 1, "v0", 1000, 1000), t="out"))
        ev._count_predictions()
        counts = ev.window.predicted["v1"]
        assert counts.sum() == 5000 and "v0" not in ev.window.predicted
        shares = np.asarray([*prediction["shares"], 0.0])
        ours = float(
            np.sum(
                (np.maximum(counts / 5000, 1e-4) - np.maximum(shares, 1e-4))
                * np.log(np.maximum(counts / 5000, 1e-4) / np.maximum(shares, 1e-4))
            )
        )
        n, psi, noise = ev._drift(ev.window, "v1")
        assert n == 5000 and psi is not None and psi == pytest.approx(ours) and psi > 0.5
        assert noise == pytest.approx(9 * (1 / 10_000 + 1 / 5000))
        assert ev._drift(ev.window, "v0") == (0, None, 0.0)
        ev.close_window()
    assert sorted(fetched) == ["v0", "v1"]  # once per version
    said = [r for r in caplog.records if "v0 was packed without reference bins" in r.getMessage()]
    assert len(said) == 1
