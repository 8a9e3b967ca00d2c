"""Lag tracking, the watchdog, readiness/liveness and the HTTP endpoints, without Kafka."""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import Msg, free_ports, train_payment_classifier, wait_for, write_schema

from stream_scorer.config import Config, load_config
from stream_scorer.kafka.groups import PartitionLag
from stream_scorer.ops.lag import to_json, to_table, totals
from stream_scorer.worker.health import BacklogView, Monitor, Watchdog
from stream_scorer.worker.lag import LagTracker
from stream_scorer.worker.metrics import Metrics

ROOT = Path(__file__).parents[2]


def _stats(parts: dict[int, dict[str, int]], topic: str = "in") -> dict[str, Any]:
    return {"topics": {topic: {"partitions": {str(p): v for p, v in parts.items()}}}}


# --- LagTracker ------------------------------------------------------------------------------


def test_lag_seconds_is_the_age_of_the_oldest_uncommitted_record() -> None:
    lag = LagTracker()
    lag.update_from_stats(
        _stats({0: {"hi_offset": 10, "ls_offset": 10, "lo_offset": 0, "committed_offset": 4}}),
        [("in", 0)],
    )
    for offsets in (range(4, 6), range(6, 8)):  # two batches
        lag.consumed([Msg(b"", p=0, o=o, ts=1_000_000 + o * 1000) for o in offsets])
    assert lag.snapshot(now=2000.0) == {("in", 0): (4, 6, 2000.0 - 1004.0)}
    lag.committed("in", 0, 6)  # the first batch done: the oldest is now offset 6
    assert lag.snapshot(now=2000.0) == {("in", 0): (6, 4, 2000.0 - 1006.0)}


def test_lag_keeps_the_first_record_of_each_partition_per_batch() -> None:
    lag = LagTracker()
    lag.update_from_stats(
        _stats(
            {
                0: {"hi_offset": 10, "committed_offset": 2},
                1: {"hi_offset": 10, "committed_offset": 5},
            }
        ),
        [("in", 0), ("in", 1)],
    )
    batch = [Msg(b"", p=p, o=o, ts=o * 1000 + p) for o, p in ((5, 1), (2, 0), (6, 1), (3, 0))]
    lag.consumed(batch)
    assert lag.snapshot(now=100.0) == {("in", 0): (2, 8, 98.0), ("in", 1): (5, 5, 100.0 - 5.001)}


def test_no_lag_means_zero_seconds_whatever_is_in_flight() -> None:
    lag = LagTracker()
    lag.update_from_stats(_stats({1: {"hi_offset": 5, "committed_offset": 5}}), [("in", 1)])
    assert lag.snapshot(now=10.0) == {("in", 1): (5, 0, 0.0)}


def test_next_record_not_fetched_yet_counts_from_when_the_lag_was_first_seen() -> None:
    lag = LagTracker()
    lag.update_from_stats(_stats({0: {"hi_offset": 9, "committed_offset": 7}}), [("in", 0)])
    assert lag.snapshot(now=100.0) == {("in", 0): (7, 2, 0.0)}
    assert lag.snapshot(now=103.5) == {("in", 0): (7, 2, 3.5)}  # keeps growing while waiting
    lag.committed("in", 0, 9)
    assert lag.snapshot(now=104.0) == {("in", 0): (9, 0, 0.0)}


def test_never_committed_counts_from_the_low_watermark_and_unassigned_is_ignored() -> None:
    lag = LagTracker()
    stats = _stats(
        {
            0: {"hi_offset": 50, "lo_offset": 20, "committed_offset": -1001},
            1: {"hi_offset": 50, "lo_offset": 0, "committed_offset": 3},
        }
    )
    lag.update_from_stats(stats, [("in", 0)])
    assert lag.snapshot(now=1.0).keys() == {("in", 0)}
    assert lag.snapshot(now=1.0)[("in", 0)][:2] == (20, 30)
    lag.forget([("in", 0)])
    assert lag.snapshot(now=1.0) == {}


def test_last_stable_offset_wins_over_the_high_watermark() -> None:
    lag = LagTracker()
    stats = _stats({0: {"hi_offset": 12, "ls_offset": 10, "committed_offset": 10}})
    lag.update_from_stats(stats, [("in", 0)])
    assert lag.snapshot(now=0.0)[("in", 0)] == (10, 0, 0.0)


# --- the lag command's output ----------------------------------------------------------------

ROWS = [
    PartitionLag("in", 0, 10, 0, 15, 5, 12.25, 1_000),
    PartitionLag("in", 1, None, 3, 7, 4, 30.0, 2_000),
    PartitionLag("in", 2, 9, 0, 9, 0, 0.0, None),
]


def test_totals_sum_records_and_take_the_worst_seconds() -> None:
    assert totals(ROWS) == {"partitions": 3, "lag_records": 9, "max_lag_seconds": 30.0}


def test_json_output_round_trips() -> None:
    doc = json.loads(to_json("g", ROWS))
    assert doc["group"] == "g"
    assert [p["lag_records"] for p in doc["partitions"]] == [5, 4, 0]
    assert doc["partitions"][1]["committed"] is None
    assert doc["total"]["lag_records"] == 9


def test_table_output() -> None:
    lines = to_table("g", ROWS).splitlines()
    assert lines[0] == "GROUP g"
    assert lines[1].split() == [
        "TOPIC",
        "PARTITION",
        "COMMITTED",
        "HIGH-WATERMARK",
        "LAG",
        "LAG-SECONDS",
    ]
    assert lines[2].split() == ["in", "0", "10", "15", "5", "12.2"]
    assert lines[3].split() == ["in", "1", "-", "7", "4", "30.0"]
    assert lines[5].split() == ["TOTAL", "9", "30.0"]


# --- Watchdog --------------------------------------------------------------------------------


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def test_watchdog_fires_once_per_stall_and_logs_recovery(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    dog = Watchdog(stall_timeout_s=30, clock=clock)
    tp = ("in", 2)
    caplog.set_level(logging.INFO, logger="stream_scorer.worker.health")
    dog.observe({tp: (100, 5, 1.0)})
    clock.now += 29
    assert dog.evaluate() == {tp: False}
    clock.now += 2
    dog.observe({tp: (100, 8, 1.0)})  # more lag, same offset: still stalling
    assert dog.evaluate() == {tp: True}
    clock.now += 60
    assert dog.evaluate() == {tp: True}
    stalls = [r for r in caplog.records if "stalled" in r.getMessage()]
    assert len(stalls) == 1  # once per stall
    assert stalls[0].levelno == logging.WARNING
    assert (stalls[0].topic, stalls[0].partition, stalls[0].offset) == ("in", 2, 100)  # type: ignore[attr-defined]
    dog.observe({tp: (101, 7, 1.0)})  # the committed offset moved
    assert dog.evaluate() == {tp: False}
    recovered = [r for r in caplog.records if "recovered" in r.getMessage()]
    assert len(recovered) == 1


@pytest.mark.parametrize(
    ("observations", "stalled"),
    [
        ([(100, 0), (100, 0), (100, 0)], False),  # no lag: an idle partition is not stalled
        ([(100, 0), (100, 0), (100, 3)], False),  # lag just appeared: the clock starts now
        ([(100, 3), (101, 3), (102, 3)], False),  # moving
        ([(100, 3), (100, 3), (100, 3)], True),  # lag, not moving for 2 x 20 s
    ],
)
def test_watchdog_cases(observations: list[tuple[int, int]], stalled: bool) -> None:
    clock = Clock()
    dog = Watchdog(stall_timeout_s=30, clock=clock)
    for offset, lag in observations:
        dog.observe({("in", 0): (offset, lag, 0.0)})
        clock.now += 20
    assert dog.evaluate() == {("in", 0): stalled}


def test_watchdog_forgets_revoked_partitions() -> None:
    clock = Clock()
    dog = Watchdog(stall_timeout_s=1, clock=clock)
    dog.observe({("in", 0): (1, 1, 0.0), ("in", 1): (1, 1, 0.0)})
    dog.observe({("in", 1): (1, 1, 0.0)})
    clock.now += 5
    assert dog.evaluate() == {("in", 1): True}


# --- Metrics ---------------------------------------------------------------------------------


def test_end_to_end_latency_is_observed_per_prediction() -> None:
    m = Metrics()
    m.observe_latency([1_000_000, 1_002_000, 0], now=1_003.0)
    get = m.prometheus.get_sample_value
    assert get("stream_scorer_end_to_end_latency_seconds_count") == 2  # unknown time skipped
    assert get("stream_scorer_end_to_end_latency_seconds_sum") == pytest.approx(3.0 + 1.0)


def test_partition_gauges_set_and_forgotten() -> None:
    m = Metrics()
    m.update_partitions({("in", 0): (5, 7, 2.5), ("in", 1): (3, 0, 0.0)}, {("in", 0): True})
    get = m.prometheus.get_sample_value
    labels = {"topic": "in", "partition": "0"}
    assert get("stream_scorer_consumer_lag_records", labels) == 7
    assert get("stream_scorer_consumer_lag_seconds", labels) == 2.5
    assert get("stream_scorer_partition_stalled", labels) == 1
    assert get("stream_scorer_partition_stalled", {"topic": "in", "partition": "1"}) == 0
    m.forget_partitions([("in", 0)])
    assert get("stream_scorer_consumer_lag_seconds", labels) is None
    assert get("stream_scorer_partition_stalled", labels) is None


def test_unseen_categories_are_counted_per_feature() -> None:
    m = Metrics()
    m.count_unseen({"country": 0, "channel": 0})  # the series exist from the start
    m.count_unseen({"country": 3})
    m.count_unseen({"country": 2, "channel": 1})
    get = m.prometheus.get_sample_value
    assert get("stream_scorer_unseen_categories_total", {"feature": "country"}) == 5
    assert get("stream_scorer_unseen_categories_total", {"feature": "channel"}) == 1


# --- Monitor and the HTTP endpoints ------------------------------------------------------------


@dataclass
class FakeSource:
    lag: LagTracker = field(default_factory=LagTracker)
    joined: bool = False
    reachable: bool = False
    parts: set[tuple[str, int]] = field(default_factory=set)
    backlog: BacklogView | None = None

    @property
    def broker_reachable(self) -> bool:
        return self.reachable

    @property
    def assignment(self) -> set[tuple[str, int]]:
        return set(self.parts)


@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from support import PAYMENT_SCHEMA

    tmp = tmp_path_factory.mktemp("health")
    train_payment_classifier(tmp / "model")
    return {
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": str(write_schema(tmp / "in.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
        },
        "output": {"topic": "out", "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp / "model")},
    }


def _cfg(base: dict[str, Any], **over: Any) -> Config:
    return load_config(None, environ={}, overrides={**base, **over})


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_endpoints_follow_the_checks(base_cfg: dict[str, Any]) -> None:
    port = free_ports(1)[0]
    cfg = _cfg(
        base_cfg,
        metrics={"port": port, "host": "127.0.0.1"},
        health={"stall_timeout_s": 0.2, "liveness_timeout_s": 1.5},
    )
    metrics = Metrics()
    source = FakeSource()
    with Monitor(cfg, metrics, "model-7", interval_s=0.05) as monitor:
        assert monitor.port == port
        monitor.watch(source)
        metrics.last_progress.set(time.time())
        code, body = _get(port, "/readyz")
        doc = json.loads(body)
        assert code == 503
        assert doc["failing"] == ["pipeline_warm", "broker_reachable", "assignment_received"]
        assert doc["checks"]["model_loaded"] is True
        assert metrics.prometheus.get_sample_value("stream_scorer_ready") == 0
        monitor.scorable()  # the warm-up batch was scored
        doc = json.loads(_get(port, "/readyz")[1])
        assert doc["failing"] == ["broker_reachable", "assignment_received"]

        source.reachable = source.joined = True
        source.parts = {("in", 0)}
        code, body = _get(port, "/readyz")
        assert (code, json.loads(body)["failing"]) == (200, [])
        assert metrics.prometheus.get_sample_value("stream_scorer_ready") == 1

        # a partition with lag whose committed offset does not move: stalled
        source.lag.update_from_stats(
            _stats({0: {"hi_offset": 10, "committed_offset": 4}}), [("in", 0)]
        )
        monitor.refresh()
        wait_for(lambda: _get(port, "/readyz")[0] == 503, 10, "/readyz turned 503", 0.05)
        code, body = _get(port, "/readyz")
        doc = json.loads(body)
        assert (code, doc["failing"], doc["stalled_partitions"]) == (
            503,
            ["no_stalled_partitions"],
            ["in/0"],
        )
        assert (
            metrics.prometheus.get_sample_value(
                "stream_scorer_partition_stalled", {"topic": "in", "partition": "0"}
            )
            == 1
        )

        code, body = _get(port, "/healthz")
        assert code == 200 and json.loads(body)["alive"] is True
        metrics.last_progress.set(time.time() - 10)  # the main loop has not moved for 10 s
        monitor._started = 0.0
        code, body = _get(port, "/healthz")
        assert code == 503 and json.loads(body)["seconds_since_progress"] >= 10

        code, body = _get(port, "/metrics")
        assert code == 200
        assert b"stream_scorer_model_info" in body or b"stream_scorer_ready" in body
        assert _get(port, "/nope")[0] == 404
    with pytest.raises(OSError):
        _get(port, "/healthz")  # closed with the monitor


def test_port_zero_serves_nothing(base_cfg: dict[str, Any]) -> None:
    with Monitor(_cfg(base_cfg, metrics={"port": 0}), Metrics(), "m") as monitor:
        assert monitor.port is None


def test_commits_outside_store_reach_the_lag_tracker() -> None:
    from stream_scorer.worker.source import Source

    source = Source(
        {},
        "in",
        Metrics(),
        unreachable_timeout_s=1,
        on_revoke=lambda _p: None,
        on_lost=lambda _p: None,
    )  # never entered: no consumer is created
    source._assigned = {("in", 0)}
    source.lag.update_from_stats(_stats({0: {"hi_offset": 10, "committed_offset": 2}}), [("in", 0)])
    for offsets in (range(2, 7), range(7, 10)):  # two batches
        source.lag.consumed([Msg(b"", p=0, o=o, ts=(100 + o) * 1000) for o in offsets])
    source.mark_committed([("in", 0, 7), ("in", 1, 3)])  # partition 1 is not ours: ignored
    assert source.lag.snapshot(now=200.0) == {("in", 0): (7, 3, 200.0 - 107.0)}


@pytest.mark.parametrize(
    ("next_offset", "in_flight", "lag"),
    [
        (11, False, 0),  # fetched past the end with nothing left: only transaction markers
        (11, True, 1),  # the record at the committed offset is still being scored
        (10, False, 1),  # not fetched to the end yet
    ],
)
def test_trailing_transaction_markers_are_not_lag(
    next_offset: int, in_flight: bool, lag: int
) -> None:
    tracker = LagTracker()
    stats = _stats({0: {"hi_offset": 11, "committed_offset": 10, "next_offset": next_offset}})
    tracker.update_from_stats(stats, [("in", 0)])
    if in_flight:
        tracker.consumed([Msg(b"", p=0, o=10, ts=5_000)])
    assert tracker.snapshot(now=6.0)[("in", 0)][1] == lag


def test_a_taken_port_is_a_configuration_error(base_cfg: dict[str, Any]) -> None:
    import socket

    from stream_scorer.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        cfg = _cfg(base_cfg, metrics={"port": port, "host": "127.0.0.1"})
        with pytest.raises(ConfigError, match=r"metrics\.port: cannot listen on 127\.0\.0\.1"):
            Monitor(cfg, Metrics(), "m").__enter__()


def test_refresh_publishes_exactly_the_partitions_owned_now(base_cfg: dict[str, Any]) -> None:
    metrics = Metrics()
    source = FakeSource()
    stats = _stats({0: {"hi_offset": 5, "committed_offset": 5}, 1: {"hi_offset": 5}})
    source.lag.update_from_stats(stats, [("in", 0), ("in", 1)])
    monitor = Monitor(_cfg(base_cfg, metrics={"port": 0}), metrics, "m")
    monitor.watch(source)
    monitor.refresh()
    get = metrics.prometheus.get_sample_value
    assert get("stream_scorer_consumer_lag_records", {"topic": "in", "partition": "0"}) == 0
    # a revoke that raced with an earlier refresh left partition 0's series behind
    source.lag.forget([("in", 0)])
    metrics.update_partitions({("in", 0): (5, 0, 0.0)}, {})
    monitor.refresh()
    assert get("stream_scorer_consumer_lag_records", {"topic": "in", "partition": "0"}) is None
    assert get("stream_scorer_partition_stalled", {"topic": "in", "partition": "0"}) is None


@pytest.mark.parametrize(
    "values",
    [[], [0.0], [0.001, 0.5, 0.5, 2.0, 1e9], [0.25] * 7, list(np.linspace(0, 40, 333))],
)
def test_batch_histogram_exposes_what_a_prometheus_histogram_would(values: list[float]) -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from stream_scorer.worker.metrics import BatchHistogram

    buckets = (0.001, 0.01, 0.25, 0.5, 1.0, 2.5, 30.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("x_seconds", "doc", buckets)
    ours.register(batch)
    reference = Histogram("x_seconds", "doc", buckets=buckets, registry=theirs)
    batch.observe_many(np.asarray(values, dtype=np.float64))
    for v in values:
        reference.observe(v)

    def samples(registry: CollectorRegistry) -> tuple[list[str], float]:
        lines = generate_latest(registry).decode().splitlines()
        kept = [line for line in lines if not line.startswith("#") and "_created" not in line]
        total = next(float(line.split()[1]) for line in kept if line.startswith("x_seconds_sum"))
        return [line for line in kept if not line.startswith("x_seconds_sum")], total

    (ours_lines, ours_sum), (their_lines, their_sum) = samples(ours), samples(theirs)
    assert ours_lines == their_lines  # every bucket and the count, exactly
    assert ours_sum == pytest.approx(their_sum)  # summed in another order


# --- waiting for a broker at start-up (topics.require_topics, a real client, no broker) ---------
def _refused_address() -> str:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_waiting_for_a_broker_at_start_up_counts_as_alive_then_fails_naming_the_address() -> None:
    from stream_scorer.errors import BrokerError
    from stream_scorer.kafka.topics import require_topics

    bootstrap, beats = _refused_address(), []
    with pytest.raises(BrokerError) as info:
        require_topics(
            {"bootstrap.servers": bootstrap},
            {"input.topic": "in"},
            unreachable_timeout_s=3,
            alive=lambda: beats.append(1),
        )
    assert str(info.value).startswith(f"no broker reachable at {bootstrap} for ")
    assert "(kafka.unreachable_timeout_s = 3)" in str(info.value)
    assert "Connection refused" in str(info.value)  # the client's last error says why
    assert len(beats) >= 2  # liveness kept up while waiting


def test_a_stop_request_ends_the_wait_for_a_broker_quietly() -> None:
    from stream_scorer.kafka.topics import require_topics

    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    require_topics(
        {"bootstrap.servers": _refused_address()},
        {"input.topic": "in"},
        unreachable_timeout_s=600,
        stop=stop,
    )
    assert len(asked) == 2


class _Backlog:
    def __init__(self, records: dict[tuple[str, int], int]) -> None:
        self.values = records

    def records(self, timeout_s: float = 5.0) -> dict[tuple[str, int], int]:
        return dict(self.values)


def test_a_share_sources_backlog_is_published_per_partition(base_cfg: dict[str, Any]) -> None:
    metrics = Metrics()
    backlog = _Backlog({("in", 0): 12, ("in", 3): 0})
    monitor = Monitor(_cfg(base_cfg), metrics, "m")
    monitor.watch(FakeSource(backlog=backlog))
    monitor.refresh()
    value = metrics.prometheus.get_sample_value
    name = "stream_scorer_share_backlog_records"
    assert value(name, {"topic": "in", "partition": "0"}) == 12
    assert value(name, {"topic": "in", "partition": "3"}) == 0
    backlog.values[("in", 0)] = 5
    monitor.refresh()
    assert value(name, {"topic": "in", "partition": "0"}) == 5
    # a consumer group's source has none: no series
    plain = Metrics()
    other = Monitor(_cfg(base_cfg), plain, "m")
    other.watch(FakeSource())
    other.refresh()
    assert plain.prometheus.get_sample_value(name, {"topic": "in", "partition": "0"}) is None
