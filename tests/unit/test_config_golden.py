"""The configuration's contract, pinned: its JSON Schema and its error messages.

Both fixtures were generated from the configuration before it became a package
(``stream_scorer/config.py``); any change to a key, a description, a default or the wording of a
problem shows here. Regenerate deliberately with ``STREAM_SCORER_REGENERATE=1`` (never in CI).
"""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import DELETE, set_dotted

from stream_scorer.config import config_schema, load_config
from stream_scorer.errors import ConfigError

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parents[2]
SCHEMA = str(ROOT / "schemas" / "prediction.v1.avsc")
REGENERATE = os.environ.get("STREAM_SCORER_REGENERATE") == "1"


def _base(model: Path) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": "h:1"},
        "input": {"topic": "in", "group_id": "g", "schema": SCHEMA, "id_field": "id"},
        "output": {"topic": "out", "schema": SCHEMA},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(model)},
    }


#: name -> (file changes as dotted key -> value, None deletes; environment; file suffix)
CASES: dict[str, tuple[dict[str, Any], dict[str, str], str]] = {
    "misspelled_and_missing": ({"input.topic": None, "input.topik": "x"}, {}, ".yaml"),
    "misspelled_section": ({"batchh": {"max_records": 1}}, {}, ".yaml"),
    "unknown_far_from_any": ({"batch.zzzzzz": 1}, {}, ".yaml"),
    "many_at_once": (
        {
            "batch.max_records": 0,
            "batch.max_wait_ms": "x",
            "model.threshold": 1.5,
            "metrics.port": 70000,
            "delivery.mode": "at-most-once",
            "delivery.static_membership": "perhaps",
            "dead_letter.max_consecutive": -1,
            "dead_letter.max_ratio": 1.0,
            "input.topic": "",
            "worker.id": 5,
        },
        {},
        ".yaml",
    ),
    "bool_for_number": ({"batch.max_records": True, "worker.idle_timeout_s": False}, {}, ".yaml"),
    "secret_values_hidden": (
        {"kafka.client": {"sasl.password": ["x"]}, "registry.password": 7, "kafka.consumer": 5},
        {},
        ".yaml",
    ),
    "owned_librdkafka_key": ({"kafka.consumer": {"group.id": "x"}}, {}, ".yaml"),
    "cross_checks": (
        {
            "output.topic": "in",
            "batch.max_processing_s": 200,
            "input.reader_subject": "s",
            "output.format": "confluent",
            "dead_letter.payload": "encrypt",
            "metrics.tls_cert": SCHEMA,
            "output.copy_headers": ["stream_scorer.x"],
        },
        {},
        ".yaml",
    ),
    "registry_userinfo_disagrees": (
        {"registry.url": "http://u:p@h:1", "registry.username": "v"},
        {},
        ".yaml",
    ),
    "bad_regex_topic": ({"input.topics": ["^(unclosed"]}, {}, ".yaml"),
    "log_level": ({"logging.level": "LOUD"}, {}, ".yaml"),
    "reader_version": ({"input.reader_version": "v2"}, {}, ".yaml"),
    "missing_file": ({"input.schema": "nope.avsc", "model.path": "nowhere"}, {}, ".yaml"),
    "env_unknown_section": ({}, {"STREAM_SCORER_BATCHH__MAX_RECORDS": "1"}, ".yaml"),
    "env_unknown_key": ({}, {"STREAM_SCORER_BATCH__MAX_RECORD": "1"}, ".yaml"),
    "env_bad_value": ({}, {"STREAM_SCORER_BATCH__MAX_RECORDS": "x"}, ".yaml"),
    "env_table_not_json": ({}, {"STREAM_SCORER_KAFKA__CLIENT": "nope"}, ".yaml"),
    "env_none_unsets": ({}, {"STREAM_SCORER_MODEL__PATH": "none"}, ".yaml"),
    "toml_misspelled": ({"input.topic": None, "input.topik": "x"}, {}, ".toml"),
    "wrong_suffix": ({}, {}, ".json"),
}


def _write(path: Path, raw: dict[str, Any]) -> None:
    if path.suffix == ".toml":
        lines = []
        for section, table in raw.items():
            lines.append(f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(yaml.safe_dump(raw))


def _message(tmp_path: Path, name: str) -> str:
    changes, environ, suffix = CASES[name]
    (tmp_path / "model").mkdir()
    raw = _base(tmp_path / "model")
    for key, value in changes.items():
        set_dotted(raw, key, DELETE if value is None else value)
    path = tmp_path / f"c{suffix}"
    _write(path, raw)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    return str(info.value).replace(str(tmp_path), "<tmp>")


FILE_CASES: dict[str, str] = {
    "yaml_top_level_list": "- a\n- b\n",
    "yaml_top_level_scalar": "just words\n",
    "yaml_invalid": "kafka: [\n",
}


def _file_message(tmp_path: Path, name: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(FILE_CASES[name])
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    return str(info.value).replace(str(tmp_path), "<tmp>")


def _golden(name: str, actual: Any) -> Any:
    path = DATA / name
    if REGENERATE:
        path.write_text(json.dumps(actual, indent=2, ensure_ascii=False, sort_keys=True) + "\n")
    return json.loads(path.read_text())


def test_the_json_schema_is_the_one_pinned() -> None:
    schema = config_schema()
    assert schema == _golden("config_schema.json", schema)


@pytest.mark.parametrize("name", [*CASES, *FILE_CASES])
def test_every_problem_is_worded_as_pinned(tmp_path: Path, name: str) -> None:
    message = _message(tmp_path, name) if name in CASES else _file_message(tmp_path, name)
    pinned = json.loads((DATA / "config_messages.json").read_text())
    if REGENERATE:
        pinned[name] = message
        (DATA / "config_messages.json").write_text(
            json.dumps(pinned, indent=2, ensure_ascii=False, sort_keys=True) + "\n"
        )
    assert message == pinned[name]
