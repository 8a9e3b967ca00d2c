"""Fixtures shared by the tests: a real Kafka broker for the session, unique names, topics.

The broker comes from, in order: ``$KAFKA_BOOTSTRAP_SERVERS``; a container of the official
``apache/kafka`` image when a Docker engine answers; a local broker from Maven jars
(``stream_scorer.devtools.localkafka``). When none can be had, tests that need Kafka fail:
they never skip.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import free_ports, unavailable, wait_for

from stream_scorer.devtools.localkafka import broker_answers
from stream_scorer.devtools.localpostgres import LocalPostgres
from stream_scorer.devtools.localregistry import LocalRegistry
from stream_scorer.errors import StreamScorerError

KAFKA_IMAGE = "apache/kafka:4.3.2"


def _docker_answers() -> bool:
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):  # no client, or an engine that hangs
        return False
    return done.returncode == 0


def _wait_answering(bootstrap: str, timeout: float) -> None:
    wait_for(broker_answers({"bootstrap.servers": bootstrap}), timeout, f"{bootstrap} answering")


def _container_broker() -> Iterator[str]:
    """A broker in an ``apache/kafka`` container (KRaft, one node).

    testcontainers' own Kafka module drives Confluent's cp-kafka images only (it runs their
    ``/etc/confluent/docker`` scripts) and ``testcontainers.kafka`` is deprecated, so the
    official image is configured here through its documented environment variables. The
    advertised port must be the host's, hence a fixed binding to a port found free.
    """
    try:
        from testcontainers.core.container import DockerContainer
    except ImportError as exc:
        pytest.fail(f"a Docker engine answers but testcontainers is not installed: {exc}")
    (port,) = free_ports(1)
    container = (
        DockerContainer(KAFKA_IMAGE)
        .with_bind_ports(port, port)
        .with_envs(
            KAFKA_NODE_ID="1",
            KAFKA_PROCESS_ROLES="broker,controller",
            KAFKA_LISTENERS=f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://0.0.0.0:9093",
            KAFKA_ADVERTISED_LISTENERS=f"PLAINTEXT://127.0.0.1:{port}",
            KAFKA_CONTROLLER_LISTENER_NAMES="CONTROLLER",
            KAFKA_LISTENER_SECURITY_PROTOCOL_MAP="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            KAFKA_INTER_BROKER_LISTENER_NAME="PLAINTEXT",
            KAFKA_CONTROLLER_QUORUM_VOTERS="1@localhost:9093",
            KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
            KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS="4",
            KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
            KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
            KAFKA_TRANSACTION_STATE_LOG_NUM_PARTITIONS="4",
            KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS="0",
            KAFKA_AUTO_CREATE_TOPICS_ENABLE="false",
        )
    )
    bootstrap = f"127.0.0.1:{port}"
    with warnings.catch_warnings():  # a third party's deprecations must not fail the session
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            container.start()
            _wait_answering(bootstrap, timeout=120)
        except Exception as exc:
            with contextlib.suppress(Exception):
                container.stop()
            pytest.fail(f"a Docker engine answers but {KAFKA_IMAGE} did not start: {exc}")
    try:
        yield bootstrap
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            container.stop()


UNIT_DIR = Path(__file__).parent / "unit"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/unit ``unit``, so each tier runs alone (``make unit``)."""
    for item in items:
        if item.path.is_relative_to(UNIT_DIR):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real broker: $KAFKA_BOOTSTRAP_SERVERS, else a container, else a local broker.

    When none can be had, the tests that need Kafka fail; they never skip.
    """
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        yield os.environ["KAFKA_BOOTSTRAP_SERVERS"]
        return
    if _docker_answers():
        yield from _container_broker()
        return
    from stream_scorer.devtools.localkafka import LocalKafka

    port, controller_port = free_ports(2)
    broker = LocalKafka(
        tmp_path_factory.mktemp("kafka"), port=port, controller_port=controller_port
    )
    try:
        bootstrap = broker.start(timeout=120)
    except StreamScorerError as exc:
        broker.stop()
        pytest.fail(
            "no Kafka broker for the integration tests: $KAFKA_BOOTSTRAP_SERVERS is unset, no "
            f"Docker engine answers, and the local broker could not start: {exc}"
        )
    try:
        yield bootstrap
    finally:
        broker.stop()


def start_local_registry(state_dir: Path, port: int = 0) -> tuple[LocalRegistry, str]:
    """Start a local Apicurio registry on loopback (free ports unless ``port``); fail, never
    skip, if it cannot start."""
    free, management = free_ports(2)
    registry = LocalRegistry(state_dir, port=port or free, management_port=management)
    try:
        url = registry.start(timeout=120)
    except StreamScorerError as exc:
        registry.stop()
        pytest.fail(
            "no Schema Registry for the integration tests: $SCHEMA_REGISTRY_URL is unset and "
            f"the local registry (stream-scorer local-registry) could not start: {exc}"
        )
    return registry, url


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Schema Registry's Confluent-compatible URL: $SCHEMA_REGISTRY_URL, else a local one.

    When none can be had, the tests that need it fail; they never skip.
    """
    if os.environ.get("SCHEMA_REGISTRY_URL"):
        yield os.environ["SCHEMA_REGISTRY_URL"]
        return
    registry, url = start_local_registry(tmp_path_factory.mktemp("registry"))
    try:
        yield url
    finally:
        registry.stop()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """A real PostgreSQL server (the system's binaries, ``local-postgres``) on a free port.

    Its cluster is removed at the end of the session. When it cannot start, the tests that
    need it fail; they never skip.
    """
    (port,) = free_ports(1)
    server = LocalPostgres(tmp_path_factory.mktemp("postgres"), port=port)
    try:
        server.start()
    except StreamScorerError as exc:
        server.destroy()
        pytest.fail(
            "no PostgreSQL for the integration tests: the local server (stream-scorer "
            f"local-postgres, `make setup` installs the packages) could not start: {exc}"
        )
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def unique() -> Callable[[str], str]:
    """Return ``unique(prefix)``: a topic or group name no other test or call uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_topics(kafka_bootstrap: str) -> Callable[[dict[str, int]], None]:
    """Return a function creating topics (name to partition count) on the test broker."""
    from stream_scorer.kafka.topics import ensure_topics

    def make(topics: dict[str, int]) -> None:
        ensure_topics(kafka_bootstrap, topics)

    return make


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server per module (`make mlflow-tools`); fails under CI if absent."""
    from mlflow_server import mlflow_server

    from stream_scorer.errors import LocalMlflowError

    try:
        with mlflow_server(tmp_path_factory.mktemp("mlflow"), free_ports(1)[0]) as uri:
            yield uri
    except LocalMlflowError as exc:
        unavailable(f"no MLflow server ({exc}); `make mlflow-tools` installs one")
