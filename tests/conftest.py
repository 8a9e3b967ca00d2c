"""Fixtures shared by the tests: a real Kafka broker for the session, unique names, topics."""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from stream_scorer.errors import StreamScorerError


def _docker_answers() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _free_port_pair() -> int:
    """Return a port p such that p and p + 1 are both free on loopback."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real broker: $KAFKA_BOOTSTRAP_SERVERS, else testcontainers, else a local broker.

    When none can be had, tests that need Kafka fail; they never skip.
    """
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1") as container:
            yield container.get_bootstrap_server()
        return
    from stream_scorer.localkafka import LocalKafka

    broker = LocalKafka(tmp_path_factory.mktemp("kafka"), port=_free_port_pair())
    try:
        bootstrap = broker.start(timeout=90)
    except StreamScorerError as exc:
        broker.stop()
        pytest.fail(f"no Kafka broker could be started for the integration tests: {exc}")
    try:
        yield bootstrap
    finally:
        broker.stop()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Return a function making names unique to this test (topics, groups)."""
    run = uuid.uuid4().hex[:8]
    return lambda prefix: f"{prefix}-{run}"


@pytest.fixture
def make_topics(kafka_bootstrap: str) -> Callable[[dict[str, int]], None]:
    """Return a function creating topics (name to partition count) on the test broker."""
    from stream_scorer.topics import ensure_topics

    return lambda topics: ensure_topics(kafka_bootstrap, topics)
