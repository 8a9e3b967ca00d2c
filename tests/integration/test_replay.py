"""``stream-scorer dlq replay`` against a real broker: filters, bytes, headers, run twice."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    PAYMENT_SCHEMA,
    avro,
    committed_offsets,
    payments,
    produce_raw,
    read_topic,
    rsa_pair,
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

    from stream_scorer.kafka.topics import ensure_topics

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


# --- dead letters that cannot be replayed as their record: stripped, moved, forged -----------


def _keys(folder: Path) -> tuple[Path, Path, Path]:
    """An RSA key pair for ``payload: encrypt`` and a signing key file: (public, private, sign)."""
    public_file, private_file = rsa_pair(folder)
    sign = folder / "dlq.sign.key"
    sign.write_bytes(os.urandom(32).hex().encode() + b"\n")
    return public_file, private_file, sign


def _reconfigure(config: Path, to: Path, **sections: dict[str, Any]) -> Path:
    raw = yaml.safe_load(config.read_text())
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    to.write_text(yaml.safe_dump(raw))
    return to


@pytest.mark.parametrize(
    ("mode", "payload"), [("at-least-once", "keep"), ("exactly-once", "encrypt")]
)
def test_a_record_too_large_for_the_dead_letter_topic_is_dead_lettered_stripped_not_a_crash(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
    mode: str,
    payload: str,
) -> None:
    """A 3 MB value on an input topic that takes it, a dead-letter topic that takes 1 MB."""
    from confluent_kafka import Producer

    from stream_scorer.kafka.topics import ensure_topics

    topic, out, dlq, target = unique("big"), unique("out"), unique("dlq"), unique("target")
    ensure_topics(kafka_bootstrap, {topic: 1}, config={"max.message.bytes": "4000000"})
    ensure_topics(kafka_bootstrap, {dlq: 1}, config={"max.message.bytes": "1000000"})
    make_topics({out: 1, target: 1})
    group = unique("g")
    public, _private, sign = _keys(tmp_path)
    protection = {"payload": "encrypt", "public_key": str(public)} if payload == "encrypt" else {}
    config = _reconfigure(
        _worker_config(tmp_path, kafka_bootstrap, (topic, out, dlq), group),
        tmp_path / "big.yaml",
        input={"max_message_bytes": 2_000_000},  # the 3 MB value is a too_large dead letter
        delivery={"mode": mode},
        dead_letter={"signing_key": str(sign), **protection},
    )
    recs = payments(10, seed=4)
    value = hashlib.sha256(b"seed").digest() * 93_750  # 3,000,000 bytes
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": "4000000"})
    for i, r in enumerate(recs):
        producer.produce(topic, value=avro(PAYMENT_SCHEMA, r), key=r["txn_id"].encode())
        if i == 4:
            producer.produce(topic, value=value, key=b"huge", headers=[("origin", b"big")])
    assert producer.flush(30) == 0

    report = run_worker(load_config(config, environ={}, overrides={"worker": {"max_messages": 11}}))
    assert report.dead_letters == {"decode/too_large": 1}
    (dead,) = read_topic(kafka_bootstrap, dlq)
    h = dict(dead.headers())
    assert (dead.key(), dead.value()) == (None, None)
    assert h[hdr.PAYLOAD] == b"stripped" and h[hdr.REASON] == b"too_large"
    assert h[hdr.ORIGINAL_VALUE_SIZE] == b"3000000"
    assert h[hdr.ORIGINAL_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert (h[hdr.CONNECT_TOPIC], h[hdr.CONNECT_OFFSET], h["origin"]) == (
        topic.encode(),
        b"5",
        b"big",
    )
    predictions = read_topic(kafka_bootstrap, out)
    offsets = sorted(int(dict(m.headers())[hdr.SOURCE_OFFSET]) for m in predictions)
    assert offsets == [o for o in range(11) if o != 5]  # each once, those after it too
    assert committed_offsets(kafka_bootstrap, group, topic) == {0: 11}

    # replay refuses it (no payload), says so, exits 1, publishes nothing
    assert main(["dlq", "replay", "--config", str(config), "--to", target]) == 1
    replayed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert replayed["replayed"] == 0
    assert list(replayed["refused"]) == [f"{dlq}/0/0"]
    assert "written without its key and value (3000000 bytes" in replayed["refused"][f"{dlq}/0/0"]
    assert read_topic(kafka_bootstrap, target) == []


def test_replay_refuses_a_moved_envelope_and_with_a_signing_key_unsigned_letters(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Forgeries written to the dead-letter topic by someone without the keys."""
    from confluent_kafka import Producer

    topic, out, dlq = unique("pay"), unique("out"), unique("dlq")
    plain_target, signed_target = unique("t-plain"), unique("t-signed")
    make_topics({topic: 1, out: 1, dlq: 1, plain_target: 1, signed_target: 1})
    public, private, sign = _keys(tmp_path)
    encrypt = {"payload": "encrypt", "public_key": str(public)}
    base = _worker_config(tmp_path, kafka_bootstrap, (topic, out, dlq), unique("g"))
    signed = _reconfigure(
        base, tmp_path / "signed.yaml", dead_letter={**encrypt, "signing_key": str(sign)}
    )
    unsigned = _reconfigure(base, tmp_path / "unsigned.yaml", dead_letter=encrypt)
    recs = payments(4, seed=6)
    poison: list[tuple[bytes | None, bytes | None]] = [
        (b"inf-1", avro(PAYMENT_SCHEMA, dict(recs[0], amount=math.inf))),
        (b"trunc-1", avro(PAYMENT_SCHEMA, recs[1])[:4]),
    ]
    produce_raw(kafka_bootstrap, topic, poison, 1)
    run_worker(load_config(signed, environ={}, overrides={"worker": {"max_messages": 2}}))
    first, second = read_topic(kafka_bootstrap, dlq)
    h1, h2 = list(first.headers()), list(second.headers())
    sealed = {hdr.ENCRYPTION_SCHEME, hdr.ENCRYPTION_KEY_ID, hdr.ENCRYPTION_WRAPPED_KEY}
    # a forger with WRITE on the dead-letter topic, without the signing key:
    # 1. the first record's envelope (ciphertext and wrapped key) in the second's dead letter
    moved = [(k, v) for k, v in h2 if k not in sealed and k != hdr.SIGNATURE]
    moved += [(k, v) for k, v in h1 if k in sealed]
    # 2. a letter of its own, in the clear, claiming the second record's coordinates
    own = [(k, v) for k, v in moved if k not in sealed and k != hdr.PAYLOAD]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(dlq, value=first.value(), headers=moved)
    producer.produce(dlq, value=b"forged", key=b"evil", headers=own)
    assert producer.flush(30) == 0

    replay = ["dlq", "replay", "--private-key", str(private)]
    # without a signing key: the moved envelope does not open for its coordinates
    assert main([*replay, "--config", str(unsigned), "--to", plain_target]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["replayed"] == 3  # the forger's own letter too: the trust boundary
    assert list(report["refused"]) == [f"{dlq}/0/2"]
    assert (
        "not sealed for this record's topic, partition and offset"
        in report["refused"][f"{dlq}/0/2"]
    )
    assert sorted(
        (m.key(), m.value()) for m in read_topic(kafka_bootstrap, plain_target)
    ) == sorted([*poison, (b"evil", b"forged")])
    # with the signing key (the configuration's): only the workers' letters
    assert main([*replay, "--config", str(signed), "--to", signed_target]) == 1
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["replayed"] == 2
    assert sorted(report["refused"]) == [f"{dlq}/0/2", f"{dlq}/0/3"]
    assert report["refused"][f"{dlq}/0/3"] == "signature: not signed"
    assert sorted(
        (m.key(), m.value()) for m in read_topic(kafka_bootstrap, signed_target)
    ) == sorted(poison)
    assert main([*replay, "--config", str(signed), "--to", signed_target]) == 0  # none left
