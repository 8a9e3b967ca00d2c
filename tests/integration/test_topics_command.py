"""``stream-scorer topics create`` on a real broker: the configuration's three topics."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from confluent_kafka.admin import AdminClient

from stream_scorer.contracts import PREDICTION_SCHEMA_V1

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, bootstrap: str, topics: tuple[str, str, str]) -> Path:
    (tmp_path / "model").mkdir()
    raw = {
        "kafka": {"bootstrap_servers": bootstrap},
        "input": {
            "topic": topics[0],
            "group_id": "g",
            "schema": str(PREDICTION_SCHEMA_V1),
            "id_field": "input_id",
        },
        "output": {"topic": topics[1], "schema": str(PREDICTION_SCHEMA_V1)},
        "dead_letter": {"topic": topics[2]},
        "model": {"path": "model"},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _create(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_scorer", "topics", "create", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def _states(stdout: str) -> list[str]:
    """``created`` or ``already there`` from each line ``name: STATE, N partitions (at B)``."""
    return [line.split(": ", 1)[1].split(",")[0] for line in stdout.splitlines()]


def _partitions(bootstrap: str, names: tuple[str, ...]) -> dict[str, int]:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
    return {n: len(meta[n].partitions) for n in names if n in meta}


def test_topics_create_makes_the_three_topics_once(
    tmp_path: Path, kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    names = (unique("in"), unique("out"), unique("dlq"))
    config = _config(tmp_path, kafka_bootstrap, names)
    first = _create(config, "--partitions", "3")
    assert first.returncode == 0, first.stderr
    assert _partitions(kafka_bootstrap, names) == {names[0]: 3, names[1]: 3, names[2]: 1}
    again = _create(config, "--partitions", "3")  # idempotent
    assert again.returncode == 0, again.stderr
    assert _states(first.stdout) == ["created"] * 3
    assert _states(again.stdout) == ["already there"] * 3
    other = _create(config, "--partitions", "5")  # an existing topic keeps its partitions
    assert other.returncode == 1
    assert "exists with 3 partitions, 5 asked" in other.stderr
    bad = _create(config, "--partitions", "0")
    assert bad.returncode == 2 and "--partitions" in bad.stderr


def test_topics_create_takes_the_brokers_from_the_command_line(
    tmp_path: Path, kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    names = (unique("in"), unique("out"), unique("dlq"))
    config = _config(tmp_path, "127.0.0.1:1", names)  # the file's address: nothing there
    done = _create(config, "--bootstrap-servers", kafka_bootstrap, "--partitions", "2")
    assert done.returncode == 0, done.stderr
    assert _partitions(kafka_bootstrap, names) == {names[0]: 2, names[1]: 2, names[2]: 1}
    assert done.stdout.splitlines()[0] == (
        f"{names[0]}: created, 2 partitions (at {kafka_bootstrap})"
    )
