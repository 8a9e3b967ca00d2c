import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import PAYMENT_SCHEMA, train_payment_classifier, write_schema

ROOT = Path(__file__).parents[2]


def _config(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    train_payment_classifier(model)
    raw: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": str(write_schema(tmp_path / "in.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
        },
        "output": {"topic": "out", "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(model)},
        "metrics": {"port": 0},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_scorer", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("changes", "code", "message"),
    [
        ({"batch__max_records": 0}, 2, "batch.max_records: must be greater than 0"),
        ({"input__colour": "red"}, 2, "input.colour: unknown key"),
        ({"input__id_field": "nope"}, 2, "input.id_field: field 'nope': no field 'nope'"),
        ({"model__nthread": "two"}, 2, "model.nthread: must be an integer"),
    ],
)
def test_bad_config_stops_start_up_naming_the_field(
    tmp_path: Path, changes: dict[str, Any], code: int, message: str
) -> None:
    raw = yaml.safe_load(_config(tmp_path).read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        raw.setdefault(section, {})[key] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _run("run", "--config", str(path))
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_model_reading_a_field_the_schema_lacks_is_refused(tmp_path: Path) -> None:
    schema = dict(
        PAYMENT_SCHEMA, fields=[f for f in PAYMENT_SCHEMA["fields"] if f["name"] != "amount"]
    )
    path = _config(tmp_path)
    write_schema(tmp_path / "in.avsc", schema)
    result = _run("run", "--config", str(path))
    assert result.returncode == 2  # a deployment error: fix it, do not restart
    assert "feature 'amount': field 'amount': no field 'amount'" in result.stderr


def _tamper_model_hash(config: Path) -> None:
    manifest = Path(yaml.safe_load(config.read_text())["model"]["path"]) / "manifest.json"
    raw = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(dict(raw, model_sha256="0" * 64)))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_model_not_matching_its_manifest_exits_2(tmp_path: Path, workers: str) -> None:
    path = _config(tmp_path)
    _tamper_model_hash(path)
    result = _run("run", "--config", str(path), "--workers", workers)
    assert result.returncode == 2, result.stderr  # with --workers 2: the supervisor's code too
    assert "manifest says 0000" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_schema_file_that_does_not_parse_exits_2(tmp_path: Path) -> None:
    path = _config(tmp_path)
    (tmp_path / "in.avsc").write_text('{"type": "record", "name": ')
    result = _run("run", "--config", str(path))
    assert result.returncode == 2
    assert "SchemaError: cannot load Avro schema" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    result = _run("run", "--config", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr


def test_config_check_accepts_a_good_configuration_without_kafka(tmp_path: Path) -> None:
    path = _config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["input"]["event_time_field"] = "at"  # a timestamp-millis long
    del raw["output"]["schema"]  # the packaged prediction schema
    path.write_text(yaml.safe_dump(raw))
    result = _run("config", "check", str(path))  # its broker, 127.0.0.1:1, is closed
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK ")
    assert "in -> out" in result.stdout
    assert "(binary:logistic, " in result.stdout


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch": {"max_records": 0}}, "batch.max_records: must be greater than 0"),
        ({"input": {"id_field": "nope"}}, "input.id_field: field 'nope': no field 'nope'"),
        ({"output": {"topic": "in"}}, "output.topic: input, output and dead-letter topics"),
        (
            {
                "delivery": {"mode": "exactly-once", "transaction_timeout_s": 10},
                "kafka": {"producer": {"message.timeout.ms": "20000"}},
            },
            "kafka.producer.message.timeout.ms: must not exceed",
        ),
        # the worker would silently use the Kafka timestamp instead
        (
            {"input": {"event_time_field": "country"}},
            "input.event_time_field: field 'country' is of type string",
        ),
        (
            {"input": {"event_time_field": "amount"}},
            "input.event_time_field: field 'amount' is of type float",
        ),
        (
            {"input": {"event_time_field": "customer.age"}},
            "input.event_time_field: field 'customer.age' is of type int",
        ),
    ],
)
def test_config_check_refuses_what_start_up_would_refuse(
    tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    raw = yaml.safe_load(_config(tmp_path).read_text())
    for section, values in change.items():
        raw.setdefault(section, {}).update(values)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = _run("config", "check", str(path))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_refuses_a_model_the_schema_cannot_feed(tmp_path: Path) -> None:
    path = _config(tmp_path)
    schema = dict(
        PAYMENT_SCHEMA, fields=[f for f in PAYMENT_SCHEMA["fields"] if f["name"] != "amount"]
    )
    write_schema(tmp_path / "in.avsc", schema)
    result = _run("config", "check", str(path))
    assert result.returncode == 2  # `run` exits 1 for it; for `config check` it is the file's fault
    assert "input.schema: feature 'amount': field 'amount': no field 'amount'" in result.stderr


def test_config_schema_prints_the_files_json_schema() -> None:
    result = _run("config", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema["additionalProperties"] is False
    # model and output, or models: exactly one of the two forms (a cross check)
    assert set(schema["required"]) == {"kafka", "input", "dead_letter"}
    assert {"model", "output", "models"} <= set(schema["properties"])
    batch = schema["$defs"]["BatchConfig"]["properties"]["max_records"]
    assert (batch["type"], batch["exclusiveMinimum"], batch["default"]) == ("integer", 0, 1000)


TYPO_VALUE = "hunter2-in-a-typo"


@pytest.mark.parametrize("command", ["config check", "run"])
@pytest.mark.parametrize(
    ("kafka", "field"),
    [
        ({"client": {"sasl.passwd": TYPO_VALUE}}, "kafka.client.sasl.passwd"),
        (
            {
                "client": {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-999",
                    "sasl.username": "u",
                    "sasl.password": "p",
                }
            },
            "kafka.client.sasl.mechanism",
        ),
        ({"producer": {"linger.ms": "notanumber"}}, "kafka.producer.linger.ms"),
    ],
)
def test_a_setting_librdkafka_refuses_exits_2_naming_its_key(
    tmp_path: Path, command: str, kafka: dict[str, Any], field: str
) -> None:
    path = _config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["kafka"].update(kafka)
    path.write_text(yaml.safe_dump(raw))
    args = [*command.split(), *(["--config"] if command == "run" else []), str(path)]
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert f"{field}: librdkafka refuses the" in result.stderr
    assert "Traceback" not in result.stderr
    assert TYPO_VALUE not in result.stdout + result.stderr
