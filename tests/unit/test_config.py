import copy
import re
import traceback
import typing
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel
from support import DELETE, set_dotted

from stream_scorer.config import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    LOGGABLE_KEYS,
    Config,
    check_clients,
    config_schema,
    consumer_settings,
    load_config,
    producer_settings,
    redacted,
)
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.errors import ConfigError
from stream_scorer.example.files import CONFIG_NAME, example_files
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.encode import PredictionEncoder

ROOT = Path(__file__).parents[2]


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "model").mkdir()
    return {
        "kafka": {"bootstrap_servers": "h:1"},
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": str(ROOT / "schemas" / "prediction.v1.avsc"),
            "id_field": "id",
        },
        "output": {"topic": "out", "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp_path / "model")},
    }


def _write(tmp_path: Path, raw: dict[str, Any], name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("key", "value", "field", "message"),
    [
        ("batch.max_records", 0, "batch.max_records", "greater than 0"),
        ("batch.max_records", "many", "batch.max_records", "integer"),
        ("batch.max_wait_ms", -5, "batch.max_wait_ms", "greater than 0"),
        ("batch.speed", 3, "batch.speed", "unknown key"),
        ("surprise", {}, "surprise", "unknown key"),
        ("input.topic", DELETE, "input.topic", "required"),
        ("input.topic", "", "input.topic", "empty"),
        ("output.topic", "in", "output.topic", "must differ"),
        ("model.path", "/nonexistent/model", "model.path", "no such directory"),
        ("model.threshold", 1.5, "model.threshold", "between 0 and 1"),
        ("input.schema", "/nope.avsc", "input.schema", "no such file"),
        ("metrics.port", 70000, "metrics.port", "port"),
        ("worker.idle_timeout_s", "soon", "worker.idle_timeout_s", "number"),
        ("kafka.consumer", {"group.id": "x"}, "kafka.consumer.group.id", "set by stream-scorer"),
        ("kafka.client", "sasl", "kafka.client", "table"),
        ("delivery.mode", "at-most-once", "delivery.mode", "exactly-once"),
        ("delivery.transaction_timeout_s", 0, "delivery.transaction_timeout_s", "greater"),
        ("delivery.static_membership", "perhaps", "delivery.static_membership", "true or"),
        ("dead_letter.max_ratio", 1.0, "dead_letter.max_ratio", "below 1"),
        ("dead_letter.max_consecutive", -1, "dead_letter.max_consecutive", "negative"),
        ("batch.max_processing_s", 200, "batch.max_processing_s", "half of"),
        (
            "kafka.consumer",
            {"max.poll.interval.ms": "soon"},
            "kafka.consumer.max.poll.interval.ms",
            "integer",
        ),
        (
            "kafka.consumer",
            {"enable.auto.commit": "true"},
            "kafka.consumer.enable.auto.commit",
            "set by",
        ),
        ("kafka.consumer", {"isolation.level": "x"}, "kafka.consumer.isolation.level", "set by"),
    ],
)
def test_bad_config_names_the_field(
    tmp_path: Path, base: dict[str, Any], key: str, value: Any, field: str, message: str
) -> None:
    set_dotted(base, key, value)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(_write(tmp_path, base), environ={})
    assert info.value.field == field
    assert field in str(info.value)


def test_environment_overrides_file_and_passthrough_keys(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    env = {
        "STREAM_SCORER_BATCH__MAX_RECORDS": "250",
        "STREAM_SCORER_KAFKA__CLIENT__SASL_PASSWORD": "hunter2",
        "STREAM_SCORER_KAFKA__CONSUMER__FETCH_MIN_BYTES": "1",
        "OTHER": "ignored",
    }
    cfg = load_config(_write(tmp_path, base), environ=env)
    assert cfg.batch.max_records == 250
    assert consumer_settings(cfg, "w")["fetch.min.bytes"] == "1"
    assert producer_settings(cfg, "w")["sasl.password"] == "hunter2"
    assert "hunter2" not in repr(cfg)  # secrets stay out of logs
    with pytest.raises(ConfigError, match=r"batch\.max_records"):
        load_config(_write(tmp_path, base), environ={"STREAM_SCORER_BATCH__MAX_RECORDS": "x"})


def test_toml_and_relative_paths(tmp_path: Path, base: dict[str, Any]) -> None:
    toml = f"""
[kafka]
bootstrap_servers = "h:1"
[input]
topic = "in"
group_id = "g"
schema = "{ROOT / "schemas" / "prediction.v1.avsc"}"
id_field = "id"
[output]
topic = "out"
schema = "{ROOT / "schemas" / "prediction.v1.avsc"}"
[dead_letter]
topic = "dlq"
[model]
path = "model"
threshold = 0.3
"""
    path = tmp_path / "c.toml"
    path.write_text(toml)
    cfg = load_config(path, environ={})
    assert cfg.first.model.path == tmp_path / "model"
    assert cfg.first.model.threshold == 0.3
    assert cfg.batch.max_records == 1000  # default


def test_consumer_never_stores_offsets_automatically(tmp_path: Path, base: dict[str, Any]) -> None:
    settings = consumer_settings(load_config(_write(tmp_path, base), environ={}), "w1")
    assert settings["enable.auto.offset.store"] == "false"
    assert settings["group.id"] == "g"


def test_shipped_example_config_loads() -> None:
    raw = yaml.safe_load((ROOT / "deploy" / "config" / "rides.yaml").read_text())
    assert set(raw) == {
        "kafka",
        "input",
        "output",
        "dead_letter",
        "model",
        "batch",
        "worker",
        "metrics",
    }


@pytest.mark.parametrize(
    ("delivery", "worker_id", "consumer", "producer"),
    [
        (
            {},
            "w1",
            {"enable.auto.commit": "true", "isolation.level": "read_committed"},
            {"message.timeout.ms": "120000", "transactional.id": None},
        ),
        (
            {"mode": "exactly-once"},
            "w1",
            {"enable.auto.commit": "false", "isolation.level": "read_committed"},
            {
                "transactional.id": "stream-scorer-g-w1",
                "transaction.timeout.ms": "60000",
                "message.timeout.ms": "60000",
            },
        ),
        (
            {"mode": "exactly-once", "transactional_id": "fixed", "transaction_timeout_s": 15},
            "w1",
            {"group.instance.id": None},
            {"transactional.id": "fixed", "transaction.timeout.ms": "15000"},
        ),
        ({"static_membership": True}, "w7", {"group.instance.id": "g-w7"}, {}),
    ],
)
def test_delivery_mode_maps_to_librdkafka_settings(
    tmp_path: Path,
    base: dict[str, Any],
    delivery: dict[str, Any],
    worker_id: str,
    consumer: dict[str, str | None],
    producer: dict[str, str | None],
) -> None:
    base["delivery"] = delivery
    cfg = load_config(_write(tmp_path, base), environ={})
    csettings = consumer_settings(cfg, worker_id)
    psettings = producer_settings(cfg, worker_id)
    assert {k: csettings.get(k) for k in consumer} == consumer
    assert {k: psettings.get(k) for k in producer} == producer


def test_exactly_once_refuses_a_message_timeout_above_the_transaction_timeout(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    base["delivery"] = {"mode": "exactly-once", "transaction_timeout_s": 10}
    base["kafka"]["producer"] = {"message.timeout.ms": "20000"}
    cfg = load_config(_write(tmp_path, base), environ={})
    with pytest.raises(ConfigError) as info:
        producer_settings(cfg, "w")
    assert info.value.field == "kafka.producer.message.timeout.ms"


def test_worker_id_defaults(tmp_path: Path, base: dict[str, Any]) -> None:
    import os
    import socket

    from stream_scorer.config import worker_identity

    cfg = load_config(_write(tmp_path, base), environ={})
    assert worker_identity(cfg) == f"{socket.gethostname()}-{os.getpid()}"
    base["delivery"] = {"mode": "exactly-once"}
    cfg = load_config(_write(tmp_path, base), environ={})
    assert worker_identity(cfg) == socket.gethostname()  # stable across restarts
    base["worker"] = {"id": "scorer-3"}
    assert worker_identity(load_config(_write(tmp_path, base), environ={})) == "scorer-3"


def test_overrides_win_over_environment_over_file(tmp_path: Path, base: dict[str, Any]) -> None:
    base["batch"] = {"max_records": 10, "max_wait_ms": 20}
    env = {"STREAM_SCORER_BATCH__MAX_RECORDS": "30", "STREAM_SCORER_CACHE": "/not/config"}
    over = {"batch": {"max_records": 40}}
    cfg = load_config(_write(tmp_path, base), environ=env, overrides=over)
    assert (cfg.batch.max_records, cfg.batch.max_wait_ms) == (40, 20)
    assert load_config(_write(tmp_path, base), environ=env).batch.max_records == 30
    with pytest.raises(ConfigError) as info:  # a misspelt section is refused, not ignored
        load_config(_write(tmp_path, base), environ={"STREAM_SCORER_BACH__MAX_RECORDS": "1"})
    assert info.value.field == "bach"


SECRET = "hunter2-s3cr3t"


@pytest.mark.parametrize(
    ("file", "environ", "field"),
    [
        ({"kafka": {"client": {"sasl.password": [SECRET]}}}, {}, "kafka.client.sasl.password"),
        ({"kafka": {"client": SECRET}}, {}, "kafka.client"),
        ({"kafka": {"producer": {"sasl.password": {"v": SECRET}}}}, {}, "kafka.producer"),
        (
            {"kafka": {"consumer": {"max.poll.interval.ms": SECRET}}},
            {},
            "kafka.consumer.max.poll.interval.ms",
        ),
        ({}, {"STREAM_SCORER_KAFKA__CLIENT": SECRET}, "environment"),
        ({"worker": {"api_token": SECRET}}, {}, "worker.api_token"),
    ],
)
def test_validation_errors_never_show_a_secret(
    tmp_path: Path, base: dict[str, Any], file: dict[str, Any], environ: dict[str, str], field: str
) -> None:
    for section, values in file.items():
        base.setdefault(section, {})
        if isinstance(base[section], dict) and isinstance(values, dict):
            base[section].update(values)
        else:
            base[section] = values
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, base), environ=environ)
    assert info.value.field.startswith(field)
    # neither the message nor anything chained to it (what a traceback would print)
    assert SECRET not in "".join(traceback.format_exception(info.value))


def test_json_schema_accepts_the_shipped_configs_and_refuses_bad_ones(
    base: dict[str, Any],
) -> None:
    validator = jsonschema.Draft202012Validator(config_schema())
    for shipped in (ROOT / "deploy" / "config" / "rides.yaml", example_files()[CONFIG_NAME]):
        assert list(validator.iter_errors(yaml.safe_load(shipped.read_text()))) == []
    assert list(validator.iter_errors(base)) == []
    for key, value in [
        ("batch.speed", 3),
        ("batch.max_records", 0),
        ("input.topic", ""),
        ("delivery.mode", "at-most-once"),
        ("kafka.consumer", {"group.id": "x"}),
        ("kafka.client", {"socket.timeout.ms": [1]}),
        ("metrics.port", 70000),
    ]:
        bad = copy.deepcopy(base)
        set_dotted(bad, key, value)
        assert list(validator.iter_errors(bad)), key


def test_the_configuration_reference_documents_every_key() -> None:
    page = (ROOT / "docs" / "manual" / "reference" / "configuration.md").read_text()
    rows = {m[1] for m in re.finditer(r"^\| `([a-z_]+(?:\[\])?\.[a-z_.]+)`", page, re.MULTILINE)}

    def model_of(annotation: Any) -> Any:
        """The section model of a field (itself, or inside ``X | None``), else None."""
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return annotation
        found = [model_of(a) for a in typing.get_args(annotation)]
        return next((f for f in found if f is not None), None)

    def keys_of(prefix: str, model: Any) -> set[str]:
        """Every key of a section; a nested section has its row and its own keys."""
        out = set()
        for n, i in model.model_fields.items():
            key = f"{prefix}.{i.alias or n}"
            out.add(key)
            inner = model_of(i.annotation)
            if inner is not None:
                out |= keys_of(key, inner)
        return out

    keys = set()
    for section, field in Config.model_fields.items():
        model = model_of(field.annotation)
        assert model is not None, section
        keys |= keys_of(f"{section}[]" if section == "models" else section, model)
    assert len(keys) > 50
    assert rows == keys


def test_copy_headers_refuses_the_predictions_own_names(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    base["output"]["copy_headers"] = ["traceparent", "stream_scorer.source.topic"]
    with pytest.raises(ConfigError, match=r"output\.copy_headers: 'stream_scorer\.source\.topic'"):
        load_config(_write(tmp_path, base), environ={})
    base["output"]["copy_headers"] = ["traceparent"]
    cfg = load_config(_write(tmp_path, base), environ={})
    assert cfg.first.output.copy_headers == ("traceparent",)


def test_output_schema_defaults_to_the_packaged_prediction_schema(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    del base["output"]["schema"]
    cfg = load_config(_write(tmp_path, base), environ={})
    assert cfg.first.output.schema == PREDICTION_SCHEMA_V1
    packaged = (ROOT / "schemas" / "prediction.v1.avsc").read_bytes()
    assert cfg.first.output.schema.read_bytes() == packaged
    PredictionEncoder(load_schema(cfg.first.output.schema))  # a schema the encoder takes
    # an installation's path is no default a JSON Schema can state
    assert "default" not in config_schema()["$defs"]["OutputConfig"]["properties"]["schema"]


def test_every_error_is_reported_and_a_misspelled_key_gets_did_you_mean(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    base["kafka"] = {"bootstrap_server": "h:1"}  # misspelled: the required key is then missing
    base["batch"] = {"max_records": 0, "colour": "red"}
    base["input"]["topc"] = base["input"].pop("topic")
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, base), environ={})
    problems = dict(info.value.problems)
    # the unknown key is the cause: named first, with the key it was meant to be
    assert info.value.field == "kafka.bootstrap_server"
    assert problems["kafka.bootstrap_server"] == "unknown key; did you mean 'bootstrap_servers'?"
    assert problems["input.topc"] == "unknown key; did you mean 'topic'?"
    assert problems["batch.colour"].startswith("unknown key (known: max_in_flight,")
    assert problems["kafka.bootstrap_servers"] == "is required"
    assert problems["input.topic"] == "is required"
    assert problems["batch.max_records"] == "must be greater than 0, got 0"
    assert len(problems) == 6
    for key, message in problems.items():
        assert f"{key}: {message}" in str(info.value)


def test_every_failed_check_across_keys_is_reported(tmp_path: Path, base: dict[str, Any]) -> None:
    base["output"]["topic"] = "in"
    base["input"]["format"] = "confluent"  # without registry.url
    base["dead_letter"]["payload"] = "encrypt"  # without public_key
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, base), environ={})
    assert [f for f, _ in info.value.problems] == [
        "registry.url",
        "dead_letter.public_key",
        "output.topic",
    ]


TYPO_VALUE = "hunter2-in-a-typo"


@pytest.mark.parametrize(
    ("kafka", "mode", "field", "message"),
    [
        (
            {"client": {"sasl.passwd": TYPO_VALUE}},
            AT_LEAST_ONCE,
            "kafka.client.sasl.passwd",
            "No such",
        ),
        (
            {
                "client": {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-999",
                    "sasl.username": "u",
                },
                "secret_files": {"sasl.password": "password"},
            },
            AT_LEAST_ONCE,
            "kafka.client.sasl.mechanism",
            "SCRAM-SHA-999",
        ),
        (
            {"client": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}},
            AT_LEAST_ONCE,
            "kafka.client.sasl.username",
            "sasl.username and sasl.password must be set",
        ),
        # an alias: librdkafka names it queue.buffering.max.ms
        (
            {"producer": {"linger.ms": "notanumber"}},
            AT_LEAST_ONCE,
            "kafka.producer.linger.ms",
            "Invalid value",
        ),
        (
            {"consumer": {"fetch.min.bytes": "lots"}},
            AT_LEAST_ONCE,
            "kafka.consumer.fetch.min.bytes",
            "Invalid value",
        ),
        (
            {"client": {"security.protocol": "SSL", "ssl.ca.location": "/nonexistent/ca.pem"}},
            AT_LEAST_ONCE,
            "kafka.client.ssl.ca.location",
            "ssl.ca.location failed",
        ),
        # only the transactional producer refuses it
        (
            {"producer": {"enable.idempotence": "false"}},
            EXACTLY_ONCE,
            "kafka.producer.enable.idempotence",
            "requires `enable.idempotence=true`",
        ),
    ],
)
def test_settings_librdkafka_refuses_name_their_key_and_never_a_value(
    tmp_path: Path, base: dict[str, Any], kafka: dict[str, Any], mode: str, field: str, message: str
) -> None:
    (tmp_path / "password").write_text(TYPO_VALUE)
    base["kafka"].update(kafka)
    base["delivery"] = {"mode": mode}
    cfg = load_config(_write(tmp_path, base), environ={})  # pydantic cannot know them
    with pytest.raises(ConfigError, match=message) as info:
        check_clients(cfg, "w")
    assert info.value.field == field
    assert "librdkafka refuses the" in str(info.value)
    assert TYPO_VALUE not in "".join(traceback.format_exception(info.value))


def test_the_clients_the_worker_builds_pass_librdkafkas_checks(
    tmp_path: Path, base: dict[str, Any]
) -> None:
    base["kafka"]["client"] = {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}
    base["kafka"]["client"] |= {"sasl.username": "u", "sasl.password": "p"}
    base["kafka"]["producer"] = {"linger.ms": 20, "compression.type": "lz4"}
    for mode in (AT_LEAST_ONCE, EXACTLY_ONCE):
        base["delivery"] = {"mode": mode, "static_membership": True}
        check_clients(load_config(_write(tmp_path, base), environ={}), "w")


def test_logged_settings_show_only_allow_listed_values() -> None:
    settings = {
        "bootstrap.servers": "h:1",
        "security.protocol": "SASL_SSL",
        "sasl.username": "worker",
        "sasl.password": "pw-value",
        "sasl.passwd": TYPO_VALUE,  # a typo no secret-name pattern catches
        "sasl.oauthbearer.config": "principal=x clientSecret=oauth-value",
        "ssl.key.pem": "pem-value",
    }
    shown = redacted(settings)
    assert shown["bootstrap.servers"] == "h:1"
    assert shown["security.protocol"] == "SASL_SSL"
    assert shown["sasl.username"] == "worker"
    for key in ("sasl.password", "sasl.passwd", "sasl.oauthbearer.config", "ssl.key.pem"):
        assert shown[key] == "***"
    assert not set(LOGGABLE_KEYS) & {"sasl.password", "ssl.key.password", "ssl.key.pem"}


def test_the_settings_sources_are_used_through_their_public_api() -> None:
    """No class of the configuration overrides a private method of a pydantic-settings source.

    Such overrides (``_read_file``, ``_load_env_vars``) break silently when pydantic-settings
    changes its internals; the sources are built with their public arguments instead.
    """
    import importlib
    import inspect
    import pkgutil

    from pydantic_settings import PydanticBaseSettingsSource

    import stream_scorer.config as package

    modules = [package]
    if hasattr(package, "__path__"):
        modules += [
            importlib.import_module(f"{package.__name__}.{m.name}")
            for m in pkgutil.iter_modules(package.__path__)
        ]
    sources = {
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, PydanticBaseSettingsSource)
        and cls.__module__.startswith(package.__name__)
    }
    assert sources, "the configuration reads its sources through pydantic-settings"
    private = {
        f"{ours.__qualname__}.{name}"
        for cls in sources
        for ours in cls.__mro__
        if ours.__module__.startswith("stream_scorer")
        for name in vars(ours)
        if name.startswith("_")
        and not name.startswith("__")
        and name != "_abc_impl"
        and any(
            name in vars(theirs)
            for theirs in cls.__mro__
            if theirs.__module__.startswith("pydantic_settings")
        )
    }
    assert not private
