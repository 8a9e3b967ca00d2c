"""Share groups (``input.group_type: share``) on the real broker: workers past the partition count.

One partition, four worker processes: every one receives records; two are killed with kill -9
mid-stream and nothing is lost (their held records come back when their locks expire; those are
the only duplicates, counted). A record delivered ``input.delivery_limit`` times reaches the
dead-letter topic with reason ``delivery_limit``.
"""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_scaling
import yaml
from confluent_kafka import AcknowledgeType, ShareConsumer
from support import PAYMENT_SCHEMA, avro, payments, produce_raw, read_topic, wait_for, write_schema
from test_scaling import ROOT, Env, Flow, Worker, _prediction_ids

from stream_scorer import headers
from stream_scorer.worker.share import ShareBacklog, configure_group, share_group_configs

pytestmark = pytest.mark.integration
MAX_RECORDS = 100


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from support import train_payment_classifier

    path = tmp_path_factory.mktemp("share-model")
    train_payment_classifier(path)
    return path


def _env(
    tmp_path: Path,
    bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
    **input_extra: object,
) -> Env:
    topic, out, dlq, group = unique("sh-in"), unique("sh-out"), unique("sh-dlq"), unique("sh-g")
    make_topics({topic: 1, out: 1, dlq: 1})
    raw = {
        "kafka": {"bootstrap_servers": bootstrap},
        "input": {
            "topic": topic,
            "group_id": group,
            "group_type": "share",
            "schema": str(write_schema(tmp_path / "payment.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
            **input_extra,
        },
        "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": dlq},
        "model": {"path": str(model_dir)},
        "batch": {"max_records": MAX_RECORDS, "max_wait_ms": 20},
        "logging": {"format": "json"},
    }
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Env(bootstrap, config, topic, out, group, tmp_path)


@pytest.fixture
def workers() -> Iterator[list[Worker]]:
    started: list[Worker] = []
    yield started
    for w in started:
        if w.proc.poll() is None:
            w.proc.kill()
            w.proc.wait(timeout=30)


@pytest.mark.slow  # four workers, a kill -9, lock expiry
def test_four_share_workers_on_one_partition_all_receive_and_kill_9_loses_nothing(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
    workers: list[Worker],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(test_scaling, "PARTITIONS", 1)  # Flow produces to one partition
    env = _env(tmp_path, kafka_bootstrap, unique, make_topics, model_dir)
    consumed = "stream_scorer_records_consumed_total"
    first = "stream_scorer_first_batch_seconds"
    workers += [Worker(env, f"w{i}") for i in range(4)]
    with Flow(env.bootstrap, env.topic, per_second=400) as flow:
        wait_for(  # each delivered a batch (stream_scorer_first_batch_seconds set)
            lambda: all(w.metric(consumed) > 0 and w.metric(first) > 0 for w in workers),
            120,
            "not every one of the 4 share workers on 1 partition received records",
        )
        assert flow.running, "production ended before the four had records"
        for w in workers:  # start-up → could score → first delivered batch
            startup = w.metric("stream_scorer_startup_seconds")
            assert 0 < startup <= w.metric(first)
        for w in workers[:2]:  # kill -9 two of them mid-stream, holding a batch or not
            w.proc.send_signal(signal.SIGKILL)
            assert w.stop(timeout=30) == []  # killed: no report
            assert w.proc.returncode == -signal.SIGKILL
        wait_for(lambda: flow.sent >= 6000, 120, "production stalled")
    assert flow.errors == []
    sent = {r["txn_id"] for r in flow.records[: flow.sent]}
    seen: dict[str, int] = {}

    def all_scored() -> bool:
        seen.clear()
        seen.update(_prediction_ids(env))
        return sent <= seen.keys()

    # records the killed workers held come back when their locks expire (30 s by default)
    wait_for(all_scored, 180, "records of the killed share workers never came back")
    duplicates = sum(n - 1 for n in seen.values())
    print(f"share kill -9: sent={len(sent)} duplicates={duplicates}")
    assert seen.keys() == sent
    # a duplicate is a record a killed worker held unacknowledged: at most one poll each
    assert duplicates <= 2 * 2 * MAX_RECORDS, duplicates
    for w in workers[2:]:
        assert w.stop() and w.proc.returncode == 0, w.stderr()
        assert "Preview" in w.stderr()  # the client's preview status is said at run time
    # the lag command reads the share group through the broker's ShareGroupCommand
    from stream_scorer.devtools.localkafka import fetch_jars, find_java
    from stream_scorer.ops.sharelag import describe_share_group

    (row,) = describe_share_group(
        {"bootstrap.servers": env.bootstrap},
        env.group,
        env.topic,
        java=find_java(),
        libs=fetch_jars(log=lambda _: None),
    )
    assert (row.partition, row.lag_records) == (0, 0)
    assert row.start_offset is not None  # the group has consumed here


def test_a_record_delivered_delivery_limit_times_is_dead_lettered(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
    workers: list[Worker],
) -> None:
    """A record some member keeps failing on (here: RELEASEs) stops at the delivery limit."""
    env = _env(tmp_path, kafka_bootstrap, unique, make_topics, model_dir, delivery_limit=2)
    configure_group(
        {"bootstrap.servers": env.bootstrap}, env.group, share_group_configs("earliest", 2)
    )
    record = payments(1, seed=5)[0]
    produce_raw(env.bootstrap, env.topic, [(b"poison", avro(PAYMENT_SCHEMA, record))], 1)

    failing = ShareConsumer(
        {
            "bootstrap.servers": env.bootstrap,
            "group.id": env.group,
            "share.acknowledgement.mode": "explicit",
        }
    )
    failing.subscribe([env.topic])
    got: list[int] = []

    def released_once() -> bool:
        for msg in failing.poll(0.5):
            if msg.error() is None:
                got.append(int(msg.delivery_count() or 0))
                failing.acknowledge(msg, AcknowledgeType.RELEASE)
        return bool(got)

    wait_for(released_once, 60, "the failing member never received the record")
    failing.commit_sync()
    failing.close()
    assert got == [1]

    w = Worker(env, "w", "--idle-timeout", "5")
    workers.append(w)

    dlq = yaml.safe_load(env.config.read_text())["dead_letter"]["topic"]
    wait_for(lambda: bool(read_topic(env.bootstrap, dlq)), 90, "no dead letter")
    (letter,) = read_topic(env.bootstrap, dlq)
    assert dict(letter.headers())[headers.REASON] == b"delivery_limit"
    assert letter.value() == avro(PAYMENT_SCHEMA, record)  # the original bytes
    assert read_topic(env.bootstrap, env.out) == []  # not scored
    assert w.stop() is not None and w.proc.returncode == 0, w.stderr()


def _backlog_samples(port: int, topic: str) -> dict[int, float]:
    """``stream_scorer_share_backlog_records`` of a worker, per partition of ``topic``."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {
        int(s.labels["partition"]): float(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "stream_scorer_share_backlog_records" and s.labels.get("topic") == topic
    }


def test_the_share_backlog_reads_the_end_offsets_against_the_newest_delivered_record(
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topic = unique("sh-backlog")
    make_topics({topic: 2})
    produce_raw(kafka_bootstrap, topic, [(b"k", b"v")] * 10, 1)
    backlog = ShareBacklog({"bootstrap.servers": kafka_bootstrap}, interval_s=0.0)
    assert backlog.records() == {}  # nothing delivered: nothing it can say
    backlog.delivered(topic, 0, 3)
    assert backlog.records() == {(topic, 0): 6}  # offsets 4..9 not delivered here
    produce_raw(kafka_bootstrap, topic, [(b"k", b"v")] * 5, 1)
    backlog.delivered(topic, 0, 1)  # an older record (redelivered): the newest stays 3
    assert backlog.records() == {(topic, 0): 11}
    backlog.delivered(topic, 0, 14)
    assert backlog.records() == {(topic, 0): 0}
    cached = ShareBacklog({"bootstrap.servers": kafka_bootstrap}, interval_s=3600.0)
    cached.delivered(topic, 0, 0)
    assert cached.records() == {(topic, 0): 14}
    produce_raw(kafka_bootstrap, topic, [(b"k", b"v")], 1)
    assert cached.records() == {(topic, 0): 14}  # not asked again within interval_s


def test_a_record_whose_lock_expires_is_redelivered_to_another_worker_and_scored(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
    workers: list[Worker],
) -> None:
    """A member that takes records and never acknowledges them (hung, not dead): when their
    locks expire (2 s here, the group's ``share.record.lock.duration.ms``) the broker delivers
    them again, to a worker, which scores them; they are the only redeliveries, counted."""
    env = _env(tmp_path, kafka_bootstrap, unique, make_topics, model_dir)
    configs = {**share_group_configs("earliest", 5), "share.record.lock.duration.ms": "2000"}
    configure_group({"bootstrap.servers": env.bootstrap}, env.group, configs)
    records = payments(20, seed=11)
    sent = {r["txn_id"] for r in records}
    produce_raw(
        env.bootstrap,
        env.topic,
        [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in records],
        1,
    )
    hung = ShareConsumer(
        {
            "bootstrap.servers": env.bootstrap,
            "group.id": env.group,
            "share.acknowledgement.mode": "explicit",
        }
    )
    hung.subscribe([env.topic])
    held: dict[int, int] = {}  # offset -> delivery count, as the hung member saw them

    def took_some() -> bool:
        for msg in hung.poll(0.5):
            if msg.error() is None:
                held[int(msg.offset() or 0)] = int(msg.delivery_count() or 0)
        return bool(held)

    try:
        wait_for(took_some, 60, "the hung member never received a record")
        assert set(held.values()) == {1}
        # it never acknowledges nor polls again: its locks expire, the worker gets the records
        w = Worker(env, "w")
        workers.append(w)
        wait_for(lambda: _prediction_ids(env).keys() == sent, 90, "all 20 records scored")
        scored = _prediction_ids(env)
        # every record scored exactly once: the hung member's only by the worker, after expiry
        assert set(scored.values()) == {1}, scored
        redelivered = len(held)
        print(f"lock expiry: hung member held {redelivered} records, all redelivered")
        assert redelivered >= 1
        # the worker's backlog gauge: nothing left that no worker was given
        wait_for(lambda: _backlog_samples(w.port, env.topic) == {0: 0.0}, 30, "backlog 0")
        reports = w.stop()
        assert w.proc.returncode == 0, w.stderr()
        assert reports and reports[-1]["predictions"] == 20
    finally:
        hung.close()
