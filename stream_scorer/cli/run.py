"""``stream-scorer run``: a scoring worker, or ``--workers N`` of them under a supervisor."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_scorer import logs
from stream_scorer.cli.common import Commands, command, command_group
from stream_scorer.errors import EXIT_OK, EXIT_ORPHANED_LAG, ConfigError

if TYPE_CHECKING:
    from stream_scorer.config import Config
    from stream_scorer.worker.flow import StopFlag

#: The heading of these commands in ``stream-scorer --help``, and its rows (commands, summary).
TITLE = "Run"
ROWS = [(("run", "score", "sink"), "score a stream (--workers N) or files; store results")]


def _cmd_run(args: argparse.Namespace) -> int:
    from stream_scorer.worker.flow import StopFlag

    stop = StopFlag()
    with stop.on_signals():  # before the heavy imports: a SIGTERM during start-up stops cleanly
        return _run(args, stop)


def _run(args: argparse.Namespace, stop: StopFlag) -> int:
    from stream_scorer.config import load_config
    from stream_scorer.worker.loop import run_worker

    worker: dict[str, Any] = {}
    if args.max_messages is not None:
        worker["max_messages"] = args.max_messages
    if args.idle_timeout is not None:
        worker["idle_timeout_s"] = args.idle_timeout
    if args.worker_id is not None:
        worker["id"] = args.worker_id
    overrides: dict[str, Any] = {"worker": worker} if worker else {}
    if args.metrics_port is not None:
        overrides["metrics"] = {"port": args.metrics_port}
    if args.bootstrap_servers is not None:
        overrides["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
    cfg = load_config(args.config, overrides=overrides)
    logs.setup(cfg.logging.format, args.log_level or cfg.logging.level)
    if args.workers < 1:
        raise ConfigError("--workers", f"must be at least 1, got {args.workers}")
    if args.workers > 1:
        return _supervise(args, cfg)
    report = run_worker(cfg, stop)
    # one write: with --workers N the reports share one stdout and must not interleave
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    sys.stdout.flush()
    return EXIT_ORPHANED_LAG if report.orphaned_lag else EXIT_OK


def _supervise(args: argparse.Namespace, cfg: Config) -> int:
    import socket

    from stream_scorer.worker.supervisor import Supervisor, worker_commands

    base = [sys.executable, "-m", "stream_scorer"]
    base += ["--log-level", args.log_level] if args.log_level else []
    base += ["run", "--config", str(args.config)]
    for flag, value in (
        ("--max-messages", args.max_messages),
        ("--idle-timeout", args.idle_timeout),
        ("--bootstrap-servers", args.bootstrap_servers),
    ):
        base += [flag, str(value)] if value is not None else []
    # stable across restarts (exactly-once's transactional ids, static membership)
    worker_id = cfg.worker.id or socket.gethostname()
    commands = worker_commands(base, args.workers, worker_id, cfg.metrics.port)
    return Supervisor(commands, grace_s=cfg.worker.shutdown_timeout_s + 60).run()


def _cmd_sink_postgres(args: argparse.Namespace) -> int:
    from stream_scorer.worker.flow import StopFlag

    stop = StopFlag()
    with stop.on_signals():
        from stream_scorer.config import load_config

        try:  # PostgreSQL support is the optional extra `postgres` (psycopg)
            from stream_scorer.worker.store import PredictionStore
        except ModuleNotFoundError as exc:
            raise ConfigError(
                "sink postgres",
                f"needs PostgreSQL support ({exc.name} is not installed): "
                "pip install 'stream-scorer[postgres]'",
            ) from exc

        overrides: dict[str, Any] = {}
        if args.bootstrap_servers is not None:
            overrides["kafka"] = {"bootstrap_servers": args.bootstrap_servers}
        if args.metrics_port is not None:
            overrides["metrics"] = {"port": args.metrics_port}
        cfg = load_config(args.config, overrides=overrides)
        logs.setup(cfg.logging.format, args.log_level or cfg.logging.level)
        store = PredictionStore(
            cfg, stop, member_id=args.member_id or "", idle_timeout_s=args.idle_timeout
        )
        report = store.run()
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def _cmd_score(args: argparse.Namespace) -> int:
    from stream_scorer.batch.score import run_score
    from stream_scorer.config import load_config
    from stream_scorer.worker.flow import StopFlag

    stop = StopFlag()
    with stop.on_signals():  # a SIGTERM stops at the next batch; nothing is written
        cfg = load_config(args.config)
        logs.setup(cfg.logging.format, args.log_level or cfg.logging.level)
        if args.batch_size is not None and args.batch_size < 1:
            raise ConfigError("--batch-size", f"must be at least 1, got {args.batch_size}")
        report = run_score(
            cfg,
            args.input or (),
            args.output,
            dead_letters=args.dead_letters,
            fmt=args.format or "",
            batch_size=args.batch_size,
            stopped=lambda: bool(stop),
            query=args.input_query,
            output_table=args.output_table,
            dead_letter_table=args.dead_letter_table,
            dsn=args.dsn,
        )
    sys.stdout.write(json.dumps(asdict(report)) + "\n")
    sys.stdout.flush()
    return EXIT_OK


def add_commands(sub: Commands) -> None:
    """Add ``run``, ``score`` and ``sink postgres``."""
    run = command(sub, "run", "run --config rides.yaml --workers 2", help="run a scoring worker")
    run.add_argument("--config", type=Path, required=True, help="YAML or TOML configuration")
    run.add_argument("--max-messages", type=int, help="stop after this many records")
    run.add_argument("--idle-timeout", type=float, help="stop after this many idle seconds")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables)")
    run.add_argument("--worker-id", help="worker id (default: host-pid)")
    run.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, one group member each (worker i: id <id>-<i>, port+i)",
    )
    run.set_defaults(func=_cmd_run)
    sinks = command_group(
        sub,
        "sink",
        "sink postgres --config rides.yaml",
        help="store the prediction topics in a database (docs/manual/storing.md)",
    )
    postgres = command(
        sinks,
        "postgres",
        "sink postgres --config rides.yaml",
        help="store the predictions in a PostgreSQL table, exactly once (the store section)",
    )
    postgres.add_argument(
        "--config", type=Path, required=True, help="YAML or TOML configuration (its store section)"
    )
    postgres.add_argument("--idle-timeout", type=float, help="stop after this many idle seconds")
    postgres.add_argument("--member-id", help="member id (default: host-pid)")
    postgres.add_argument(
        "--metrics-port", type=int, help="metrics and health port (0 disables; one per member)"
    )
    postgres.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    postgres.set_defaults(func=_cmd_sink_postgres)
    score = command(
        sub,
        "score",
        "score --config rides.yaml --input 'rides/*.parquet' --output predictions.parquet",
        help="score stored records with the pipeline of run: files or a query in",
        description="Score Parquet or Avro container files (files, directories, globs), or the "
        "rows of a PostgreSQL query, with the configuration's schemas, features, policies and "
        "model, as run scores the stream; write the predictions and the dead letters to files, "
        "each renamed into place only when complete, or to PostgreSQL tables, each swapped in "
        "whole in one transaction. The database is --dsn's, else the configuration's store.dsn "
        "(its password never shown; prefer PGPASSWORD, ~/.pgpass or store.password_file to a "
        "password in --dsn); an outage is retried until store.unavailable_timeout_s. Prints "
        "the counts as JSON; exit 2 for a configuration, schema, model or credential error, 1 "
        "for any other failure.",
    )
    score.add_argument("--config", type=Path, required=True, help="the configuration of run")
    inputs = score.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--input", nargs="+", metavar="PATH", help="files, directories or globs")
    inputs.add_argument(
        "--input-query",
        metavar="SQL",
        help="a PostgreSQL query; its columns feed the input schema's fields by name",
    )
    outputs = score.add_mutually_exclusive_group(required=True)
    outputs.add_argument("--output", type=Path, help="the predictions file (.parquet or .avro)")
    outputs.add_argument(
        "--output-table", metavar="TABLE", help="the predictions table (replaced whole)"
    )
    dead = score.add_mutually_exclusive_group()
    dead.add_argument(
        "--dead-letters",
        type=Path,
        metavar="PATH",
        help="the dead-letter file (default: OUTPUT's name + .dead-letters)",
    )
    dead.add_argument(
        "--dead-letter-table",
        metavar="TABLE",
        help="the dead-letter table (default with --output-table: TABLE_dead_letters)",
    )
    score.add_argument(
        "--dsn",
        metavar="DSN",
        help="the PostgreSQL connection string or URI (default: store.dsn)",
    )
    score.add_argument(
        "--format", choices=("parquet", "avro"), help="output format (default: by extension)"
    )
    score.add_argument(
        "--batch-size", type=int, help="records per batch: memory per input (default 65536)"
    )
    score.set_defaults(func=_cmd_score)
