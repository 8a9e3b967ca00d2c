"""The local development broker: start, status, no duplicate start, stop, clear errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from stream_scorer.errors import LocalKafkaError
from stream_scorer.localkafka import LocalKafka, default_cache_dir
from stream_scorer.topics import ensure_topics

pytestmark = pytest.mark.integration


def _port_pair() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port


def test_start_status_second_start_and_stop(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "k", port=_port_pair())
    bootstrap = broker.start()
    try:
        status = broker.status()
        assert status is not None and status.running and status.answering
        assert (
            LocalKafka(tmp_path / "k", port=broker.port).start() == bootstrap
        )  # reported, not doubled
        status_again = broker.status()
        assert status_again is not None and status_again.pid == status.pid

        ensure_topics(bootstrap, {"hello": 3})
        ensure_topics(bootstrap, {"hello": 3})  # existing is fine
        producer = Producer({"bootstrap.servers": bootstrap})
        producer.produce("hello", value=b"world", key=b"k", partition=2)
        assert producer.flush(30) == 0
        consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": "t", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe(["hello"])
        got = None
        for _ in range(60):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                got = msg
                break
        consumer.close()
        assert got is not None and got.value() == b"world" and got.partition() == 2
    finally:
        assert broker.stop() is True
    assert broker.status() is None
    with pytest.raises(ProcessLookupError):
        os.kill(status.pid, 0)
    assert broker.stop() is False  # nothing left to stop


def test_taken_port_is_reported_with_what_to_do(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(LocalKafkaError, match=f"port {port} on 127.0.0.1 is taken.*--port"):
            LocalKafka(tmp_path / "k", port=port).start()


def test_missing_java_is_reported_with_what_to_install(tmp_path: Path) -> None:
    env = {
        "PATH": str(Path(sys.executable).parent),  # python, but no java and no mvn
        "STREAM_SCORER_CACHE": str(tmp_path / "empty-cache"),
        "HOME": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "local-kafka", "fetch"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Java 17 or newer is needed" in result.stderr
    assert "apt-get install openjdk-17-jre-headless" in result.stderr
    assert default_cache_dir() != tmp_path / "empty-cache"  # the real cache was not touched
