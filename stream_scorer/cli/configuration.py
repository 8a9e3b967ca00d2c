"""``stream-scorer config check|schema``: validate a configuration offline; its JSON Schema."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_scorer.cli.common import Commands, command, command_group
from stream_scorer.errors import ConfigError, StreamScorerError

#: The heading of these commands in ``stream-scorer --help``, and its rows (commands, summary).
TITLE = "Run"
ROWS = [(("config",), "check a configuration offline; its JSON Schema")]


def _cmd_config_check(args: argparse.Namespace) -> int:
    """Load a configuration and its schemas and model as a worker's start-up does, offline."""
    from stream_scorer.config import check_clients, load_config, worker_identity
    from stream_scorer.errors import ModelError, SchemaError
    from stream_scorer.worker.loop import build_pipeline, model_source
    from stream_scorer.worker.metrics import Metrics

    cfg = load_config(args.file)
    check_clients(cfg, worker_identity(cfg))  # librdkafka's own checks, as at start-up
    lines = []
    for entry in cfg.entries:  # every model against the input schema, with its output schema
        model_key = entry.field("model", "path" if entry.model.path is not None else "source")
        try:
            models = model_source(cfg, entry)
            try:
                directory = models.fetch(models.wanted())
                _, scorer = build_pipeline(cfg, Metrics(), directory, entry=entry)
            finally:
                models.close()
        except ConfigError:
            raise
        except StreamScorerError as exc:  # every problem of the file is a configuration error
            key = "input.schema" if isinstance(exc, SchemaError) else "config"
            key = model_key if isinstance(exc, ModelError) else key
            raise ConfigError(key, str(exc)) from exc
        manifest = scorer.manifest
        named = "" if not cfg.models else f"{entry.name} ({entry.role}): "
        lines.append(
            f"{named}{cfg.input.topic} -> {entry.output.topic}; model {manifest.model_version} "
            f"({manifest.objective}, {len(manifest.features)} features)"
        )
    if not cfg.models:
        entry = cfg.first
        print(
            f"OK {args.file}: {cfg.input.topic} -> {entry.output.topic} "
            f"(dead letters {cfg.dead_letter.topic}, group {cfg.input.group_id}, "
            f"{cfg.delivery.mode}); model {manifest.model_version} ({manifest.objective}, "
            f"{len(manifest.features)} features)",
            flush=True,
        )
        return 0
    print(
        f"OK {args.file}: {len(lines)} models (dead letters {cfg.dead_letter.topic}, group "
        f"{cfg.input.group_id}, {cfg.delivery.mode})",
        flush=True,
    )
    for line in lines:
        print(f"  {line}", flush=True)
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from stream_scorer.config import config_schema

    print(json.dumps(config_schema(), indent=2), flush=True)
    return 0


def add_commands(sub: Commands) -> None:
    """Add ``config check`` and ``config schema``."""
    config_sub = command_group(
        sub, "config", "config check rides.yaml", help="check a configuration file; its JSON Schema"
    )
    check = command(
        config_sub,
        "check",
        "config check rides.yaml",
        help="validate a configuration, its schemas and model as a worker's start-up does, "
        "without connecting to Kafka (exit 2 on any problem)",
    )
    check.add_argument("file", type=Path, help="YAML or TOML configuration")
    check.set_defaults(func=_cmd_config_check)
    command(
        config_sub,
        "schema",
        "config schema > config.schema.json",
        help="print the configuration file's JSON Schema (for editors)",
    ).set_defaults(func=_cmd_config_schema)
