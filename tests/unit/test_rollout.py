"""Rollouts without Kafka: the key split, the record's validation, the store, the refresher and
the routed pipeline's per-record version stamps."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import PAYMENT_SCHEMA, Msg, avro, payments, read_record, train_payment_classifier
from test_pipeline_sink import PREDICTION_SCHEMA, FakeProducer, _pipeline

from stream_scorer import headers as hdr
from stream_scorer.contracts.manifest import write_manifest
from stream_scorer.errors import ModelError, RolloutError
from stream_scorer.model.rollout import STEP, Split, make, parse, parse_weights
from stream_scorer.model.store import (
    ModelStore,
    StoreSource,
    promote,
    read_rollout,
    rollback,
    start_rollout,
)
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.records import DeadLetter, Reason, Scored, Stage
from stream_scorer.stages.route import (
    BUCKETS,
    RoutedPipeline,
    bucket_bounds,
    key_buckets,
    route,
    split_keys,
)
from stream_scorer.stages.score import Scorer
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.refresh import LoadedModel, ModelRefresher, load_initial, load_model
from stream_scorer.worker.sink import Sink, SinkContext

N = 20_000
KEYS = [f"rider-{i}".encode() for i in range(N)]


def _within_binomial(hits: int, n: int, p: float) -> bool:
    """``hits`` within 4.5 standard deviations of ``n * p`` (false alarm ~ 7 in a million)."""
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))


# --- the split ------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [1, 5, 10, 50, 90])
def test_a_canary_gets_its_percent_of_the_keys(percent: float) -> None:
    picks = np.array(split_keys(KEYS, [percent]))
    assert set(picks.tolist()) <= {0, 1}
    assert _within_binomial(int((picks == 0).sum()), N, percent / 100)


def test_ab_weights_over_three_versions() -> None:
    picks = np.array(split_keys(KEYS, [20, 30]))  # challengers 20% and 30%, champion 50%
    for index, share in ((0, 0.2), (1, 0.3), (2, 0.5)):
        assert _within_binomial(int((picks == index).sum()), N, share), index


def test_the_split_is_a_fixed_function_of_the_key_bytes() -> None:
    """Same keys, same versions: on every call, and as pinned here (every worker and process
    hashes alike; a change of hash would move live keys between versions)."""
    assert split_keys(KEYS, [10]) == split_keys(list(reversed(KEYS)), [10])[::-1]
    assert key_buckets([b"rider-0", b"rider-1", b"", None]).tolist() == [
        int(b) for b in key_buckets([b"rider-0", b"rider-1", b"", b""])
    ]
    assert key_buckets([b"rider-0", b"rider-1", b"abc"]).tolist() == PINNED


#: CRC-32 + fmix32 of the keys, modulo 10000 (computed once by hand and pinned).
PINNED = [1106, 2049, 737]


def test_buckets_are_spread_and_in_range() -> None:
    buckets = key_buckets(KEYS)
    assert buckets.min() >= 0 and buckets.max() < BUCKETS
    counts = np.bincount(buckets // 1000, minlength=10)  # ten deciles, 2000 keys expected each
    assert all(_within_binomial(int(c), N, 0.1) for c in counts), counts


def test_growing_a_canary_keeps_the_keys_it_had() -> None:
    at10 = np.array(split_keys(KEYS, [10])) == 0
    at50 = np.array(split_keys(KEYS, [50])) == 0
    assert at10.sum() > 0 and not (at10 & ~at50).any()  # every key of 10% is in 50%
    at5 = np.array(split_keys(KEYS, [5])) == 0
    assert not (at5 & ~at10).any()


def test_zero_and_hundred_percent() -> None:
    assert set(split_keys(KEYS[:500], [0])) == {1}
    assert set(split_keys(KEYS[:500], [100])) == {0}


def test_the_record_step_is_one_bucket() -> None:
    assert STEP == 100 / BUCKETS


def test_bounds_refuse_more_than_a_hundred_percent() -> None:
    with pytest.raises(ValueError, match="sum <= 100"):
        bucket_bounds([60, 50])
    assert route(np.array([0, 999, 1000, 9999]), bucket_bounds([10])).tolist() == [0, 0, 1, 1]


# --- the record -----------------------------------------------------------------------------


def _record(**change: Any) -> str:
    raw: dict[str, Any] = {
        "format": "stream-scorer.rollout",
        "version": 1,
        "mode": "canary",
        "champion": "3",
        "challengers": [{"version": "4", "percent": 10}],
        "changed_at": "2026-12-07T00:00:00Z",
        "changed_by": "ana@ops",
    }
    raw.update(change)
    return json.dumps({k: v for k, v in raw.items() if v is not ...})


def test_a_valid_record_reads_back() -> None:
    record = parse(_record(), "test")
    assert record.split() == Split("3", (("4", 10.0),))
    assert record.split().weights() == {"4": 10.0, "3": 90.0}
    assert parse(record.to_json(), "again") == record


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (_record(format="other"), "format"),
        (_record(version=2), "record version 2"),
        (_record(mode="dark"), "mode 'dark'"),
        (_record(champion=3), "champion 3 is not a version"),
        (_record(champion=...), "champion None"),
        (_record(challengers={"4": 10}), "challengers is not a list"),
        (_record(challengers=[{"version": 4, "percent": 10}]), r"challengers\[0\]"),
        (_record(challengers=[{"version": "4", "percent": "10"}]), "not a number"),
        (_record(challengers=[{"version": "4", "percent": 101}]), "not between 0 and 100"),
        (_record(challengers=[{"version": "4", "percent": -1}]), "not between 0 and 100"),
        (_record(challengers=[{"version": "4", "percent": 10.001}]), "steps of 0.01"),
        (_record(challengers=[]), "no challenger"),
        (_record(challengers=[{"version": "3", "percent": 10}]), "listed twice"),
        (
            _record(
                mode="ab",
                challengers=[{"version": "4", "percent": 60}, {"version": "5", "percent": 50}],
            ),
            "sum to 110",
        ),
        (
            _record(challengers=[{"version": "4", "percent": 5}, {"version": "5", "percent": 5}]),
            "a canary has one challenger",
        ),
        (_record(mode="blue-green"), "blue-green has one challenger at 100"),
    ],
)
def test_a_malformed_record_is_a_clear_error(text: str, why: str) -> None:
    with pytest.raises(RolloutError, match=why):
        parse(text, "of store:x@champion")


def test_weights_flag() -> None:
    assert parse_weights("7=50, 8=50") == [("7", 50.0), ("8", 50.0)]
    for bad in ("7:50", "=50", "7=half"):
        with pytest.raises(RolloutError):
            parse_weights(bad)


# --- the store: promote, rollout, rollback --------------------------------------------------


def _model(tmp_path: Path, version: str) -> Path:
    path = tmp_path / "src" / version
    manifest = train_payment_classifier(path)
    write_manifest(path, dataclasses.replace(manifest, model_version=version))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rollout-models")
    return {v: _model(root, v) for v in ("v1", "v2", "v3")}


def _store(tmp_path: Path, trained: dict[str, Path]) -> ModelStore:
    store = ModelStore(tmp_path / "store", "fraud")
    for path in trained.values():
        store.publish(path)
    promote(store, "v1")
    return store


def test_rollout_rollback_and_promote_in_a_store(tmp_path: Path, trained: dict[str, Path]) -> None:
    store = _store(tmp_path, trained)
    assert read_rollout(store) is None
    start_rollout(store, make("canary", "v1", [("v2", 10)], "test"))
    assert read_rollout(store) == make("canary", "v1", [("v2", 10)], "test")
    with pytest.raises(ModelError, match="no version 'v9'"):
        start_rollout(store, make("canary", "v1", [("v9", 10)], "test"))
    with pytest.raises(ModelError, match="points at v1, not v2"):
        start_rollout(store, make("canary", "v2", [("v3", 10)], "test"))
    # rollback ends the rollout and leaves the alias; the next one steps the alias back
    promote(store, "v2")  # a promotion ends any rollout too
    assert read_rollout(store) is None
    start_rollout(store, make("blue-green", "v2", [("v3", 100)], "test"))
    move = rollback(store)
    assert (move.before, move.after, read_rollout(store)) == ("v2", "v2", None)
    assert store.get_alias("champion") == "v2"
    assert rollback(store).after == "v1"
    log = (store.aliases / "champion.rollout.log").read_text().splitlines()
    assert [json.loads(line).get("mode", "ended") for line in log] == [
        "canary",
        "ended",  # the promotion
        "blue-green",
        "ended",  # the rollback
    ]


def test_rollback_ends_even_a_malformed_rollout(tmp_path: Path, trained: dict[str, Path]) -> None:
    store = _store(tmp_path, trained)
    store.set_rollout("champion", "{broken")
    with pytest.raises(RolloutError):
        read_rollout(store)
    assert rollback(store).after == "v1"
    assert read_rollout(store) is None


# --- the refresher --------------------------------------------------------------------------


def _loader(directory: Path) -> tuple[Any, Scorer]:
    return _pipeline(directory), Scorer(directory)


def _weights(metrics: Metrics) -> dict[str, float]:
    return {
        s.labels["model_version"]: s.value
        for m in metrics.rollout_weight.collect()
        for s in m.samples
    }


def test_the_refresher_follows_a_rollout(tmp_path: Path, trained: dict[str, Path]) -> None:
    store = _store(tmp_path, trained)
    source = StoreSource(store, "champion", None)
    metrics = Metrics()
    first = load_initial(source, _loader, metrics)
    assert first.split is None
    refresher = ModelRefresher(source, first, _loader, metrics, interval_s=60)

    start_rollout(store, make("canary", "v1", [("v2", 10)], "test"))
    refresher.check_now()
    canary = refresher.take()
    assert canary is not None and canary.weights() == {"v2": 10.0, "v1": 90.0}
    assert canary.parts[-1] is first  # the champion is not loaded again
    assert isinstance(canary.pipeline, RoutedPipeline)

    start_rollout(store, make("canary", "v1", [("v2", 50)], "test"))
    refresher.check_now()
    half = refresher.take()
    assert half is not None and half.weights() == {"v2": 50.0, "v1": 50.0}
    assert half.parts[0] is canary.parts[0]  # v2 was loaded once

    # a malformed record: the split in force stays, the gauge says so
    store.set_rollout("champion", '{"format": "stream-scorer.rollout", "version": 7}')
    refresher.check_now()
    assert refresher.take() is None
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_unreadable") == 1

    # a challenger that cannot load: refused whole, the split in force stays
    (store.version_dir("v3") / "model.ubj").write_bytes(b"broken")
    start_rollout(store, make("ab", "v1", [("v2", 30), ("v3", 30)], "test"))
    refresher.check_now()
    assert refresher.take() is None
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_unreadable") == 0
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_refused") == 1

    rollback(store)  # 100% champion: the champion already loaded, at once
    refresher.check_now()
    back = refresher.take()
    assert back is first
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_refused") == 0

    # refused while the champion alone scores; a rollback (nothing to swap) clears the gauge
    start_rollout(store, make("canary", "v1", [("v3", 5)], "test"))
    refresher.check_now()
    assert refresher.take() is None
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_refused") == 1
    rollback(store)
    refresher.check_now()
    assert refresher.take() is None
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_refused") == 0


def test_a_worker_starts_with_its_rollout(tmp_path: Path, trained: dict[str, Path]) -> None:
    store = _store(tmp_path, trained)
    start_rollout(store, make("canary", "v1", [("v2", 25)], "test"))
    source = StoreSource(store, "champion", None)
    metrics = Metrics()
    model = load_initial(source, _loader, metrics)
    assert model.weights() == {"v2": 25.0, "v1": 75.0}
    metrics.routing("default", model.weights())
    assert _weights(metrics) == {"v2": 25.0, "v1": 75.0}
    metrics.routing("default", {"v1": 100.0})
    assert _weights(metrics) == {"v1": 100.0}  # a version no longer routed leaves the gauge

    store.set_rollout("champion", "{broken")  # malformed at start-up: the champion alone
    alone = load_initial(source, _loader, metrics)
    assert alone.split is None and alone.model_version == "v1"
    assert metrics.prometheus.get_sample_value("stream_scorer_rollout_unreadable") == 1


# --- the routed pipeline and the sink: each output stamped with its version ----------------


def test_each_record_is_scored_and_stamped_by_its_version(trained: dict[str, Path]) -> None:
    parts = [_pipeline(trained["v2"]), _pipeline(trained["v1"])]
    routed = RoutedPipeline(parts, [30])
    records = payments(400, seed=5)
    msgs = [Msg(avro(PAYMENT_SCHEMA, r), k=f"k{i}".encode(), o=i) for i, r in enumerate(records)]
    msgs[7] = Msg(b"\x00\x01", k=b"k7", o=7)  # poison: a dead letter stamped with its route
    result = routed.process(msgs)
    expected = ["v2" if i == 0 else "v1" for i in split_keys([m.key() for m in msgs], [30])]
    assert result.scored.versions is not None
    versions = result.scored.versions
    got = {m.offset(): v for m, v in zip(result.scored.messages, versions, strict=True)}
    assert got == {i: expected[i] for i in range(400) if i != 7}
    schema = load_schema(PREDICTION_SCHEMA)
    stamps = {
        m.offset(): read_record(schema, v)["model_version"]
        for m, v in zip(result.scored.messages, result.scored.encoded, strict=True)
    }
    assert stamps == got  # the value's model_version too
    assert [(d.message.offset(), d.model_version) for d in result.dead] == [(7, expected[7])]
    assert 0.15 < sum(v == "v2" for v in got.values()) / 399 < 0.45

    producer, tracker = FakeProducer(), OffsetTracker()
    metrics = Metrics()
    sink = Sink(producer, SinkContext("out", "dlq", "g", "w", "v1"), tracker, metrics)
    sink.publish(result.scored, result.dead, tracker.track(msgs), result.model_version)
    headers = {}
    for sent in producer.sent:
        got_headers = dict(sent["headers"])
        offset = got_headers.get(hdr.SOURCE_OFFSET) or got_headers[hdr.CONNECT_OFFSET]
        headers[(sent["topic"], int(offset))] = got_headers[hdr.MODEL_VERSION].decode()
    assert headers == {
        **{("out", i): v for i, v in got.items()},
        ("dlq", 7): expected[7],
    }
    metrics.count_versions("default", result.scored, result.model_version)
    for version in ("v1", "v2"):
        assert metrics.prometheus.get_sample_value(
            "stream_scorer_version_predictions_total",
            {"model": "default", "model_version": version},
        ) == sum(v == version for v in got.values())


def test_one_version_keeps_the_batch_stamp(trained: dict[str, Path]) -> None:
    producer, tracker = FakeProducer(), OffsetTracker()
    sink = Sink(producer, SinkContext("out", "dlq", "g", "w", "v1"), tracker, Metrics())
    good, bad = Msg(b"v", o=1), Msg(b"x", o=2)
    dead = [DeadLetter(bad, Stage.DECODE, Reason.TRUNCATED, "EOFError", "short")]
    sink.publish(Scored([good], [b"p"], [1]), dead, tracker.track([good, bad]), "v9")
    assert [dict(s["headers"])[hdr.MODEL_VERSION] for s in producer.sent] == [b"v9", b"v9"]


def test_an_empty_batch_warms_every_version(trained: dict[str, Path]) -> None:
    seen: list[str] = []
    parts = [
        _pipeline(trained[v], lambda s, _t, v=v: seen.append(v) if s == "decode" else None)
        for v in ("v2", "v1")
    ]
    assert len(RoutedPipeline(parts, [10]).process([]).scored) == 0
    assert seen == ["v2", "v1"]


def test_load_model_unchanged_for_one_version(tmp_path: Path, trained: dict[str, Path]) -> None:
    store = _store(tmp_path, trained)
    source = StoreSource(store, "champion", None)
    one = load_model(source, "v1", _loader)
    assert isinstance(one, LoadedModel) and one.weights() == {"v1": 100.0}
    assert one.describe() == "model v1"
