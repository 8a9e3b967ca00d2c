"""Scaling: the group goes 1 → 3 → 1 worker processes while events flow; ``run --workers 2``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml
from confluent_kafka import Producer
from support import (
    PAYMENT_SCHEMA,
    avro,
    committed_lag,
    free_ports,
    payments,
    produce_raw,
    read_record,
    read_topic,
    train_payment_classifier,
    wait_for,
    write_schema,
)

from stream_scorer.stages.decode import load_schema
from stream_scorer.worker.supervisor import run_command

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
PARTITIONS = 3


@dataclass
class Env:
    bootstrap: str
    config: Path
    topic: str
    out: str
    group: str
    tmp: Path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scaling-model")
    train_payment_classifier(path)
    return path


@pytest.fixture
def env(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
) -> Env:
    topic, out, dlq, group = unique("sc-in"), unique("sc-out"), unique("sc-dlq"), unique("sc-g")
    make_topics({topic: PARTITIONS, out: PARTITIONS, dlq: 1})
    raw = {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "statistics_interval_ms": 1000},
        "input": {
            "topic": topic,
            "group_id": group,
            "schema": str(write_schema(tmp_path / "payment.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
        },
        "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": dlq},
        "model": {"path": str(model_dir)},
        "batch": {"max_records": 200, "max_wait_ms": 20},
        "logging": {"format": "json"},
    }
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Env(kafka_bootstrap, config, topic, out, group, tmp_path)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _metric(port: int, name: str) -> float | None:
    """One unlabelled sample of a worker, or None when it does not answer (yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        _code, text = _get(port, "/metrics")
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and not s.labels:
                return float(s.value)
    return None


class Worker:
    """A ``stream-scorer run`` subprocess with its own metrics port; output goes to files."""

    def __init__(self, env: Env, name: str, *extra: str, port: int | None = None) -> None:
        self.name, self.port = name, port if port is not None else free_ports(1)[0]
        self.out_path, self.err_path = env.tmp / f"{name}.out", env.tmp / f"{name}.err"
        self._out: IO[str] = self.out_path.open("w")
        self._err: IO[str] = self.err_path.open("w")
        self.proc = subprocess.Popen(
            run_command(env.config, "--worker-id", name, "--metrics-port", str(self.port), *extra),
            stdout=self._out,
            stderr=self._err,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )

    def metric(self, name: str, offset: int = 0) -> float:
        return _metric(self.port + offset, name) or 0.0

    def stop(self, timeout: float = 60) -> list[dict[str, Any]]:
        """SIGTERM, wait, and return the JSON reports it printed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        self._out.close()
        self._err.close()
        lines = self.out_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stderr(self) -> str:
        return self.err_path.read_text()


class Flow:
    """Produces payment events at a steady rate until stopped; remembers how many."""

    def __init__(self, bootstrap: str, topic: str, per_second: float) -> None:
        self.records = payments(60_000, seed=17)
        self.sent = 0
        self._stop = threading.Event()
        self._rate = per_second
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "enable.idempotence": "true", "linger.ms": "5"}
        )
        self._topic = topic
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[Any] = []

    def _run(self) -> None:
        started = time.monotonic()
        chunk = max(1, int(self._rate / 20))
        for i, rec in enumerate(self.records):
            if self._stop.is_set():
                break
            self._producer.produce(
                self._topic,
                value=avro(PAYMENT_SCHEMA, rec),
                key=rec["txn_id"].encode(),
                partition=i % PARTITIONS,
                on_delivery=lambda err, _m: self.errors.append(err) if err else None,
            )
            self.sent = i + 1
            self._producer.poll(0)
            if self.sent % chunk == 0:  # pacing
                self._stop.wait(max(0.0, started + self.sent / self._rate - time.monotonic()))
        assert self._producer.flush(30) == 0

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def _prediction_ids(env: Env) -> Counter[str]:
    schema = load_schema(ROOT / "schemas" / "prediction.v1.avsc")
    return Counter(
        read_record(schema, m.value())["input_id"] for m in read_topic(env.bootstrap, env.out)
    )


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:  # a failed test must not leave processes behind
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(timeout=30)


def test_one_to_three_to_one_workers_while_producing_loses_nothing(
    env: Env, workers: list[Worker], record_property: Callable[[str, object], None]
) -> None:
    consumed = "stream_scorer_records_consumed_total"
    assigned = "stream_scorer_assigned_partitions"
    with Flow(env.bootstrap, env.topic, per_second=1000) as flow:
        a = Worker(env, "a")
        workers.append(a)
        wait_for(lambda: a.metric(consumed) > 0, 60, "worker a consumed nothing")

        # 1 → 3: each of the three gets one partition and scores from it
        b, c = Worker(env, "b"), Worker(env, "c")
        workers += [b, c]
        wait_for(
            lambda: all(w.metric(assigned) == 1 and w.metric(consumed) > 0 for w in (a, b, c)),
            60,
            "the three workers never shared the partitions",
        )
        assert flow.running, "production ended before the scale-down"

        # 3 → 1: the two leave cleanly; a takes everything back while events keep coming
        reports = b.stop() + c.stop()
        assert b.proc.returncode == 0, b.stderr()
        assert c.proc.returncode == 0, c.stderr()
        assert all(r["stopped_by"] == "SIGTERM" and r["consumed"] > 0 for r in reports)
        wait_for(lambda: a.metric(assigned) == PARTITIONS, 60, "a never got every partition")
        after = a.metric(consumed)
        wait_for(lambda: a.metric(consumed) > after + 500, 60, "a stopped consuming")
        assert flow.running, "production ended before worker a was alone again"
    assert flow.errors == []
    sent = flow.sent
    wait_for(
        lambda: sum(committed_lag(env.bootstrap, env.group, env.topic).values()) == 0,
        60,
        "worker a never caught up",
    )
    reports += a.stop()
    assert a.proc.returncode == 0, a.stderr()

    ids = _prediction_ids(env)
    expected = {r["txn_id"] for r in flow.records[:sent]}
    lost = expected - set(ids)
    duplicates = sum(n - 1 for n in ids.values())
    record_property("events", sent)
    record_property("duplicates", duplicates)
    print(f"scaling 1→3→1: {sent} events, {len(lost)} lost, {duplicates} duplicates")
    assert not lost, f"{len(lost)} events without a prediction"
    assert set(ids) == expected  # nothing else
    assert sum(r["predictions"] for r in reports) == sum(ids.values())


def test_workers_flag_runs_n_group_members_with_their_own_ports_and_ids(
    env: Env, workers: list[Worker]
) -> None:
    port = free_ports(2, consecutive=True)[0]
    parent = Worker(env, "sup", "--workers", "2", port=port)
    workers.append(parent)

    def both_ready() -> bool:
        try:
            states = [_get(port + i, "/readyz") for i in (0, 1)]
        except OSError:
            return False
        bodies = [json.loads(body) for _code, body in states]
        return (
            all(code == 200 for code, _ in states)
            and sum(b["assigned_partitions"] for b in bodies) == PARTITIONS
            and min(b["assigned_partitions"] for b in bodies) >= 1
        )

    wait_for(both_ready, 60, "the two workers never became ready")
    recs = payments(3000, seed=23)
    produce_raw(
        env.bootstrap,
        env.topic,
        [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs],
        PARTITIONS,
    )
    wait_for(
        lambda: sum(committed_lag(env.bootstrap, env.group, env.topic).values()) == 0,
        60,
        "the workers never caught up",
    )
    # each process has its own registry: the counts add up, nothing is counted twice
    wait_for(
        lambda: (
            parent.metric("stream_scorer_predictions_produced_total")
            + parent.metric("stream_scorer_predictions_produced_total", 1)
            == len(recs)
        ),
        30,
        "per-process prediction counts never added up",
    )
    consumed = [parent.metric("stream_scorer_records_consumed_total", i) for i in (0, 1)]
    assert sum(consumed) == len(recs) and min(consumed) > 0

    reports = parent.stop()  # SIGTERM to the parent reaches both; each drains
    assert parent.proc.returncode == 0, parent.stderr()
    assert sorted(r["worker_id"] for r in reports) == ["sup-0", "sup-1"]
    assert all(r["stopped_by"] == "SIGTERM" for r in reports)
    assert sum(r["predictions"] for r in reports) == len(recs)
    logged = {
        json.loads(line).get("worker_id")
        for line in parent.stderr().splitlines()
        if line.startswith("{")
    }
    assert {"sup-0", "sup-1"} <= logged
