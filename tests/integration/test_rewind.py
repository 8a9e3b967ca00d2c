"""``stream-scorer rewind`` against a real broker: a window scored again, refusals, dry runs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from support import (
    PAYMENT_SCHEMA,
    avro,
    committed_offsets,
    high_watermarks,
    payments,
    read_record,
    read_topic,
    train_payment_classifier,
    wait_for,
    write_schema,
)

from stream_scorer import headers as hdr
from stream_scorer.cli import main
from stream_scorer.config import load_config
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.errors import BrokerError
from stream_scorer.ops import rewind as rewind_module
from stream_scorer.ops.rewind import BEYOND_END, LOG_START
from stream_scorer.worker.loop import run_worker

pytestmark = pytest.mark.integration

PARTITIONS = 2
EVENTS = 40
#: records from this index on are the window to score again
CUT = 25
STEP_MS = 1_000
PREDICTION: dict[str, Any] = json.loads(PREDICTION_SCHEMA_V1.read_text())


def _produce_timed(bootstrap: str, topic: str, base_ms: int) -> dict[tuple[int, int], int]:
    """EVENTS payments, record i at ``base_ms + i s`` on partition i % 2; (p, offset) -> index."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": "true"})
    where: dict[tuple[int, int], int] = {}
    next_offset = [0] * PARTITIONS
    for i, rec in enumerate(payments(EVENTS, seed=5)):
        partition = i % PARTITIONS
        producer.produce(
            topic,
            avro(PAYMENT_SCHEMA, rec),
            key=rec["txn_id"].encode(),
            partition=partition,
            timestamp=base_ms + i * STEP_MS,
        )
        where[(partition, next_offset[partition])] = i
        next_offset[partition] += 1
    assert producer.flush(30) == 0
    return where


def _config(tmp_path: Path, bootstrap: str, topics: tuple[str, str, str], group: str) -> Path:
    config = tmp_path / "w.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": bootstrap},
                "input": {
                    "topic": topics[0],
                    "group_id": group,
                    "schema": str(write_schema(tmp_path / "p.avsc", PAYMENT_SCHEMA)),
                    "id_field": "txn_id",
                },
                "output": {"topic": topics[1], "schema": str(PREDICTION_SCHEMA_V1)},
                "dead_letter": {"topic": topics[2]},
                "model": {"path": str(tmp_path / "model-1")},
                "metrics": {"port": 0},
                "worker": {"idle_timeout_s": 2},
            }
        )
    )
    return config


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def _rewind_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["rewind", "--json", *args]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return doc


def test_rollback_and_rewind_scores_exactly_the_window_again_with_the_new_model(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic, out, dlq, group = unique("rw-in"), unique("rw-out"), unique("rw-dlq"), unique("rw-g")
    make_topics({topic: PARTITIONS, out: PARTITIONS, dlq: 1})
    train_payment_classifier(tmp_path / "model-1", version="bad-model")
    train_payment_classifier(tmp_path / "model-2", version="rolled-back")
    config = _config(tmp_path, kafka_bootstrap, (topic, out, dlq), group)
    base_ms = int(time.time() * 1000) - 3_600_000
    where = _produce_timed(kafka_bootstrap, topic, base_ms)

    first = run_worker(load_config(config, environ={}))
    assert (first.stopped_by, first.consumed, first.predictions) == ("idle_timeout", EVENTS, EVENTS)
    ends = high_watermarks(kafka_bootstrap, topic)
    assert committed_offsets(kafka_bootstrap, group, topic) == ends

    # roll back (another model directory), then rewind to record CUT's timestamp
    doc = _rewind_json(
        capsys, "--group", group, "--to", _iso(base_ms + CUT * STEP_MS), "--config", str(config)
    )
    window = {pos for pos, i in where.items() if i >= CUT}
    firsts = {p: min(o for (q, o) in window if q == p) for p in range(PARTITIONS)}
    rows = {r["partition"]: r for r in doc["partitions"]}
    assert (doc["group"], doc["dry_run"]) == (group, False)
    for p in range(PARTITIONS):
        assert rows[p]["topic"] == topic
        assert (rows[p]["before"], rows[p]["after"], rows[p]["end"]) == (
            ends[p],
            firsts[p],
            ends[p],
        )
        assert (rows[p]["again"], rows[p]["skipped"], rows[p]["note"]) == (
            ends[p] - firsts[p],
            0,
            "",
        )
    assert doc["total"]["again"] == len(window) == EVENTS - CUT
    assert committed_offsets(kafka_bootstrap, group, topic) == firsts

    rolled = load_config(config, environ={"STREAM_SCORER_MODEL__PATH": str(tmp_path / "model-2")})
    second = run_worker(rolled)
    assert (second.consumed, second.predictions) == (len(window), len(window))
    predictions = read_topic(kafka_bootstrap, out)
    assert len(predictions) == EVENTS + len(window)
    again = [m for m in predictions if dict(m.headers())[hdr.MODEL_VERSION] == b"rolled-back"]
    coordinates = []
    for m in again:
        h = dict(m.headers())
        assert h[hdr.SOURCE_TOPIC] == topic.encode()
        pos = (int(h[hdr.SOURCE_PARTITION]), int(h[hdr.SOURCE_OFFSET]))
        coordinates.append(pos)
        body = read_record(PREDICTION, m.value())
        assert body["model_version"] == "rolled-back"
        assert body["input_id"] == payments(EVENTS, seed=5)[where[pos]]["txn_id"]
    assert sorted(coordinates) == sorted(window)  # each once, nothing outside the window
    assert committed_offsets(kafka_bootstrap, group, topic) == ends


def _commit(bootstrap: str, group: str, offsets: dict[tuple[str, int], int]) -> None:
    """Commit ``offsets`` for ``group`` without joining it (as a stopped worker left them)."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        probe.commit(offsets=tps, asynchronous=False)
    finally:
        probe.close()


def test_rewind_refuses_members_dry_run_changes_nothing_and_a_later_time_is_the_end(
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic, group = unique("rw-ops"), unique("rw-ops-g")
    make_topics({topic: PARTITIONS})
    base_ms = int(time.time() * 1000) - 3_600_000
    _produce_timed(kafka_bootstrap, topic, base_ms)  # partition p: offsets 0..19
    _commit(kafka_bootstrap, group, {(topic, 0): 20, (topic, 1): 8})
    committed = {0: 20, 1: 8}
    assert committed_offsets(kafka_bootstrap, group, topic) == committed
    bootstrap = ["--bootstrap-servers", kafka_bootstrap]
    at_10 = _iso(base_ms + 10 * STEP_MS)  # record 10: partition 0 offset 5, partition 1 offset 5

    # --dry-run (with --by): the plan, nothing changed
    plan = _rewind_json(capsys, "--group", group, "--by", "1h10m", "--dry-run", *bootstrap)
    assert plan["dry_run"] is True
    assert [(r["before"], r["after"]) for r in plan["partitions"]] == [(20, 0), (8, 0)]
    plan = _rewind_json(capsys, "--group", group, "--to", at_10, "--dry-run", *bootstrap)
    assert [(r["before"], r["after"], r["again"]) for r in plan["partitions"]] == [
        (20, 5, 15),
        (8, 5, 3),
    ]
    assert committed_offsets(kafka_bootstrap, group, topic) == committed

    # a member in the group: refused, named, nothing changed
    member = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": group,
            "client.id": "busy-member",
            "enable.auto.commit": "false",  # a member that never commits: only rewind could
        }
    )
    try:
        member.subscribe([topic])
        wait_for(
            lambda: member.poll(0.2) is None and len(member.assignment()) == PARTITIONS,
            60,
            "the member was never assigned the partitions",
            interval=0,
        )
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["rewind", "--group", group, "--to", at_10, *bootstrap]) == 1
        assert "1 active member(s): busy-member (member " in caplog.text
        assert "stop its workers first" in caplog.text
        # a member joining between the check and the change: the broker refuses, nothing changes
        monkeypatch.setattr(rewind_module, "active_members", lambda *_args: [])
        with pytest.raises(BrokerError, match=r"refused to change the offsets .*did a member join"):
            rewind_module.rewind({"bootstrap.servers": kafka_bootstrap}, group, base_ms, [topic])
        monkeypatch.undo()
        assert committed_offsets(kafka_bootstrap, group, topic) == committed
        # a dry run shows the plan anyway, and who is in the way
        capsys.readouterr()
        assert main(["rewind", "--group", group, "--to", at_10, "--dry-run", *bootstrap]) == 0
        last = capsys.readouterr().out.splitlines()[-1]
        assert last.startswith("the group has 1 active member(s), so the rewind itself would")
        assert "busy-member (member " in last
    finally:
        member.close()
    assert committed_offsets(kafka_bootstrap, group, topic) == committed

    # a time after the last record: the end offsets, and the table says so
    later = _iso(int(time.time() * 1000) + 86_400_000)
    capsys.readouterr()
    assert main(["rewind", "--group", group, "--topic", topic, "--to", later, *bootstrap]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"GROUP {group}: committed offsets moved to the first record at")
    assert lines[1].split() == [
        "TOPIC",
        "PARTITION",
        "BEFORE",
        "AFTER",
        "END",
        "AGAIN",
        "SKIPPED",
        "NOTE",
    ]
    assert lines[2].split()[:7] == [topic, "0", "20", "20", "20", "0", "0"]
    assert lines[3].split()[:7] == [topic, "1", "8", "20", "20", "0", "12"]
    assert BEYOND_END in lines[2] and BEYOND_END in lines[3]
    assert lines[4].split() == ["TOTAL", "0", "12"]
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 20, 1: 20}

    # retention deleted the first records of partition 0: a time before them gets its first
    # record kept, and the line says why
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_records([TopicPartition(topic, 0, 3)]).values():
        future.result(30)
    plan = _rewind_json(
        capsys, "--group", group, "--to", _iso(base_ms - 60_000), "--dry-run", *bootstrap
    )
    assert [(r["low"], r["after"], r["note"]) for r in plan["partitions"]] == [
        (3, 3, LOG_START),
        (0, 0, ""),
    ]
