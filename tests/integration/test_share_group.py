"""Share groups (``input.group_type: share``) on the real broker: workers past the partition count.

One partition, four worker processes: every one receives records; two are killed with kill -9
mid-stream and nothing is lost (their held records come back when their locks expire; those are
the only duplicates, counted). A record delivered ``input.delivery_limit`` times reaches the
dead-letter topic with reason ``delivery_limit``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import test_scaling
import yaml
from confluent_kafka import AcknowledgeType, ShareConsumer
from support import PAYMENT_SCHEMA, avro, payments, produce_raw, read_topic, wait_for, write_schema
from test_scaling import ROOT, Env, Flow, Worker, _prediction_ids

from stream_scorer import headers
from stream_scorer.worker.share import configure_group, share_group_configs

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
