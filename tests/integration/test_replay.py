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
from stream_scorer.worker.loop import run_worker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]


def test_replay_by_reason_publishes_originals_once_and_run_twice_is_a_no_op(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic, out, dlq, target = unique("pay"), unique("out"), unique("dlq"), unique("replayed")
    make_topics({topic: 2, out: 2, dlq: 2, target: 1})
    model = tmp_path / "model"
    train_payment_classifier(model)
    config = tmp_path / "w.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "kafka": {"bootstrap_servers": kafka_bootstrap},
                "input": {
                    "topic": topic,
                    "group_id": unique("g"),
                    "schema": str(write_schema(tmp_path / "p.avsc", PAYMENT_SCHEMA)),
                    "id_field": "txn_id",
                },
                "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
                "dead_letter": {"topic": dlq},
                "model": {"path": str(model)},
                "metrics": {"port": 0},
            }
        )
    )
    recs = payments(40, seed=3)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    poison = {
        b"trunc-1": items[0][1][:4],  # type: ignore[index]
        b"trunc-2": items[1][1][:3],  # type: ignore[index]
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
