"""``stream-scorer lag`` against a real group: checked with the broker's own numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from support import free_ports, wait_for

pytestmark = pytest.mark.integration

#: records per partition, and the offset the group commits there (None: never commits)
LAYOUT = {0: (10, 4), 1: (6, 6), 2: (4, None)}
HOUR_MS = 3_600_000


def _lag(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_scorer", "lag", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def _produce(bootstrap: str, topic: str, base_ms: int) -> dict[tuple[int, int], int]:
    """Produce LAYOUT with explicit, distinct timestamps; return them by (partition, offset)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": "true"})
    stamps = {}
    for partition, (count, _commit) in LAYOUT.items():
        for offset in range(count):
            ts = base_ms + partition * 100_000 + offset * 1_000
            producer.produce(topic, b"x", partition=partition, timestamp=ts)
            stamps[(partition, offset)] = ts
    assert producer.flush(30) == 0
    return stamps


def _commit_as_a_group_member(bootstrap: str, group: str, topic: str) -> None:
    """Join ``group``, read, and commit LAYOUT's offsets, like a consumer that fell behind."""
    member = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        member.subscribe([topic])
        seen: set[int] = set()

        def read_some() -> bool:
            for msg in member.consume(100, 0.5):
                if msg.error() is None:
                    partition = msg.partition()
                    assert partition is not None  # a consumed record has its partition
                    seen.add(partition)
            return {0, 1} <= seen

        wait_for(read_some, 60, "the group member read nothing", interval=0)
        offsets = [TopicPartition(topic, p, commit) for p, (_n, commit) in LAYOUT.items() if commit]
        member.commit(offsets=offsets, asynchronous=False)
    finally:
        member.close()


def _broker_view(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int | None, int]]:
    """The group's committed offsets (a Consumer's committed()) and the high watermarks."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        tps = [TopicPartition(topic, p) for p in LAYOUT]
        committed = probe.committed(tps, timeout=10)
        out = {}
        for tp in committed:
            _low, high = probe.get_watermark_offsets(TopicPartition(topic, tp.partition), 10)
            out[tp.partition] = (tp.offset if tp.offset >= 0 else None, high)
        return out
    finally:
        probe.close()


def test_lag_in_records_and_seconds_matches_the_broker(
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topic, group = unique("lagged"), unique("lag-grp")
    make_topics({topic: len(LAYOUT)})
    base_ms = int(time.time() * 1000) - HOUR_MS  # an hour behind
    stamps = _produce(kafka_bootstrap, topic, base_ms)
    _commit_as_a_group_member(kafka_bootstrap, group, topic)
    broker = _broker_view(kafka_bootstrap, group, topic)
    assert broker == {0: (4, 10), 1: (6, 6), 2: (None, 4)}

    before = time.time()
    result = _lag(
        "--group", group, "--topic", topic, "--json", "--bootstrap-servers", kafka_bootstrap
    )
    after = time.time()
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    rows: dict[int, dict[str, Any]] = {r["partition"]: r for r in doc["partitions"]}
    assert doc["group"] == group
    assert sorted(rows) == [0, 1, 2]
    for partition, (committed, high) in broker.items():
        row = rows[partition]
        assert row["topic"] == topic
        assert (row["committed"], row["high"]) == (committed, high)
        start = 0 if committed is None else committed  # never committed: the low watermark
        assert row["lag_records"] == high - start
        if high == start:
            assert (row["lag_seconds"], row["oldest_timestamp_ms"]) == (0.0, None)
            continue
        oldest = stamps[(partition, start)]  # the record at the committed offset
        assert row["oldest_timestamp_ms"] == oldest
        assert before - oldest / 1000 <= row["lag_seconds"] <= after - oldest / 1000
    assert doc["total"]["lag_records"] == 6 + 0 + 4
    assert doc["total"]["max_lag_seconds"] == max(r["lag_seconds"] for r in rows.values())
    assert doc["total"]["max_lag_seconds"] > HOUR_MS / 1000 - 60  # p0's oldest is ~1 h old

    # without --topic: every partition of the topics the group consumes, the one it never
    # committed too (from the low watermark); as a table
    table = _lag("--group", group, "--bootstrap-servers", kafka_bootstrap)
    assert table.returncode == 0, table.stderr
    lines = [line.split() for line in table.stdout.splitlines()]
    assert lines[0] == ["GROUP", group]
    assert lines[1][:5] == ["TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG"]
    assert [line[:5] for line in lines[2:5]] == [
        [topic, "0", "4", "10", "6"],
        [topic, "1", "6", "6", "0"],
        [topic, "2", "-", "4", "4"],
    ]
    assert lines[5][:2] == ["TOTAL", "10"]  # the same total as with --topic
    assert abs(float(lines[2][5]) - (time.time() - stamps[(0, 4)] / 1000)) < 60


def test_lag_without_topic_counts_the_topics_a_live_member_is_assigned(
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    """A member assigned a topic it has committed nothing on yet: its whole backlog is lag."""
    topic, group = unique("fresh"), unique("fresh-grp")
    make_topics({topic: 2})
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(7):
        producer.produce(topic, b"x", partition=i % 2)
    assert producer.flush(30) == 0
    member = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": group,
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
        }
    )
    try:
        member.subscribe([topic])
        wait_for(
            lambda: bool(member.consume(1, 0.5)) and len(member.assignment()) == 2,
            60,
            "the member was never assigned both partitions",
            interval=0,
        )
        result = _lag("--group", group, "--json", "--bootstrap-servers", kafka_bootstrap)
    finally:
        member.close()
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    rows = [
        (r["topic"], r["partition"], r["committed"], r["lag_records"]) for r in doc["partitions"]
    ]
    assert rows == [(topic, 0, None, 4), (topic, 1, None, 3)]
    assert doc["total"]["lag_records"] == 7


def test_lag_of_a_group_that_does_not_exist_says_so(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    group = unique("no-such-group")
    result = _lag("--group", group, "--bootstrap-servers", kafka_bootstrap)
    assert result.returncode == 1
    assert f"group {group!r} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def test_lag_of_an_unknown_topic_fails_cleanly(kafka_bootstrap: str) -> None:
    result = _lag(
        "--group", "g", "--topic", "no-such-topic-x", "--bootstrap-servers", kafka_bootstrap
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr


def test_transaction_markers_after_the_committed_offset_are_no_waiting_record(
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topic, group = unique("txn-in"), unique("txn-grp")
    make_topics({topic: 1})
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique("tx")})
    producer.init_transactions(30)
    producer.begin_transaction()
    for _ in range(3):
        producer.produce(topic, b"x", partition=0)
    producer.commit_transaction(30)  # offsets 0-2 records, offset 3 the commit marker
    probe = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        probe.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        assert probe.get_watermark_offsets(TopicPartition(topic, 0), 10) == (0, 4)
    finally:
        probe.close()
    result = _lag(
        "--group",
        group,
        "--topic",
        topic,
        "--json",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--timeout",
        "10",
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)["partitions"]
    assert (row["committed"], row["high"], row["lag_records"]) == (3, 4, 1)  # as Kafka counts
    assert (row["lag_seconds"], row["oldest_timestamp_ms"]) == (0.0, None)  # nothing waits


@pytest.mark.parametrize("command", ["lag", "rewind"])
def test_a_wrong_broker_address_is_named_in_the_message(command: str) -> None:
    (port,) = free_ports(1)  # nothing listens there: a wrong address
    where = f"127.0.0.1:{port}"
    args = ["--group", "g", "--bootstrap-servers", where, "--timeout", "2"]
    args += ["--by", "1h", "--dry-run"] if command == "rewind" else []
    result = subprocess.run(
        [sys.executable, "-m", "stream_scorer", command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "BrokerError" in last and where in last, result.stderr
