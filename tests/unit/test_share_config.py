"""``input.group_type: share``: config refusal of exactly-once, the share consumer's settings,
the group configs set at start-up and the delivery-limit split (no broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_scorer.config import load_config, share_consumer_settings
from stream_scorer.errors import ConfigError
from stream_scorer.stages.records import Reason, Stage
from stream_scorer.worker.share import ShareSource, share_group_configs

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parents[2]


def _raw(tmp_path: Path, **input_extra: Any) -> dict[str, Any]:
    (tmp_path / "model").mkdir(exist_ok=True)
    schema = str(ROOT / "schemas" / "prediction.v1.avsc")
    return {
        "kafka": {
            "bootstrap_servers": "h:1",
            "consumer": {"session.timeout.ms": "10000", "fetch.wait.max.ms": "50"},
        },
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": schema,
            "id_field": "id",
            "group_type": "share",
            **input_extra,
        },
        "output": {"topic": "out", "schema": schema},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp_path / "model")},
    }


def _load(tmp_path: Path, raw: dict[str, Any]) -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, environ={})


def test_share_groups_refuse_exactly_once_naming_the_key(tmp_path: Path) -> None:
    raw = _raw(tmp_path)
    raw["delivery"] = {"mode": "exactly-once"}
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, raw)
    assert info.value.field == "input.group_type"
    assert "at-least-once only" in str(info.value)


def test_share_consumer_settings_are_explicit_and_drop_consumer_group_keys(
    tmp_path: Path,
) -> None:
    cfg = _load(tmp_path, _raw(tmp_path))
    settings = share_consumer_settings(cfg, "w1")
    assert settings["share.acknowledgement.mode"] == "explicit"
    assert settings["group.id"] == "g"
    assert settings["max.poll.records"] == str(cfg.batch.max_records)
    assert "session.timeout.ms" not in settings  # refused by the share consumer
    assert "enable.auto.commit" not in settings
    assert settings["fetch.wait.max.ms"] == "50"  # other pass-through keys stay


def test_the_group_configs_start_where_asked_and_let_the_worker_see_the_last_delivery() -> None:
    assert share_group_configs("earliest", 4) == {
        "share.auto.offset.reset": "earliest",
        "share.delivery.count.limit": "5",
    }


class _Msg:
    def __init__(self, offset: int, count: int) -> None:
        self._offset, self._count = offset, count

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def delivery_count(self) -> int:
        return self._count


def test_split_dead_letters_records_at_the_delivery_limit() -> None:
    source = ShareSource({}, "in", unreachable_timeout_s=1, delivery_limit=3)
    batch: list[Any] = [_Msg(0, 1), _Msg(1, 3), _Msg(2, 2), _Msg(3, 4)]
    fresh, spent = source.split(batch)
    assert [m.offset() for m in fresh] == [0, 2]
    assert [d.message.offset() for d in spent] == [1, 3]
    assert {d.reason for d in spent} == {Reason.DELIVERY_LIMIT}
    assert Reason.DELIVERY_LIMIT.stage is Stage.CONSUME


def test_share_group_command_output_parses_into_rows_and_errors_raise() -> None:
    from stream_scorer.errors import BrokerError
    from stream_scorer.ops.sharelag import ShareLag, parse_describe, to_table

    text = (
        "\nGROUP           TOPIC           PARTITION  START-OFFSET  LAG\n"
        "g               t               0          396           4\n"
        "g               t               1          -             -\n"
    )
    rows = parse_describe(text, "g")
    assert rows == [ShareLag("t", 0, 396, 4), ShareLag("t", 1, None, None)]
    assert to_table("g", rows).splitlines()[-1] == "total lag: 4 records"
    with pytest.raises(BrokerError, match="GroupIdNotFoundException"):
        parse_describe(
            "Error: Executing share group command failed due to org.apache.kafka.common."
            "errors.GroupIdNotFoundException: Group nope not found.\n",
            "nope",
        )


# a stand-in for `java`: records the --command-config file's mode and text, prints a table
_FAKE_JAVA = """#!{python}
import os, sys
args = sys.argv[1:]
record = os.environ["FAKE_JAVA_RECORD"]
if "--command-config" in args:
    path = args[args.index("--command-config") + 1]
    with open(record, "w") as fh:
        fh.write(path + "\\n" + oct(os.stat(path).st_mode & 0o777) + "\\n" + open(path).read())
print("GROUP TOPIC PARTITION START-OFFSET LAG")
print("g t 0 7 3")
"""


def test_lag_share_on_a_secured_broker_passes_the_credentials_in_a_private_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from stream_scorer.ops.sharelag import ShareLag, describe_share_group

    java = tmp_path / "java"
    java.write_text(_FAKE_JAVA.format(python=sys.executable))
    java.chmod(0o700)
    record = tmp_path / "record"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("FAKE_JAVA_RECORD", str(record))
    monkeypatch.setenv("TMPDIR", str(scratch))
    settings = {
        "bootstrap.servers": "h:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "tools",
        "sasl.password": 'pa"ss\\word',
        "ssl.ca.location": "/certs/ca.pem",
    }
    rows = describe_share_group(settings, "g", java=str(java), libs=tmp_path)
    assert rows == [ShareLag("t", 0, 7, 3)]
    path, mode, *props = record.read_text().splitlines()
    assert mode == "0o600"
    assert not Path(path).exists() and list(scratch.iterdir()) == []  # removed after
    assert props == [
        "security.protocol=SASL_SSL",
        "sasl.mechanism=SCRAM-SHA-512",
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        'username="tools" password="pa\\\\"ss\\\\\\\\word";',  # escaped for JAAS, then .properties
        "ssl.truststore.type=PEM",
        "ssl.truststore.location=/certs/ca.pem",
    ]
    # plaintext: no file at all
    record.unlink()
    describe_share_group({"bootstrap.servers": "h:9092"}, "g", java=str(java), libs=tmp_path)
    assert not record.exists()


def test_lag_share_refuses_a_security_setting_it_cannot_pass_naming_it(tmp_path: Path) -> None:
    from stream_scorer.ops.sharelag import java_client_properties

    settings = {"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"}
    with pytest.raises(ConfigError, match=r"kafka\.client\.sasl\.mechanism"):
        java_client_properties(settings, tmp_path)
    settings = {"security.protocol": "SSL", "ssl.keystore.location": "/k.p12"}
    with pytest.raises(ConfigError, match=r"kafka\.client\.ssl\.keystore\.location"):
        java_client_properties(settings, tmp_path)


class _FakeShareConsumer:
    """What ShareSource calls on librdkafka's share consumer, recorded."""

    def __init__(self, polls: list[list[Any]]) -> None:
        self.polls = polls
        self.acks: list[tuple[int, int]] = []
        self.sent = 0

    def poll(self, _timeout: float) -> list[Any]:
        return self.polls.pop(0) if self.polls else []

    def acknowledge(self, msg: Any, kind: Any) -> None:
        self.acks.append((msg.offset(), int(kind)))

    def commit_async(self) -> None:
        self.sent += 1


class _Polled(_Msg):
    def error(self) -> None:
        return None


def test_records_are_accepted_after_delivery_and_released_on_a_stop() -> None:
    from confluent_kafka import AcknowledgeType

    fake = _FakeShareConsumer([[_Polled(0, 1), _Polled(1, 1)], [_Polled(2, 2)]])
    source = ShareSource({}, "in", unreachable_timeout_s=1, delivery_limit=3)
    source._consumer = fake
    assert [m.offset() for m in source.poll_batch(10, 0.0)] == [0, 1]
    assert source.poll_batch(10, 0.0) == []  # no poll while the batch is unacknowledged
    source.store([("in", 0, 2)])  # the batch's outputs were delivered
    assert fake.acks == [(0, AcknowledgeType.ACCEPT), (1, AcknowledgeType.ACCEPT)]
    assert [m.offset() for m in source.poll_batch(10, 0.0)] == [2]
    source.release_all()  # stopping before its output was delivered
    assert fake.acks[-1] == (2, AcknowledgeType.RELEASE)
    assert (source.accepted, source.released, fake.sent) == (2, 1, 2)
