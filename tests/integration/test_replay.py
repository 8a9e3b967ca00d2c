"""``stream-scorer dlq replay`` against a real broker: filters, bytes, headers, run twice."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support import (
    PAYMENT_SCHEMA,
    avro,
    payments,
    produce_raw,
    read_topic,
    train_payment_classifier,
    write_schema,
)

from stream_scorer import headers as hdr
from stream_scorer.cli import main
from stream_scorer.config import load_config
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.worker.loop import run_worker

pytestmark = pytest.mark.integration


def _worker_config(
    tmp_path: Path, bootstrap: str, topics: tuple[str, str, str], group: str
) -> Path:
    """A payment classifier's worker configuration on ``topics`` (input, output, dead letters)."""
    model = tmp_path / "model"
    train_payment_classifier(model)
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
                "model": {"path": str(model)},
                "metrics": {"port": 0},
            }
        )
    )
    return config


def test_replay_by_reason_publishes_originals_once_and_run_twice_is_a_no_op(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic, out, dlq, target = unique("pay"), unique("out"), unique("dlq"), unique("replayed")
    make_topics({topic: 2, out: 2, dlq: 2, target: 1})
    config = _worker_config(tmp_path, kafka_bootstrap, (topic, out, dlq), unique("g"))
    recs = payments(40, seed=3)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    poison = {
        b"trunc-1": avro(PAYMENT_SCHEMA, recs[0])[:4],
        b"trunc-2": avro(PAYMENT_SCHEMA, recs[1])[:3],
        b"inf-1": avro(PAYMENT_SCHEMA, dict(recs[2], amount=math.inf)),
        b"empty-1": b"",
    }
    items += list(poison.items())
    produce_raw(kafka_bootstrap, topic, items, 2)
    run_worker(load_config(config, environ={}, overrides={"worker": {"max_messages": 44}}))
    dead = read_topic(kafka_bootstrap, dlq)
    reasons = Counter(dict(m.headers())[hdr.REASON].decode() for m in dead)
    assert reasons == {"truncated": 2, "non_finite": 1, "empty": 1}

    args = ["dlq", "replay", "--config", str(config), "--to", target, "--reason", "truncated"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["replayed"] == 2 and first["scanned"] == 4
    assert first["by_reason"] == {"truncated": 2}
    replayed = read_topic(kafka_bootstrap, target)
    assert sorted((m.key(), m.value()) for m in replayed) == sorted(
        (k, v) for k, v in poison.items() if k.startswith(b"trunc")
    )
    for m in replayed:
        headers = dict(m.headers())
        assert headers["origin"] == b"test"  # the producer's own header survives
        assert headers[hdr.ATTEMPT] == b"2"
        assert headers[hdr.REPLAY_SOURCE].startswith(dlq.encode() + b"/")
        assert not any(k.startswith(hdr.CONNECT_PREFIX) for k in headers)
        assert hdr.REASON not in headers

    assert main(args) == 0  # the same command again: nothing left to replay
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["replayed"] == 0
    assert len(read_topic(kafka_bootstrap, target)) == 2

    # another filter is another replay: everything written since the epoch
    everything = ["dlq", "replay", "--config", str(config), "--to", target, "--since", "0"]
    assert main([*everything, "--rate", "1000"]) == 0
    third = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert third["replayed"] == 4
    assert len(read_topic(kafka_bootstrap, target)) == 6


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--to", "x", "--dead-letter-topic", "d"], "--bootstrap-servers"),
        (
            [
                "--bootstrap-servers",
                "h:1",
                "--to",
                "x",
                "--dead-letter-topic",
                "d",
                "--since",
                "soon",
            ],
            "--since",
        ),
        (
            ["--bootstrap-servers", "h:1", "--to", "x", "--dead-letter-topic", "d", "--rate", "0"],
            "--rate",
        ),
    ],
)
def test_replay_arguments_are_checked_before_connecting(
    args: list[str], field: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["dlq", "replay", *args]) == 2
    assert field in caplog.text


def test_a_too_large_dead_letter_replays_byte_identical_where_the_topic_accepts_it(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The worker's own ``too_large`` dead letter (over 1 MB) goes through ``dlq replay``."""
    from confluent_kafka import Producer

    from stream_scorer.ops.topics import ensure_topics

    big_topics = {"max.message.bytes": "2000000"}
    topic, out, dlq, target = unique("big"), unique("out"), unique("dlq"), unique("big-target")
    small = unique("small-target")
    ensure_topics(kafka_bootstrap, {topic: 1, dlq: 1, target: 1}, config=big_topics)
    make_topics({out: 1})
    ensure_topics(kafka_bootstrap, {small: 1}, config={"max.message.bytes": "600000"})
    config = _worker_config(tmp_path, kafka_bootstrap, (topic, out, dlq), unique("g"))
    # above input.max_message_bytes (1 MiB): dead-lettered unread as too_large
    value = bytes(range(256)) * 4300  # 1,100,800 bytes
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": "2000000"})
    producer.produce(topic, value=value, key=b"huge", headers=[("origin", b"test")])
    assert producer.flush(30) == 0
    run_worker(load_config(config, environ={}, overrides={"worker": {"max_messages": 1}}))
    (dead,) = read_topic(kafka_bootstrap, dlq)
    assert dict(dead.headers())[hdr.REASON] == b"too_large" and dead.value() == value

    args = ["dlq", "replay", "--config", str(config), "--reason", "too_large"]
    assert main([*args, "--to", target]) == 0, caplog.text
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["replayed"], report["by_reason"]) == (1, {"too_large": 1})
    (replayed,) = read_topic(kafka_bootstrap, target)
    assert (replayed.key(), replayed.value()) == (b"huge", value)  # byte-identical
    assert dict(replayed.headers())["origin"] == b"test"
    assert main([*args, "--to", target]) == 0  # again: nothing left
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["replayed"] == 0
    assert len(read_topic(kafka_bootstrap, target)) == 1

    # a target topic that refuses records this large: a failure naming the topic's limit
    caplog.clear()
    assert main([*args, "--to", small]) == 1
    assert f"topic {small!r}" in caplog.text
    assert "max.message.bytes = 600000" in caplog.text
    assert read_topic(kafka_bootstrap, small) == []

    # a client limit set in the configuration is kept: the client is named as the one refusing
    raw = yaml.safe_load(config.read_text())
    raw["kafka"]["client"] = {"message.max.bytes": "1000000"}
    capped = tmp_path / "capped.yaml"
    capped.write_text(yaml.safe_dump(raw))
    caplog.clear()
    fresh = ["--group", unique("replay-again"), "--to", target]
    assert main(["dlq", "replay", "--config", str(capped), "--reason", "too_large", *fresh]) == 1
    assert "the client refused dead letter" in caplog.text
    assert "message.max.bytes = 1000000 (kafka.client)" in caplog.text
    assert len(read_topic(kafka_bootstrap, target)) == 1
