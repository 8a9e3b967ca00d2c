"""The health and logging configuration sections, ``run --workers`` and ``lag`` argument errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import PAYMENT_SCHEMA, train_payment_classifier, write_schema

from stream_scorer.config import load_config
from stream_scorer.errors import ConfigError
from stream_scorer.ops.rewind import parse_duration

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("ops-cli")
    train_payment_classifier(tmp / "model")
    raw: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": str(write_schema(tmp / "in.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
        },
        "output": {"topic": "out", "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp / "model")},
        "metrics": {"port": 0},
    }
    path = tmp / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_environment_overrides(config: Path) -> None:
    cfg = load_config(config, environ={})
    assert (cfg.health.liveness_timeout_s, cfg.health.stall_timeout_s) == (60.0, 60.0)
    assert (cfg.logging.format, cfg.logging.level) == ("auto", "INFO")
    cfg = load_config(
        config,
        environ={
            "STREAM_SCORER_HEALTH__STALL_TIMEOUT_S": "7.5",
            "STREAM_SCORER_LOGGING__FORMAT": "json",
        },
    )
    assert cfg.health.stall_timeout_s == 7.5
    assert cfg.logging.format == "json"


@pytest.mark.parametrize(
    ("over", "key"),
    [
        ({"health": {"stall_timeout_s": 0}}, "health.stall_timeout_s"),
        ({"health": {"liveness_timeout_s": -1}}, "health.liveness_timeout_s"),
        ({"health": {"stall": 1}}, "health.stall"),
        ({"logging": {"format": "xml"}}, "logging.format"),
        ({"logging": {"level": "loud"}}, "logging.level"),
    ],
)
def test_bad_values_are_refused_naming_the_key(
    config: Path, over: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config, environ={}, overrides=over)
    assert err.value.field == key


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "stream_scorer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_workers_must_be_positive(config: Path) -> None:
    result = _run("run", "--config", str(config), "--workers", "0")
    assert result.returncode == 2
    event = json.loads(result.stderr.strip().splitlines()[-1])  # stderr is a pipe: JSON
    assert event["level"] == "ERROR"
    assert "--workers: must be at least 1" in event["msg"]


def test_lag_needs_brokers_and_a_group(config: Path) -> None:
    result = _run("lag", "--group", "g")
    assert result.returncode == 2
    assert "give --bootstrap-servers or --config" in result.stderr
    result = _run("lag", "--bootstrap-servers", "127.0.0.1:1")
    assert result.returncode == 2
    assert "give --group or --config" in result.stderr


def test_text_logs_when_asked(config: Path) -> None:
    result = _run(
        "run",
        "--config",
        str(config),
        "--workers",
        "0",
        env={"STREAM_SCORER_LOGGING__FORMAT": "text"},
    )
    assert result.returncode == 2
    assert not result.stderr.lstrip().startswith("{")


@pytest.mark.parametrize("topic", [[], ["--topic", "t"]])
def test_lag_against_no_broker_fails_cleanly(topic: list[str]) -> None:
    result = _run(
        "lag", "--group", "g", "--bootstrap-servers", "127.0.0.1:1", "--timeout", "2", *topic
    )
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stderr.splitlines()]  # all JSON, librdkafka too
    assert events[-1]["level"] == "ERROR"
    assert events[-1]["msg"].startswith("BrokerError: ")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("by", ["", "15", "2x", "1h-3m", "m"])
def test_rewind_refuses_a_bad_duration_before_connecting(by: str) -> None:
    with pytest.raises(ConfigError, match="--by: not a duration"):
        parse_duration(by)


@pytest.mark.parametrize(
    ("by", "seconds"), [("90s", 90), ("15m", 900), ("1h30m", 5400), ("1d", 86400), ("500ms", 0.5)]
)
def test_rewind_durations(by: str, seconds: float) -> None:
    assert parse_duration(by) == seconds


def test_rewind_needs_a_time_and_only_one() -> None:
    for args in (["--group", "g"], ["--group", "g", "--to", "0", "--by", "1h"]):
        proc = subprocess.run(
            [sys.executable, "-m", "stream_scorer", "rewind", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2 and "--to" in proc.stderr, proc.stderr
