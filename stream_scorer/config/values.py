"""The value types a configuration file may hold, declared once, and the base of every section."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
)
from pydantic_core import PydanticKnownError

from stream_scorer.config.keys import OWNED_KEYS


def _refuse_bool(error_type: Literal["int_type", "float_type"]) -> BeforeValidator:
    """Refuse ``true``/``false`` where a number is expected (pydantic would read them as 1/0)."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticKnownError(error_type)
        return value

    return BeforeValidator(check)


Int = Annotated[int, _refuse_bool("int_type")]
Number = Annotated[float, _refuse_bool("float_type")]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


#: A string that must hold more than white space (topics, group, id field, brokers).
NonEmpty = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """``~`` expanded; a relative path is relative to the configuration file's folder."""
    path = value.expanduser()
    base = (info.context or {}).get("base")
    return path if path.is_absolute() else Path(base if base is not None else Path.cwd()) / path


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"no such directory: {path}")
    return path


def resolve_source(value: str, info: ValidationInfo) -> str:
    """``model.source``: a relative directory or store root made absolute like a path key."""
    if not value or value.startswith("models:/"):
        return value
    scheme = "store:" if value.startswith("store:") else ""
    return scheme + str(_resolve(Path(value[len(scheme) :]), info))


#: A file that must exist when the configuration is loaded.
ExistingFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_file)]
#: A directory that must exist when the configuration is loaded.
ExistingDir = Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_dir)]


def librdkafka_key(key: str) -> str:
    """A key of a librdkafka table: any, except the ones stream-scorer sets itself."""
    if key in OWNED_KEYS:
        raise ValueError("is set by stream-scorer itself; use the matching stream-scorer key")
    return key


def librdkafka_value(value: Any) -> str:
    """Every value goes to librdkafka as a string: ``true``/``false``, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError("must be a string, number or boolean")


#: A librdkafka pass-through table: dotted librdkafka keys, scalar values passed as strings.
Librdkafka = Annotated[
    Mapping[
        Annotated[str, AfterValidator(librdkafka_key)],
        Annotated[
            str,
            BeforeValidator(librdkafka_value),
            WithJsonSchema({"type": ["string", "number", "boolean"]}),
        ],
    ],
    Field(json_schema_extra={"propertyNames": {"not": {"enum": sorted(OWNED_KEYS)}}}),
]


def no_default(schema: dict[str, Any]) -> None:
    """Drop a field's ``default`` from the JSON Schema (a path that differs per installation)."""
    schema.pop("default", None)


def none_words(value: Any) -> Any:
    """An empty string, ``null`` or ``none`` (an environment variable) means unset."""
    if isinstance(value, str) and value.lower() in ("", "null", "none"):
        return None
    return value


def log_level(value: str) -> str:
    """``logging.level``: one of Python's level names, any case."""
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
    return value


class Section(BaseModel):
    """A frozen section that refuses unknown keys and never puts input values in its errors."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,  # a ValidationError chained to a ConfigError shows no secret
        coerce_numbers_to_str=True,  # topic: 123 in YAML is the topic "123"
        use_attribute_docstrings=True,  # the docstrings below are the JSON Schema's descriptions
    )
