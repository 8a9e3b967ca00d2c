"""Health endpoints and the progress watchdog on a real broker, with a partition made to stall.

The stall is real: the dead-letter topic is deleted once the worker has started (it checks
that its topics exist at start-up), so the producer keeps the dead letter waiting for it and the
one bad record, in partition 1, is not acknowledged: partition 1's committed offset cannot move
past it while its lag stays above 0; partition 0 keeps flowing. Creating the topic again lets
it recover.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    PAYMENT_SCHEMA,
    avro,
    free_ports,
    payments,
    produce_raw,
    train_payment_classifier,
    wait_for,
    write_schema,
)
from support import (
    http_get as _get,
)
from support import (
    metric_sample as _sample,
)

from stream_scorer.worker.supervisor import run_command

pytestmark = pytest.mark.integration
SECRET = "s3cret-Zq9-never-logged"
ROOT = Path(__file__).parents[2]


def _delete_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.delete_topics([topic])[topic].result(timeout=30)
    wait_for(lambda: topic not in admin.list_topics(timeout=10).topics, 30, f"{topic} still listed")


class Logs:
    """Collects a process's stderr lines in a thread; parses the JSON events."""

    def __init__(self, stream: Any) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # librdkafka's own lines
        return out

    def join(self) -> None:
        self._thread.join(timeout=30)


def test_a_stalled_partition_is_reported_by_metric_readyz_and_one_log_line(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topic, out, dlq, group = unique("hin"), unique("hout"), unique("hdlq"), unique("hgrp")
    make_topics({topic: 2, out: 2, dlq: 1})
    train_payment_classifier(tmp_path / "model")
    port = free_ports(1)[0]
    raw = {
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "statistics_interval_ms": 500,
            # wait for the deleted topic to appear again instead of failing after 30 s
            "producer": {"topic.metadata.propagation.max.ms": 600_000},
            "client": {"ssl.key.password": SECRET},  # unused on plaintext; must not be logged
        },
        "input": {
            "topic": topic,
            "group_id": group,
            "schema": str(write_schema(tmp_path / "p.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
        },
        "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": dlq},
        "model": {"path": str(tmp_path / "model")},
        "batch": {"max_records": 100, "max_wait_ms": 20},
        "metrics": {"port": port, "host": "127.0.0.1"},
        "health": {"stall_timeout_s": 3, "liveness_timeout_s": 10},
        "logging": {"format": "json"},
    }
    config = tmp_path / "w.yaml"
    config.write_text(yaml.safe_dump(raw))

    good = [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in payments(200, seed=3)]
    # round-robin over 2 partitions: partition 1 gets items 1, 3, 5, ...; the bad record is
    # partition 1's 51st (offset 50), followed by 49 good ones
    items: list[tuple[bytes | None, bytes | None]] = [*good[:101], (b"bad", b""), *good[101:]]
    assert len(items[1::2]) == 100 and items[101] == (b"bad", b"")

    worker = subprocess.Popen(
        run_command(config, "--worker-id", "w9"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    logs = Logs(worker.stderr)
    p0, p1 = {"topic": topic, "partition": "0"}, {"topic": topic, "partition": "1"}
    try:

        def assigned() -> bool:
            try:
                return _sample(port, "stream_scorer_assigned_partitions", {}) == 2
            except OSError:
                return False

        wait_for(assigned, 60, "the worker never got both partitions")  # past its topic check
        _delete_topic(kafka_bootstrap, dlq)
        produce_raw(kafka_bootstrap, topic, items, 2)

        def stalled() -> bool:
            try:
                code, body = _get(port, "/readyz")
            except OSError:
                return False
            return code == 503 and body["stalled_partitions"] == [f"{topic}/1"]

        wait_for(stalled, 60, "partition 1 never reported stalled")
        code, body = _get(port, "/readyz")
        assert code == 503
        assert body["failing"] == ["no_stalled_partitions"]
        assert body["checks"]["broker_reachable"] and body["checks"]["assignment_received"]
        assert _get(port, "/healthz")[0] == 200  # alive: the main loop runs, a partition stalls
        assert _sample(port, "stream_scorer_partition_stalled", p1) == 1
        assert _sample(port, "stream_scorer_partition_stalled", p0) == 0
        # offsets move a batch at a time: the batch holding offset 50 waits for its dead letter
        stuck_at = 100 - (_sample(port, "stream_scorer_consumer_lag_records", p1) or 0)
        assert 0 <= stuck_at <= 50
        assert _sample(port, "stream_scorer_consumer_lag_records", p0) == 0
        assert (_sample(port, "stream_scorer_consumer_lag_seconds", p1) or 0) >= 3
        assert _sample(port, "stream_scorer_ready", {}) == 0

        warnings = [e for e in logs.events() if e["msg"].startswith("partition stalled")]
        assert len(warnings) == 1, warnings
        w = warnings[0]
        assert (w["level"], w["topic"], w["partition"], w["offset"]) == (
            "WARNING",
            topic,
            1,
            stuck_at,
        )
        assert (w["worker_id"], w["group"]) == ("w9", group)

        # the dead-letter topic appears again: the partition recovers
        make_topics({dlq: 1})

        def ready() -> bool:
            return _get(port, "/readyz")[0] == 200

        wait_for(ready, 60, "partition 1 never recovered")
        assert _sample(port, "stream_scorer_partition_stalled", p1) == 0
        wait_for(
            lambda: _sample(port, "stream_scorer_consumer_lag_records", p1) == 0,
            30,
            "partition 1's lag never reached 0",
        )
        assert _sample(port, "stream_scorer_consumer_lag_seconds", p1) == 0
        assert _sample(port, "stream_scorer_ready", {}) == 1
        # one latency observation per prediction (Kafka timestamps: produced seconds ago)
        assert _sample(port, "stream_scorer_end_to_end_latency_seconds_count", {}) == 200
        latency_sum = _sample(port, "stream_scorer_end_to_end_latency_seconds_sum", {}) or 0
        assert 0 < latency_sum / 200 < 600
        assert (
            _sample(
                port, "stream_scorer_dead_letters_total", {"stage": "decode", "reason": "empty"}
            )
            == 1
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            stdout, _ = worker.communicate(timeout=60)
        finally:
            worker.kill()  # no-op once it exited; never leave a worker behind a failed test
            logs.join()
    assert worker.returncode == 0, "".join(logs.lines[-20:])
    events = logs.events()
    assert len([e for e in events if e["msg"].startswith("partition stalled")]) == 1
    recovered = [e for e in events if e["msg"].startswith("partition recovered")]
    assert len(recovered) == 1 and recovered[0]["partition"] == 1
    assert all({"ts", "level", "logger", "msg", "worker_id", "group"} <= e.keys() for e in events)
    assert json.loads(stdout.strip().splitlines()[-1])["consumed"] == len(items)
    assert SECRET not in "".join(logs.lines)
    settings = [e for e in events if e["msg"].startswith("consumer settings")]
    assert len(settings) == 1 and "'ssl.key.password': '***'" in settings[0]["msg"]
