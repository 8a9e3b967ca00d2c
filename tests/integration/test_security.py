"""A worker against a secured broker: SASL_SSL (SCRAM-SHA-512), TLS, least-privilege ACLs.

One secured local broker for the module (``LocalKafka(secure=True)``). The worker runs as the
``worker`` user with exactly the ACLs ``stream-scorer acl grant --role worker`` gives (or that
minus one right), as a process of its own: what an operator sees is its exit code and its log.
Every run's output (logs, the JSON report, the metrics) is searched for the password.
"""

from __future__ import annotations

import json
import os
import subprocess
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    PAYMENT_SCHEMA,
    avro,
    free_ports,
    payments,
    produce_raw,
    read_record,
    rsa_pair,
    train_payment_classifier,
    wait_for,
    write_schema,
)

from stream_scorer.clients import read_to_end
from stream_scorer.config import load_config
from stream_scorer.devtools.localkafka import LocalKafka
from stream_scorer.errors import AccessDeniedError
from stream_scorer.headers import REASON
from stream_scorer.kafka.access import Grant, role_grants
from stream_scorer.kafka.topics import ensure_topics
from stream_scorer.ops.grant import grant
from stream_scorer.registry import RegistryClient
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.records import Reason
from stream_scorer.worker.loop import run_worker
from stream_scorer.worker.supervisor import run_command

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
#: No test may pass by waiting for this: refusals must be seen, not timed out.
UNREACHABLE_S = 600
EXIT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """``stream-scorer local-kafka start --secure``, as a user runs it."""
    port, cport = free_ports(2)
    state = tmp_path_factory.mktemp("secure-kafka")
    kafka = LocalKafka(state, port, cport, secure=True)
    command = [*run_command(state)[:3], "local-kafka", "start", "--secure"]
    command += ["--port", str(port), "--controller-port", str(cport), "--dir", str(state)]
    try:
        started = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired as exc:
        kafka.stop()
        pytest.fail(f"the secured local broker did not start within 180 s: {exc}")
    if started.returncode != 0:
        kafka.stop()
        pytest.fail(f"the secured local broker could not start:\n{started.stdout}{started.stderr}")
    try:
        # it prints the address, the CA and each user's client settings, never a password
        assert started.stdout.splitlines()[0] == kafka.bootstrap
        for path in (kafka.ca_file, kafka.client_file("worker"), kafka.client_file("admin")):
            assert str(path) in started.stdout
        for user in ("admin", "worker", "tools"):
            assert kafka.password_file(user).read_text().strip() not in started.stdout
            assert kafka.password_file(user).stat().st_mode & 0o077 == 0
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fraud-model")
    train_payment_classifier(path, threshold=0.3)
    return path


@dataclass(frozen=True)
class Deployment:
    broker: LocalKafka
    config: Path
    topic: str
    out: str
    dlq: str
    group: str
    mode: str

    @property
    def admin(self) -> dict[str, str]:
        return self.broker.client_settings("admin")

    @property
    def password(self) -> str:
        return self.broker.password_file("worker").read_text().strip()


def _deployment(
    broker: LocalKafka, folder: Path, model_dir: Path, mode: str, client: dict[str, Any]
) -> Deployment:
    tag = uuid.uuid4().hex[:8]
    topic, out, dlq, group = f"pay-{tag}", f"scores-{tag}", f"dlq-{tag}", f"grp-{tag}"
    admin = broker.client_settings("admin")
    ensure_topics(broker.bootstrap, {topic: 2, out: 2, dlq: 1}, client=admin)
    raw = {
        "kafka": {"unreachable_timeout_s": UNREACHABLE_S, **client},
        "input": {
            "topic": topic,
            "group_id": group,
            "schema": str(write_schema(folder / "payment.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
        },
        "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": dlq},
        "model": {"path": str(model_dir)},
        "delivery": {"mode": mode, "transaction_timeout_s": 20},
        "metrics": {"port": 0},
        "logging": {"format": "json"},
        "worker": {"id": f"w-{tag}"},
    }
    config = folder / "worker.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Deployment(broker, config, topic, out, dlq, group, mode)


def _worker_client(broker: LocalKafka) -> dict[str, Any]:
    """The worker user's ``kafka`` table, as ``local-kafka start --secure`` writes it."""
    table: dict[str, Any] = yaml.safe_load(broker.client_file("worker").read_text())["kafka"]
    return table


@pytest.fixture(params=["at-least-once", "exactly-once"])
def deployment(
    request: pytest.FixtureRequest, broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> Deployment:
    return _deployment(broker, tmp_path, model_dir, request.param, _worker_client(broker))


def _grant(dep: Deployment, change: Callable[[list[Grant]], list[Grant]] = lambda g: g) -> None:
    """Grant User:worker the worker role (changed by ``change``) with the admin's client."""
    grants = change(role_grants(load_config(dep.config, environ={}), "worker"))
    grant(dep.admin, grants, "User:worker")


def _produce(dep: Deployment, good: int, poison_at: int | None = None) -> int:
    recs = payments(good, seed=3)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    if poison_at is not None:
        items.insert(poison_at, (b"poison", b"\x00\x01"))
    produce_raw(dep.broker.bootstrap, dep.topic, items, 1, settings=dep.admin)
    return len(items)


def _run(
    dep: Deployment, *extra: str, port: int | None = None, log_level: str | None = None
) -> subprocess.Popen[str]:
    args = [*extra, *(["--metrics-port", str(port)] if port else [])]
    return subprocess.Popen(
        run_command(dep.config, *args, log_level=log_level),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the worker did not stop within {EXIT_TIMEOUT_S} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _read(dep: Deployment, topic: str) -> list[Any]:
    got: list[Any] = []
    read_to_end(dep.broker.bootstrap, topic, got.append, settings=dep.admin)
    return got


def _committed(dep: Deployment) -> dict[int, int]:
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({**dep.admin, "group.id": dep.group, "enable.auto.commit": "false"})
    try:
        parts = [TopicPartition(dep.topic, p) for p in range(2)]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=20)}
    finally:
        consumer.close()


def _errors(stderr: str) -> list[str]:
    """The ERROR lines of a worker's JSON log."""
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e["msg"] for e in lines if e.get("level") == "ERROR"]


def _assert_refused(
    dep: Deployment, proc: subprocess.Popen[str], *expected: str, exit_code: int = 1
) -> str:
    """``exit_code``, one ERROR line holding ``expected``, no password anywhere; returns it."""
    code, out, err = _finish(proc)
    errors = _errors(err)
    assert code == exit_code, err[-3000:]
    assert len(errors) == 1, "\n".join(errors)
    for text in expected:
        assert text in errors[0], errors[0]
    assert dep.password not in out + err
    return errors[0]


# --- the worker with least privilege --------------------------------------------------------


def _acl_grant_worker(dep: Deployment) -> subprocess.CompletedProcess[str]:
    """``stream-scorer acl grant --role worker`` for User:worker, as an operator runs it."""
    granted = subprocess.run(
        [*run_command(dep.config)[:3], "acl", "grant", "--config", str(dep.config),
         "--admin-config", str(dep.broker.client_file("admin")),
         "--principal", "User:worker", "--role", "worker"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert granted.returncode == 0, granted.stderr[-2000:]
    return granted


def test_worker_with_least_privilege_scores_a_stream_end_to_end(deployment: Deployment) -> None:
    dep = deployment
    granted = _acl_grant_worker(dep)
    expected = 6 if dep.mode == "exactly-once" else 5
    assert granted.stdout.count("ALLOW User:worker ") == expected, granted.stdout
    total = _produce(dep, 400, poison_at=123)
    (port,) = free_ports(1)
    proc = _run(dep, "--idle-timeout", "3", port=port)
    scraped: list[str] = []

    def scored() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return proc.poll() is not None  # not serving yet (or gone: the asserts say why)
        scraped[:] = [text]
        return "stream_scorer_predictions_produced_total 400.0" in text

    wait_for(scored, 120, "400 predictions in the worker's metrics")
    code, out, err = _finish(proc)
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["consumed"] == total and report["predictions"] == 400
    assert len(_read(dep, dep.out)) == 400
    dead = _read(dep, dep.dlq)
    assert [m.value() for m in dead] == [b"\x00\x01"]
    assert _committed(dep)[0] == total  # everything went to partition 0
    for text in (out, err, *scraped):
        assert dep.password not in text


def test_least_privilege_worker_reads_and_writes_the_confluent_format(
    broker: LocalKafka, tmp_path: Path, model_dir: Path, schema_registry: str
) -> None:
    """The secured broker with the Schema Registry: framed in, framed out, least privilege."""
    dep = _deployment(broker, tmp_path, model_dir, "exactly-once", _worker_client(broker))
    raw = yaml.safe_load(dep.config.read_text())
    raw["input"]["format"] = raw["output"]["format"] = "confluent"
    raw["registry"] = {"url": schema_registry}
    dep.config.write_text(yaml.safe_dump(raw))
    _grant(dep)
    schema_id = RegistryClient(schema_registry).register(
        f"{dep.topic}-value", json.dumps(PAYMENT_SCHEMA)
    )
    frame = b"\x00" + schema_id.to_bytes(4, "big")
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), frame + avro(PAYMENT_SCHEMA, r)) for r in payments(200, seed=5)
    ]
    items.insert(50, (b"unframed", b"\x07not a frame"))
    produce_raw(dep.broker.bootstrap, dep.topic, items, 1, settings=dep.admin)
    code, out, err = _finish(_run(dep, "--idle-timeout", "3"))
    assert code == 0, err[-3000:]
    predictions = _read(dep, dep.out)
    assert len(predictions) == 200
    out_id = RegistryClient(schema_registry).lookup(
        f"{dep.out}-value",
        json.dumps(json.loads((ROOT / "schemas" / "prediction.v1.avsc").read_text())),
    )
    assert {m.value()[:5] for m in predictions} == {b"\x00" + out_id.to_bytes(4, "big")}
    dead = _read(dep, dep.dlq)
    assert [m.value() for m in dead] == [b"\x07not a frame"]
    assert dict(dead[0].headers())[REASON] == Reason.BAD_MAGIC_BYTE.encode()
    assert dep.password not in out + err


# --- refusals: each stops the worker with exit 1 and one line naming what is missing ---------


def test_wrong_password_stops_at_once_naming_the_user(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    client = _worker_client(broker)
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password-" + uuid.uuid4().hex + "\n")
    client["secret_files"] = {"sasl.password": str(wrong)}
    dep = _deployment(broker, tmp_path, model_dir, "at-least-once", client)
    _grant(dep)
    line = _assert_refused(
        dep, _run(dep), "authentication failed at", "as user 'worker'", "SCRAM-SHA-512"
    )
    assert wrong.read_text().strip() not in line
    # the exception itself, its chain and notes hold no password either
    cfg = load_config(dep.config, environ={})
    with pytest.raises(AccessDeniedError) as caught:
        run_worker(cfg)
    text = "".join(traceback.format_exception(caught.value))
    assert wrong.read_text().strip() not in text and dep.password not in text
    assert _committed(dep) == {0: -1001, 1: -1001}


def test_plaintext_client_against_the_tls_listener_is_refused_at_once(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    dep = _deployment(broker, tmp_path, model_dir, "at-least-once", {})
    raw = yaml.safe_load(dep.config.read_text())
    raw["kafka"]["bootstrap_servers"] = broker.bootstrap
    dep.config.write_text(yaml.safe_dump(raw))
    _assert_refused(
        dep,
        _run(dep),
        "kafka.client.security.protocol: ",
        f"the broker at {broker.bootstrap} speaks TLS",
        "PLAINTEXT",
        exit_code=2,  # the configuration must change
    )


def test_tls_client_without_sasl_against_the_sasl_listener_is_refused_at_once(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    """Not an outage after kafka.unreachable_timeout_s (600 s here): exit 2 saying what to set."""
    client = {
        "bootstrap_servers": broker.bootstrap,
        "client": {"security.protocol": "SSL", "ssl.ca.location": str(broker.ca_file)},
    }
    dep = _deployment(broker, tmp_path, model_dir, "at-least-once", client)
    _assert_refused(
        dep,
        _run(dep),
        "kafka.client.security.protocol: ",
        f"the broker at {broker.bootstrap} requires SASL (SCRAM-SHA-512)",
        "security.protocol to SASL_SSL, sasl.mechanism to SCRAM-SHA-512, sasl.username",
        exit_code=2,
    )


def test_an_untrusted_broker_certificate_is_refused_at_once(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    from stream_scorer.devtools.tls import make_tls

    client = _worker_client(broker)
    client["client"]["ssl.ca.location"] = str(
        make_tls(tmp_path / "other-ca").ca
    )  # not the broker's
    dep = _deployment(broker, tmp_path, model_dir, "at-least-once", client)
    _assert_refused(
        dep, _run(dep), f"TLS handshake with {broker.bootstrap} failed", "certificate verify failed"
    )


def _without(resource: str, name: str) -> Callable[[list[Grant]], list[Grant]]:
    return lambda grants: [g for g in grants if (g.resource, g.name) != (resource, name)]


def test_missing_write_on_the_dead_letter_topic_stops_start_up(deployment: Deployment) -> None:
    dep = deployment

    def describe_only(grants: list[Grant]) -> list[Grant]:
        return [
            replace(g, use="describe") if (g.name, g.use) == (dep.dlq, "write") else g
            for g in grants
        ]

    _grant(dep, describe_only)
    _produce(dep, 50)
    _assert_refused(
        dep,
        _run(dep),
        f"not authorized to write topic {dep.dlq!r} (no WRITE ACL)",
        f"grant WRITE and DESCRIBE on topic {dep.dlq!r} to User:worker",
    )
    assert _read(dep, dep.out) == []
    assert _committed(dep) == {0: -1001, 1: -1001}


def _revoke_dead_letter_acls(dep: Deployment, *operations: str) -> None:
    """Delete User:worker's ALLOW ACL of each operation on the dead-letter topic (one each)."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        AdminClient,
        ResourcePatternType,
        ResourceType,
    )

    admin = AdminClient(dict[str, Any](dep.admin))
    for op in operations:
        revoke = AclBindingFilter(
            ResourceType.TOPIC, dep.dlq, ResourcePatternType.LITERAL, "User:worker", "*",
            AclOperation[op], AclPermissionType.ALLOW,
        )  # fmt: skip
        for future in admin.delete_acls([revoke]).values():
            assert len(future.result(timeout=30)) == 1


def test_write_on_the_dead_letter_topic_revoked_while_running_stops_before_committing_it(
    deployment: Deployment,
) -> None:
    dep = deployment
    _grant(dep)
    _produce(dep, 100)
    proc = _run(dep)
    try:
        wait_for(lambda: len(_read(dep, dep.out)) == 100 or proc.poll() is not None, 120, "100")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        _revoke_dead_letter_acls(dep, "WRITE")
        _produce(dep, 100, poison_at=50)  # offsets 100..200 of partition 0, the poison at 150
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    line = _assert_refused(dep, proc, f"not authorized to write topic {dep.dlq!r}", "User:worker")
    assert "TOPIC_AUTHORIZATION_FAILED" in line
    committed = _committed(dep)
    assert 100 <= committed[0] <= 150, committed  # never past the refused dead letter
    if dep.mode == "exactly-once":
        assert len(_read(dep, dep.out)) == committed[0]


def test_dead_letter_topic_acls_revoked_while_running_refuse_the_produce_itself_by_name(
    deployment: Deployment,
) -> None:
    """WRITE and DESCRIBE revoked: the producer's next metadata refresh learns it, and the next
    dead letter is refused by ``produce()`` itself (not by a delivery report)."""
    dep = deployment
    raw = yaml.safe_load(dep.config.read_text())
    raw["kafka"]["producer"] = {"topic.metadata.refresh.interval.ms": "200"}
    dep.config.write_text(yaml.safe_dump(raw))
    _grant(dep)
    _produce(dep, 100, poison_at=50)  # the producer knows the dead-letter topic from here on
    proc = _run(dep)
    try:
        wait_for(
            lambda: (
                (len(_read(dep, dep.dlq)) == 1 and len(_read(dep, dep.out)) == 100)
                or proc.poll() is not None
            ),
            120,
            "the first dead letter and 100 predictions",
        )
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        _revoke_dead_letter_acls(dep, "WRITE", "DESCRIBE")
        _produce(dep, 100)  # scored while the producer's metadata refreshes (every 200 ms)
        wait_for(lambda: len(_read(dep, dep.out)) == 200 or proc.poll() is not None, 120, "200")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        _produce(dep, 0, poison_at=0)  # offset 201 of partition 0
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    line = _assert_refused(
        dep,
        proc,
        f"not authorized to write topic {dep.dlq!r} (TOPIC_AUTHORIZATION_FAILED): grant WRITE "
        f"and DESCRIBE on topic {dep.dlq!r} to User:worker (stream-scorer acl grant --role worker)",
    )
    assert "cannot produce" not in line
    assert _committed(dep)[0] <= 201  # never past the refused dead letter


def test_missing_read_on_the_group_stops_without_consuming(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    dep = _deployment(broker, tmp_path, model_dir, "at-least-once", _worker_client(broker))
    _grant(dep, _without("group", dep.group))
    _produce(dep, 50)
    _assert_refused(
        dep,
        _run(dep),
        f"not authorized to join group {dep.group!r} (GROUP_AUTHORIZATION_FAILED)",
        f"grant READ on group {dep.group!r} to User:worker",
    )
    assert _read(dep, dep.out) == []
    assert _committed(dep) == {0: -1001, 1: -1001}


def test_missing_transactional_id_acl_stops_exactly_once_before_any_transaction(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    dep = _deployment(broker, tmp_path, model_dir, "exactly-once", _worker_client(broker))
    _grant(dep, lambda grants: [g for g in grants if g.resource != "transactional_id"])
    _produce(dep, 50)
    _assert_refused(
        dep,
        _run(dep),
        "not authorized to use transactional id "
        f"'stream-scorer-{dep.group}-w-{dep.group[4:]}' (TRANSACTIONAL_ID_AUTHORIZATION_FAILED)",
        f"grant WRITE and DESCRIBE on transactional ids prefixed 'stream-scorer-{dep.group}-'",
    )
    assert _read(dep, dep.out) == []
    assert _committed(dep) == {0: -1001, 1: -1001}


# --- private data: encrypted dead letters, replayed only with the private key ----------------


def test_encrypted_dead_letters_are_unreadable_to_the_worker_and_replay_exactly_with_the_key(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    import math

    public_file, private_file = rsa_pair(tmp_path)
    dep = _deployment(broker, tmp_path, model_dir, "at-least-once", _worker_client(broker))
    raw = yaml.safe_load(dep.config.read_text())
    raw["dead_letter"].update(payload="encrypt", public_key=str(public_file))
    dep.config.write_text(yaml.safe_dump(raw))
    _grant(dep)
    recs = payments(40, seed=9)
    secret = dict(recs[0], txn_id="TXN-SECRET-4711", amount=math.inf)  # a non_finite dead letter
    poison: list[tuple[bytes | None, bytes | None]] = [
        (b"KEY-SECRET-1", avro(PAYMENT_SCHEMA, secret)),
        (None, b"\x00VALUE-SECRET-2"),
        (b"KEY-SECRET-3", None),
    ]
    items = [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs] + poison
    produce_raw(broker.bootstrap, dep.topic, items, 1, settings=dep.admin)
    proc = _run(dep, "--max-messages", str(len(items)), log_level="DEBUG")
    code, out, err = _finish(proc)
    assert code == 0, err[-3000:]
    # the most verbose log holds no payload bytes and no field values (record ids included)
    for needle in ("SECRET", "TXN-", *(r["txn_id"] for r in recs[:5])):
        assert needle not in out + err, needle
    dead = _read(dep, dep.dlq)
    assert len(dead) == 3
    for msg in dead:
        blob = (
            (msg.key() or b"")
            + (msg.value() or b"")
            + b"".join(k.encode() + (v or b"") for k, v in msg.headers() or [])
        )
        assert b"SECRET" not in blob and msg.key() is None
        assert dict(msg.headers())["stream_scorer.payload"] == b"encrypted"

    # the tools user with the replay role: without the key, a clear refusal and nothing replayed
    tools = tmp_path / "tools.yaml"
    raw["kafka"] = {**yaml.safe_load(broker.client_file("tools").read_text())["kafka"]}
    tools.write_text(yaml.safe_dump(raw))
    grant(dep.admin, role_grants(load_config(tools, environ={}), "replay"), "User:tools")
    replay = [*run_command(tools)[:3], "dlq", "replay", "--config", str(tools)]
    refused = subprocess.run(replay, capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "is encrypted (key id" in refused.stderr and "--private-key FILE" in refused.stderr
    assert len(_read(dep, dep.topic)) == len(items)
    done = subprocess.run(
        [*replay, "--private-key", str(private_file)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["replayed"] == 3
    replayed = [
        m for m in _read(dep, dep.topic) if "stream_scorer.replay.source" in dict(m.headers() or [])
    ]
    assert sorted(((m.key(), m.value()) for m in replayed), key=repr) == sorted(poison, key=repr)
    # the lag role is enough for `stream-scorer lag`
    grant(dep.admin, role_grants(load_config(tools, environ={}), "lag"), "User:tools")
    lag = subprocess.run(
        [*run_command(tools)[:3], "lag", "--config", str(tools), "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert lag.returncode == 0, lag.stderr[-2000:]
    rows = json.loads(lag.stdout)["partitions"]
    # the 3 replayed records (partitioned by key; transaction markers count) wait for the worker
    assert sum(r["lag_records"] for r in rows) >= 3, rows
    assert all(r["lag_seconds"] is not None for r in rows if r["lag_records"]), lag.stderr


# --- share groups ----------------------------------------------------------------------------


def _share_deployment(broker: LocalKafka, folder: Path, model_dir: Path) -> Deployment:
    """A worker of a share group (reading the backlog from the start), as the worker user."""
    dep = _deployment(broker, folder, model_dir, "at-least-once", _worker_client(broker))
    raw = yaml.safe_load(dep.config.read_text())
    raw["input"].update({"group_type": "share", "auto_offset_reset": "earliest"})
    dep.config.write_text(yaml.safe_dump(raw))
    return dep


def test_share_group_worker_with_the_granted_acls_scores_and_lag_share_reads_it(
    broker: LocalKafka, tmp_path: Path, model_dir: Path
) -> None:
    """``acl grant --role worker`` covers a share group (ALTER_CONFIGS on it for its start
    position and delivery limit); ``lag --share`` reaches the secured broker as the tools user
    through a properties file that is gone afterwards."""
    dep = _share_deployment(broker, tmp_path, model_dir)
    granted = _acl_grant_worker(dep)
    assert granted.stdout.count("ALLOW User:worker ") == 6, granted.stdout
    assert f"ALTER_CONFIGS on group '{dep.group}'" in granted.stdout, granted.stdout
    total = _produce(dep, 60, poison_at=17)
    # stops once it has consumed them all (a share group's first fetch comes seconds after
    # joining: an idle timeout could stop it before)
    code, out, err = _finish(_run(dep, "--max-messages", str(total)))
    assert code == 0, err[-3000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert report["consumed"] >= total and report["predictions"] >= 60
    schema = load_schema(ROOT / "schemas" / "prediction.v1.avsc")
    scored = {read_record(schema, m.value())["input_id"] for m in _read(dep, dep.out)}
    # at-least-once: every good record scored (a redelivered one may be scored twice)
    assert scored == {r["txn_id"] for r in payments(60, seed=3)}
    dead = _read(dep, dep.dlq)
    assert [m.value() for m in dead] == [b"\x00\x01"]
    assert dep.password not in out + err

    # lag --share as the tools user, with the lag role's ACLs
    tools = yaml.safe_load(dep.config.read_text())
    tools["kafka"] = {
        "unreachable_timeout_s": UNREACHABLE_S,
        **yaml.safe_load(broker.client_file("tools").read_text())["kafka"],
    }
    tools_config = tmp_path / "tools.yaml"
    tools_config.write_text(yaml.safe_dump(tools))
    grant(dep.admin, role_grants(load_config(tools_config, environ={}), "lag"), "User:tools")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    lag = subprocess.run(
        [*run_command(dep.config)[:3], "lag", "--config", str(tools_config), "--json"],
        capture_output=True, text=True, timeout=180, check=False,
        env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    assert lag.returncode == 0, lag.stderr[-3000:]
    doc = json.loads(lag.stdout)
    assert doc["type"] == "share" and doc["total_lag_records"] == 0, doc
    rows = {(p["topic"], p["partition"]): p["lag_records"] for p in doc["partitions"]}
    assert rows.keys() == {(dep.topic, 0), (dep.topic, 1)} and rows[(dep.topic, 0)] == 0, doc
    assert list(scratch.iterdir()) == []  # the properties file with the password is gone
    tools_password = broker.password_file("tools").read_text().strip()
    assert tools_password not in lag.stdout + lag.stderr
