"""Security settings offline: secrets from files, ACLs per role, the words of a refusal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import KafkaError

from stream_scorer.cli import main
from stream_scorer.config import (
    client_settings,
    consumer_settings,
    load_config,
    producer_settings,
    redacted,
)
from stream_scorer.errors import AccessDeniedError, ConfigError
from stream_scorer.kafka.access import Grant, denied, refused_connection, role_grants

ROOT = Path(__file__).parents[2]
SCHEMA = str(ROOT / "schemas" / "prediction.v1.avsc")


def _config(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    (tmp_path / "model").mkdir(exist_ok=True)
    raw: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "h:1"},
        "input": {"topic": "in", "group_id": "g", "schema": SCHEMA, "id_field": "id"},
        "output": {"topic": "out", "schema": SCHEMA},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp_path / "model")},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_secret_files_reach_every_client_and_never_the_logged_settings(tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr3t-from-a-file\n")
    cfg = load_config(
        _config(
            tmp_path,
            kafka={
                "bootstrap_servers": "h:1",
                "client": {"sasl.username": "worker", "sasl.password": "overridden"},
                "secret_files": {"sasl.password": "password"},  # relative to the file
            },
        ),
        environ={},
    )
    for settings in (
        client_settings(cfg),
        consumer_settings(cfg, "w"),
        producer_settings(cfg, "w"),
    ):
        assert settings["sasl.password"] == "s3cr3t-from-a-file"
        assert "s3cr3t" not in str(redacted(settings))
    assert "s3cr3t" not in repr(cfg)
    secret.unlink()
    with pytest.raises(ConfigError, match=r"kafka.secret_files.sasl.password: cannot read"):
        client_settings(cfg)


def test_a_missing_secret_file_or_public_key_stops_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"kafka\.secret_files\.sasl\.password: no such file"):
        load_config(
            _config(
                tmp_path, kafka={"bootstrap_servers": "h", "secret_files": {"sasl.password": "x"}}
            ),
            environ={},
        )
    with pytest.raises(ConfigError, match=r"dead_letter\.public_key: is required"):
        load_config(_config(tmp_path, dead_letter={"payload": "encrypt"}), environ={})


@pytest.mark.parametrize(
    ("role", "mode", "expected"),
    [
        (
            "worker",
            "at-least-once",
            [
                "READ and DESCRIBE on topic 'in'",
                "READ on group 'g'",
                "WRITE and DESCRIBE on topic 'out'",
                "WRITE and DESCRIBE on topic 'dlq'",
                "DESCRIBE_CONFIGS on topic 'dlq'",
            ],
        ),
        (
            "worker",
            "exactly-once",
            [
                "READ and DESCRIBE on topic 'in'",
                "READ on group 'g'",
                "WRITE and DESCRIBE on topic 'out'",
                "WRITE and DESCRIBE on topic 'dlq'",
                "DESCRIBE_CONFIGS on topic 'dlq'",
                "WRITE and DESCRIBE on transactional ids prefixed 'stream-scorer-g-'",
            ],
        ),
        ("lag", "at-least-once", ["DESCRIBE on group 'g'", "READ and DESCRIBE on topic 'in'"]),
        (
            "replay",
            "at-least-once",
            [
                "READ and DESCRIBE on topic 'dlq'",
                "READ on groups prefixed 'stream-scorer-replay-'",
                "WRITE and DESCRIBE on transactional ids prefixed 'stream-scorer-replay-'",
                "WRITE and DESCRIBE on topic 'in'",
            ],
        ),
    ],
)
def test_each_role_gets_exactly_what_it_needs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str, mode: str, expected: list[str]
) -> None:
    config = _config(tmp_path, delivery={"mode": mode})
    grants = role_grants(load_config(config, environ={}), role)
    assert [g.describe() for g in grants] == expected
    args = ["acl", "grant", "--config", str(config), "--principal", "User:x", "--role", role]
    assert main([*args, "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"ALLOW User:x {e}" for e in expected]


def test_named_extra_input_topics_are_granted_and_patterns_left_to_the_operator(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    cfg = load_config(config, environ={}, overrides={"input": {"topics": ["in-2", "^in-.*"]}})
    worker = [g.describe() for g in role_grants(cfg, "worker")]
    assert worker[:2] == ["READ and DESCRIBE on topic 'in'", "READ and DESCRIBE on topic 'in-2'"]
    assert not any("in-.*" in g for g in worker)
    assert "READ and DESCRIBE on topic 'in-2'" in [g.describe() for g in role_grants(cfg, "lag")]


def test_refusals_name_what_is_missing_and_what_to_grant() -> None:
    err = KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    refused = denied(err, Grant("topic", "dlq", "write"), "User:worker")
    assert isinstance(refused, AccessDeniedError)
    assert str(refused) == (
        "not authorized to write topic 'dlq' (TOPIC_AUTHORIZATION_FAILED): grant WRITE and "
        "DESCRIBE on topic 'dlq' to User:worker (stream-scorer acl grant --role worker)"
    )
    txn = denied(
        KafkaError(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED),
        Grant("transactional_id", "stream-scorer-g-w1", "write"),
        grants=[Grant("transactional_id", "stream-scorer-g-", "write", prefixed=True)],
    )
    assert "use transactional id 'stream-scorer-g-w1'" in str(txn)
    assert "on transactional ids prefixed 'stream-scorer-g-' to this client's principal" in str(txn)
    assert denied(KafkaError(KafkaError._TRANSPORT), Grant("topic", "x", "read")) is None
    auth = refused_connection(
        KafkaError(KafkaError._AUTHENTICATION, "sasl_ssl://h:1/bootstrap: SASL failed"),
        {"bootstrap.servers": "h:1", "sasl.username": "worker", "sasl.password": "pw-123"},
    )
    assert auth is not None and "as user 'worker'" in str(auth) and "pw-123" not in str(auth)


def test_the_producers_refusal_lines_name_the_topic_and_are_warnings() -> None:
    import logging

    from stream_scorer.worker.delivery import ProducerEvents

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.levels: list[int] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.levels.append(record.levelno)

    rec, collect = ProducerEvents(), Collect()
    assert rec.callbacks()["logger"] is rec
    logger = logging.getLogger("librdkafka.producer")
    logger.addHandler(collect)
    level, logger.level = logger.level, logging.DEBUG
    fmt = "%s [%s] %s"
    try:
        added = 'Failed to add partition "{}" [0] to transaction: Broker: {}'
        rec.log(
            logging.ERROR, fmt, "ADDPARTS", "p#1", added.format("dlq", "Topic authorization failed")
        )
        rec.log(
            logging.ERROR, fmt, "ADDPARTS", "p#1", added.format("out", "Operation not attempted")
        )
        rec.log(logging.ERROR, fmt, "FAIL", "p#1", "Connect to ipv4#127.0.0.1:1 failed")
    finally:
        logger.removeHandler(collect)
        logger.setLevel(level)
    assert rec.refused_topic == "dlq"
    assert collect.levels == [logging.WARNING, logging.WARNING, logging.ERROR]
    rec.committed()  # a committed transaction puts the refusal behind
    assert rec.refused_topic is None
