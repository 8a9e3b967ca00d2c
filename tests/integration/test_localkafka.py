"""The local development broker and topic creation, against real brokers.

Start, status, no second broker on a second start, a message through it, stop, restart over a
stale state file; clear errors for taken ports, missing or old Java, missing or failing Maven;
``ensure_topics`` on the session broker.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from support import free_ports

from stream_scorer.devtools.localkafka import KAFKA_VERSION, LocalKafka, fetch_jars
from stream_scorer.errors import BrokerError, LocalKafkaError
from stream_scorer.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


def brokers_of(state_dir: Path) -> list[int]:
    """Pids of every ``kafka.Kafka`` process running on ``state_dir``'s server.properties."""
    props = os.fsencode(state_dir.resolve() / "server.properties")
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kafka.Kafka" in args and props in args:
            pids.append(int(proc.name))
    return pids


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def consume_one(bootstrap: str, topic: str, group: str, timeout: float = 30.0) -> bytes | None:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                value = msg.value()
                return value if isinstance(value, bytes) else None
        return None
    finally:
        consumer.close()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[LocalKafka]:
    port, controller_port = free_ports(2)
    kafka = LocalKafka(tmp_path / "broker", port=port, controller_port=controller_port)
    try:
        yield kafka
    finally:
        kafka.stop()  # whatever the test did, no broker outlives it


def test_start_status_second_start_message_stop_restart(
    broker: LocalKafka, unique: Callable[[str], str]
) -> None:
    bootstrap = broker.start()
    assert bootstrap == f"127.0.0.1:{broker.port}"

    status = broker.status()
    assert status is not None
    assert (status.address, status.running, status.answering) == (bootstrap, True, True)
    assert brokers_of(broker.state_dir) == [status.pid]
    state = json.loads((broker.state_dir / "state.json").read_text())
    assert state["pid"] == status.pid and state["controller_port"] == broker.controller_port

    # A second start, from another object as another command would do, reuses the broker.
    said: list[str] = []
    again = LocalKafka(broker.state_dir, port=broker.port, log=said.append)
    assert again.start() == bootstrap
    assert any("already running at " + bootstrap in line for line in said)
    assert brokers_of(broker.state_dir) == [status.pid]

    topic = unique("hello")
    ensure_topics(bootstrap, {topic: 1})
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"world")
    assert producer.flush(30) == 0
    assert consume_one(bootstrap, topic, unique("grp")) == b"world"

    assert broker.stop() is True
    assert broker.status() is None
    assert gone(status.pid)
    assert brokers_of(broker.state_dir) == []
    assert broker.stop() is False  # nothing left: safe

    # A state file left by a dead broker is stale, not a running broker; restarting reuses
    # the formatted data directory, so the message is still there.
    (broker.state_dir / "state.json").write_text(json.dumps(state))
    stale = broker.status()
    assert stale is not None and not stale.running and not stale.answering
    assert broker.start() == bootstrap
    restarted = broker.status()
    assert restarted is not None and restarted.running and restarted.pid != status.pid
    assert consume_one(bootstrap, topic, unique("grp")) == b"world"
    assert broker.stop() is True
    assert gone(restarted.pid)


@pytest.mark.parametrize("which", ["client", "controller"])
def test_taken_port_is_named_with_what_to_do(tmp_path: Path, which: str) -> None:
    port, controller_port = free_ports(2)
    taken = port if which == "client" else controller_port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        kafka = LocalKafka(tmp_path / "k", port=port, controller_port=controller_port)
        with pytest.raises(LocalKafkaError, match=f"port {taken} .*{which}.*--port") as info:
            kafka.start()
    assert "stop that process" in str(info.value)
    assert kafka.status() is None
    assert brokers_of(tmp_path / "k") == []


def test_ensure_topics_creates_waits_and_is_idempotent(
    kafka_bootstrap: str, unique: Callable[[str], str]
) -> None:
    topic = unique("three")
    ensure_topics(kafka_bootstrap, {topic: 3})
    meta = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(topic, timeout=10)
    partitions = meta.topics[topic].partitions
    assert sorted(partitions) == [0, 1, 2]
    assert all(p.leader >= 0 for p in partitions.values())

    ensure_topics(kafka_bootstrap, {topic: 3})  # already there: fine
    with pytest.raises(BrokerError, match="exists with 3 partitions, 5 asked") as info:
        ensure_topics(kafka_bootstrap, {topic: 5})
    assert info.value.topic == topic


def fake_tool(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_missing_java_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LocalKafkaError, match="Java 17 or newer is needed") as info:
        fetch_jars(tmp_path / "cache", log=lambda _: None)
    assert "apt-get install openjdk-17-jre-headless" in str(info.value)
    assert not (tmp_path / "cache").exists()


def test_old_java_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tool(tmp_path / "bin", "java", "echo 'openjdk version \"11.0.22\" 2024-01-16' >&2\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(LocalKafkaError, match=r"Java 17 or newer.*is Java 11.*openjdk-17"):
        fetch_jars(tmp_path / "cache", log=lambda _: None)


def test_missing_and_failing_maven_are_explained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_tool(tmp_path / "bin", "java", "echo 'openjdk version \"17.0.15\" 2025-04-15' >&2\n")
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(LocalKafkaError, match=r"Maven is needed.*apt-get install maven"):
        fetch_jars(tmp_path / "cache", log=lambda _: None)

    fake_tool(
        tmp_path / "bin",
        "mvn",
        "echo '[ERROR] Could not transfer artifact: repo.maven.apache.org: Unknown host'\nexit 1\n",
    )
    with pytest.raises(LocalKafkaError) as info:
        fetch_jars(tmp_path / "cache", log=lambda _: None)
    message = str(info.value)
    assert "Unknown host" in message and "~/.m2/settings.xml" in message
    libs = tmp_path / "cache" / f"kafka-{KAFKA_VERSION}"
    assert [p.name for p in libs.iterdir()] == []  # no half download left to look complete


def test_the_start_up_acl_check_on_a_fresh_plaintext_broker_warns_nothing(
    broker: LocalKafka, caplog: pytest.LogCaptureFixture
) -> None:
    """The first group request of a fresh broker gets NOT_COORDINATOR: it is retried."""
    from stream_scorer.kafka.access import Grant, check_access

    bootstrap = broker.start()
    ensure_topics(bootstrap, {"in": 1, "out": 1})  # what `topics create` does before a run
    grants = [Grant("topic", "in", "read"), Grant("topic", "out", "write")]
    grants.append(Grant("group", "fresh-group", "member"))
    with caplog.at_level("WARNING", logger="stream_scorer"):
        check_access({"bootstrap.servers": bootstrap}, grants, timeout_s=30)
    # The check says what it says through stream_scorer's loggers (its admin client has no
    # Python logger). Lines of other clients of this test process (librdkafka.*: a summary of
    # an earlier test's repeats comes on a timer) are not the check's.
    said = [r for r in caplog.records if r.name.partition(".")[0] == "stream_scorer"]
    assert [r.getMessage() for r in said if r.levelname != "INFO"] == []
