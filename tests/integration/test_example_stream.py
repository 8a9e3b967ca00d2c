"""The shipped example through the real CLI: its config, its generator, two workers, the demo."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import xgboost as xgb
from support import committed_lag, free_ports, read_record, read_topic, wait_for

from stream_scorer import headers as hdr
from stream_scorer.example.produce import expected_reasons, produce_events
from stream_scorer.example.rides import FEATURES, load_ride_schema
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.features import FeatureBuilder

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "deploy" / "config" / "rides.yaml"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_scorer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_two_workers_score_the_example_stream_with_every_malformed_kind_dead_lettered(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    model_dir = tmp_path / "model"
    trained = _cli("train", "--out", str(model_dir), "--rows", "5000", "--trees", "30")
    _out, err = trained.communicate(timeout=120)
    assert trained.returncode == 0, err
    topic, preds_topic, dlq, group = unique("rides"), unique("preds"), unique("dlq"), unique("grp")
    make_topics({topic: 4, preds_topic: 4, dlq: 1})
    report = produce_events(kafka_bootstrap, topic, 4000, malformed_fraction=0.02, seed=77)
    assert sum(report.malformed_by_kind.values()) == 80
    env = {
        "STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAM_SCORER_INPUT__TOPIC": topic,
        "STREAM_SCORER_INPUT__GROUP_ID": group,
        "STREAM_SCORER_OUTPUT__TOPIC": preds_topic,
        "STREAM_SCORER_DEAD_LETTER__TOPIC": dlq,
        "STREAM_SCORER_MODEL__PATH": str(model_dir),
        "STREAM_SCORER_METRICS__PORT": "0",
    }
    workers = [
        _cli("run", "--config", str(CONFIG), "--worker-id", f"w{i}", env=env) for i in range(2)
    ]
    try:
        wait_for(
            lambda: sum(committed_lag(kafka_bootstrap, group, topic).values()) == 0,
            120,
            "the workers did not commit every event",
        )
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
    reports = []
    for w in workers:
        out, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["consumed"] for r in reports) >= 4000

    inputs = {m.key(): m for m in read_topic(kafka_bootstrap, topic)}
    predictions = read_topic(kafka_bootstrap, preds_topic)
    dead = read_topic(kafka_bootstrap, dlq)
    assert len(predictions) == report.valid
    assert sorted(m.key() for m in dead) == sorted(report.malformed_keys)
    by_reason = Counter(
        (
            dict(m.headers())[hdr.CONNECT_STAGE].decode(),
            dict(m.headers())[hdr.REASON].decode(),
        )
        for m in dead
    )
    assert by_reason == {
        (stage.value, reason): n
        for (stage, reason), n in expected_reasons(report.malformed_by_kind).items()
    }
    assert len(by_reason) >= 12
    for msg in dead:
        assert msg.value() == inputs[msg.key()].value()  # byte for byte

    # every prediction equals the model's own on the same event's features
    ride_schema = load_ride_schema()
    pred_schema = load_schema(ROOT / "schemas" / "prediction.v1.avsc")
    decoded = [read_record(pred_schema, m.value()) for m in predictions]
    events = [read_record(ride_schema, inputs[m.key()].value()) for m in predictions]
    matrix, rejected = FeatureBuilder(FEATURES).build(events)
    assert rejected == []
    expected = xgb.Booster(model_file=str(model_dir / "model.ubj")).inplace_predict(matrix)
    np.testing.assert_allclose([d["prediction"] for d in decoded], expected, rtol=1e-6)
    assert [d["input_id"] for d in decoded] == [e["ride_id"] for e in events]
    assert [d["event_time"] for d in decoded] == [e["requested_at"] for e in events]


def test_demo_balances_its_books() -> None:
    # both ports reserved: --port + 1 (the controller's default) may be another process's
    port, controller = free_ports(2)
    demo = _cli(
        "demo", "--events", "5000", "--port", str(port), "--controller-port", str(controller),
        "--paced-rate", "400", "--paced-seconds", "2",
    )  # fmt: skip
    out, err = demo.communicate(timeout=300)
    assert demo.returncode == 0, out + err
    assert re.search(r"paced events\s+800 at", out)
    assert re.search(r"predictions \+ dead\s+5,800", out)
    assert re.search(r"drain rate\s+[\d,]+ events/s \(backlog of 5,000", out)
    assert re.search(r"end-to-end latency\s+p50 \d+ ms, p99 \d+ ms at the paced load", out)
    assert re.search(r"dead letters\s+25 by reason", out)
    assert re.search(r"remaining lag\s+0", out)
    assert "broker stopped" in out
