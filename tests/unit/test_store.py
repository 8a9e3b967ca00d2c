"""``sink postgres`` without servers: the table from the schema, the store section, the errors,
the shipped Kafka Connect configuration."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import psycopg
import pytest
import yaml
from support import REPO, load_raw, ride_config

from stream_scorer import postgres as pg
from stream_scorer.config import StoreConfig
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.errors import ConfigError, DatabaseError, RefusedError, SchemaError
from stream_scorer.retry import classify
from stream_scorer.stages.decode import load_schema
from stream_scorer.worker.store import read_password

CONNECT = REPO / "deploy" / "connect" / "predictions-jdbc-sink.json"


def _store(**values: Any) -> dict[str, Any]:
    return {
        "dsn": "host=db dbname=scores user=sink password=hunter22",
        "group_id": "sink",
        "dead_letter_topic": "sink-dlq",
        **values,
    }


def test_the_table_has_a_column_per_prediction_field_then_the_coordinates() -> None:
    columns = pg.table_columns(load_schema(PREDICTION_SCHEMA_V1))
    assert [(c.name, c.sql_type, c.nullable) for c in columns] == [
        ("input_id", "text", False),
        ("prediction", "double precision", False),
        ("label", "integer", True),
        ("model_version", "text", False),
        ("event_time", "timestamp with time zone", False),
        ("scored_at", "timestamp with time zone", False),
        ("kafka_topic", "text", False),
        ("kafka_partition", "integer", False),
        ("kafka_offset", "bigint", False),
    ]
    assert [c.binary_type for c in columns[:5]] == ["text", "float8", "int4", "text", "timestamptz"]


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ([{"name": "model_version", "type": "string"}], "no 'input_id' field"),
        (
            [{"name": "input_id", "type": "string"}, {"name": "model_version", "type": "string"},
             {"name": "kafka_offset", "type": "long"}],
            "'kafka_offset' is a column the sink writes itself",
        ),
        (
            [{"name": "input_id", "type": "string"}, {"name": "model_version", "type": "string"},
             {"name": "tags", "type": {"type": "array", "items": "string"}}],
            "'tags': type 'array' has no column type",
        ),
        (
            [{"name": "input_id", "type": "string"}, {"name": "model_version", "type": "string"},
             {"name": "either", "type": ["null", "int", "string"]}],
            "only \\[null, T\\] unions",
        ),
    ],
)  # fmt: skip
def test_a_schema_the_table_cannot_hold_is_refused(fields: list[Any], error: str) -> None:
    with pytest.raises(SchemaError, match=error):
        pg.table_columns({"type": "record", "name": "P", "fields": fields})


def test_the_store_section_is_validated_and_its_password_never_shown(tmp_path: Path) -> None:
    assert not load_raw(tmp_path, ride_config(tmp_path)).store.dsn  # optional for `run`
    cfg = load_raw(tmp_path, ride_config(tmp_path, store=_store()))
    assert cfg.store.table == "predictions" and cfg.stored_topics() == ("out",)
    assert "hunter22" not in repr(cfg) and "hunter22" not in str(cfg)
    with pytest.raises(ConfigError, match=r"store\.tabel") as caught:
        load_raw(tmp_path, ride_config(tmp_path, store=_store(tabel="x")))
    assert "hunter22" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, ride_config(tmp_path, store=_store(dsn=["hunter22"])))
    assert caught.value.field == "store.dsn" and "hunter22" not in str(caught.value)
    with pytest.raises(ConfigError, match=r"store\.table"):
        load_raw(tmp_path, ride_config(tmp_path, store=_store(table="drop table; --")))


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"dead_letter_topic": "out"}, "store.dead_letter_topic"),
        ({"group_id": "g"}, "store.group_id"),
        ({"offsets_table": "predictions"}, "store.offsets_table"),
        ({"unavailable_timeout_s": 400}, "store.unavailable_timeout_s"),
        ({"group_id": ""}, "store.group_id"),
    ],
)
def test_the_store_section_is_checked_against_the_others(
    tmp_path: Path, values: dict[str, Any], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_raw(tmp_path, ride_config(tmp_path, store=_store(**values)))
    assert caught.value.field == field


def test_the_password_file_is_read_without_its_newline(tmp_path: Path) -> None:
    secret = tmp_path / "db-password"
    secret.write_text("s3cret\n")
    cfg = load_raw(tmp_path, ride_config(tmp_path, store=_store(password_file=str(secret))))
    assert read_password(cfg.store) == "s3cret"


def test_a_refusal_is_a_configuration_error_and_a_lost_server_an_outage() -> None:
    refusal = psycopg.OperationalError(
        'connection failed: FATAL:  password authentication failed for user "sink"'
    )
    down = psycopg.OperationalError("connection failed: Connection refused")
    assert pg.refused(refusal) and not pg.is_outage(refusal)
    assert pg.is_outage(down) and not pg.refused(down)
    assert pg.is_outage(psycopg.errors.AdminShutdown("terminating connection"))
    assert not pg.is_outage(psycopg.errors.UniqueViolation("duplicate key"))
    assert classify(DatabaseError("down")) == "outage"
    assert classify(RefusedError("store.dsn", "no", url="u", status=401)) == "configuration"


def test_a_dsn_is_shown_without_its_password() -> None:
    shown = pg.safe_dsn("host=db user=sink password=hunter22")
    assert sorted(shown.split()) == ["host=db", "user=sink"]
    assert "hunter22" not in pg.safe_dsn("postgresql://sink:hunter22@db:5432/scores")


#: What the shipped Connect configuration must hold (Debezium JDBC sink, upsert by our key).
CONNECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "config"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "config": {
            "type": "object",
            "required": [
                "connector.class", "topics", "connection.url", "connection.username",
                "connection.password", "insert.mode", "primary.key.mode", "primary.key.fields",
                "collection.name.format", "schema.evolution", "value.converter",
            ],
            "properties": {
                "connector.class": {"const": "io.debezium.connector.jdbc.JdbcSinkConnector"},
                "insert.mode": {"const": "upsert"},
                "primary.key.mode": {"const": "record_value"},
                "delete.enabled": {"const": "false"},
                "schema.evolution": {"enum": ["none", "basic"]},
                "connection.url": {"pattern": "^jdbc:postgresql://"},
                # never a password in the file: a config provider reference
                "connection.password": {"pattern": "^\\$\\{[a-z]+:.+\\}$"},
                "tasks.max": {"pattern": "^[1-9][0-9]*$"},
                "batch.size": {"pattern": "^[1-9][0-9]*$"},
            },
            "additionalProperties": {"type": "string"},
        },
    },
}  # fmt: skip


def test_the_connect_configuration_is_a_debezium_jdbc_upsert_on_our_key() -> None:
    raw = json.loads(CONNECT.read_text())
    jsonschema.validate(raw, CONNECT_SCHEMA)
    config = raw["config"]
    assert tuple(config["primary.key.fields"].split(",")) == pg.KEY_FIELDS
    # the same topic and table as the shipped worker configuration and the sink's default
    rides = yaml.safe_load((REPO / "stream_scorer" / "example" / "rides.yaml").read_text())
    assert config["topics"] == rides["output"]["topic"]
    assert config["collection.name.format"] == StoreConfig.model_fields["table"].default
    assert config["errors.deadletterqueue.topic.name"] != rides["dead_letter"]["topic"]


def test_the_connect_schema_catches_a_wrong_connector() -> None:
    raw = json.loads(CONNECT.read_text())
    raw["config"]["connector.class"] = "io.confluent.connect.jdbc.JdbcSinkConnector"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, CONNECT_SCHEMA)
    raw = json.loads(CONNECT.read_text())
    raw["config"]["connection.password"] = "hunter22"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, CONNECT_SCHEMA)


def test_the_newest_installed_postgresql_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_scorer.devtools import localpostgres
    from stream_scorer.errors import LocalPostgresError

    monkeypatch.delenv("STREAM_SCORER_PG_BIN", raising=False)
    monkeypatch.setattr(localpostgres, "DEBIAN_ROOT", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(LocalPostgresError, match="apt-get install postgresql"):
        localpostgres.find_bin()
    for version in ("9.6", "15", "17"):
        (tmp_path / version / "bin").mkdir(parents=True)
        (tmp_path / version / "bin" / "initdb").touch()
    (tmp_path / "18" / "bin").mkdir(parents=True)  # no initdb: client packages only
    assert localpostgres.find_bin() == tmp_path / "17" / "bin"
    monkeypatch.setenv("STREAM_SCORER_PG_BIN", str(tmp_path / "15" / "bin"))
    assert localpostgres.find_bin() == tmp_path / "15" / "bin"
