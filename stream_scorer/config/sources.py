"""Where the configuration comes from: one file, the environment, the command line.

Sources, later ones winning: the defaults of the sections, one YAML or TOML file (pydantic-settings'
``YamlConfigSettingsSource``/``TomlConfigSettingsSource``), environment variables
``STREAM_SCORER_<SECTION>__<KEY>`` (its ``EnvSettingsSource`` with ``env_nested_delimiter="__"``;
inside the ``kafka.*`` pass-through tables a single ``_`` becomes a ``.``), then command-line
flags. The tables are merged key by key, as ``settings_customise_sources`` would, and validated
once with the file's folder as the base of relative paths.

``Config`` stays a plain model, not a ``BaseSettings``: validating one (``with_worker``, tests)
never reads the environment, and validation gets the file's folder as its context, which a
``BaseSettings`` constructor cannot pass. Two things have no public pydantic-settings API and are
done beside the sources: reading a given mapping instead of ``os.environ`` (the source's
``env_vars`` table is replaced after construction) and refusing a ``STREAM_SCORER_*`` variable
that names no section (the source ignores it; ``_refuse_unknown_variables``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, cast

import yaml
from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from stream_scorer.config.keys import PASSTHROUGH
from stream_scorer.config.messages import config_error, field_of
from stream_scorer.config.sections import Config
from stream_scorer.errors import ConfigError
from stream_scorer.fast.cache import SEED_ENV

ENV_PREFIX: Final = "STREAM_SCORER_"
#: Variables with the prefix that are not configuration keys.
NOT_CONFIG: Final = frozenset({"STREAM_SCORER_CACHE", SEED_ENV})

#: The settings sources read a model's fields (which keys are tables) and nothing else of a
#: BaseSettings; Config stays a plain model so that validating one never reads the environment.
_SOURCE_MODEL = cast(type[BaseSettings], Config)


class _Environment(EnvSettingsSource):
    """``STREAM_SCORER_<SECTION>__<KEY>`` variables of a given environment, as a nested table."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        super().__init__(
            _SOURCE_MODEL,
            case_sensitive=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            env_parse_none_str=None,
        )
        # the given environment, not os.environ (no public parameter): names lower-cased, as
        # the source keeps them when case_sensitive is false
        self.env_vars = {k.lower(): v for k, v in _variables(environ).items()}

    def __call__(self) -> dict[str, Any]:
        """The variables' table; a single ``_`` in a ``kafka.*`` table's key becomes a ``.``."""
        tree = super().__call__()
        kafka = tree.get("kafka")
        if isinstance(kafka, dict):
            for table in PASSTHROUGH:
                if isinstance(kafka.get(table), dict):
                    kafka[table] = {k.replace("_", "."): v for k, v in kafka[table].items()}
        return tree


def _variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The configuration's variables of ``environ`` (prefixed, not one of ``NOT_CONFIG``)."""
    return {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k not in NOT_CONFIG}


def _refuse_unknown_variables(environ: Mapping[str, str]) -> None:
    """Refuse a variable naming no section (the environment source would skip it silently)."""
    for name in _variables(environ):
        section = name[len(ENV_PREFIX) :].split("__")[0].lower()
        if field_of(Config, section) is None:
            known = ", ".join(Config.model_fields)
            raise ConfigError(section, f"unknown key (known: {known}) in {name}")


def environment_table(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``STREAM_SCORER_*`` variables of ``environ`` as a nested table.

    Raises:
        ConfigError: a variable names no section, or one setting a whole table is not JSON.
    """
    _refuse_unknown_variables(environ)
    try:
        return _Environment(environ)()
    except ValueError as exc:  # SettingsError: a variable setting a whole table is no JSON
        raise ConfigError("environment", f"{ENV_PREFIX}* variables: {exc}") from exc


def read_file(path: Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) configuration file.

    Raises:
        ConfigError: another suffix, a file that cannot be read or parsed, or whose top level is
            not a table.
    """
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError("config", f"{path}: use a .yaml, .yml or .toml file")
    try:
        with path.open("rb"):  # the sources skip a missing or unreadable file silently
            pass
        if path.suffix == ".toml":
            return TomlConfigSettingsSource(_SOURCE_MODEL, toml_file=path)()
        return YamlConfigSettingsSource(_SOURCE_MODEL, yaml_file=path, yaml_file_encoding="utf-8")()
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid: {exc}") from exc
    except (TypeError, ValueError) as exc:  # the source's dict.update of a list or a scalar
        raise ConfigError("config", f"{path} must hold a table at the top level") from exc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load, merge and validate the configuration.

    Args:
        path: the YAML or TOML file; relative paths inside it are relative to its folder.
        environ: environment to read ``STREAM_SCORER_*`` overrides from (default: os.environ).
        overrides: a nested table applied last (command-line flags).

    Raises:
        ConfigError: naming every offending key.
    """
    sources = (
        read_file(path) if path is not None else {},
        environment_table(os.environ if environ is None else environ),
        overrides or {},
    )
    raw: dict[str, Any] = {}
    for table in sources:
        raw = _merge(raw, table)
    return _validate(raw, path.resolve().parent if path is not None else Path.cwd())


def _validate(raw: Mapping[str, Any], base: Path) -> Config:
    try:
        return Config.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        raise config_error(exc) from exc


def with_worker(cfg: Config, **changes: Any) -> Config:
    """Return ``cfg`` with fields of its ``worker`` section replaced (validated again)."""
    raw = cfg.model_dump(by_alias=True)
    raw["worker"].update(changes)
    return _validate(raw, Path.cwd())
