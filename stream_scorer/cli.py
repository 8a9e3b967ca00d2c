"""The ``stream-scorer`` command line.

Subcommands: ``run`` (a worker, or ``--workers N`` of them), ``config check`` and ``config
schema`` (validate a configuration offline; its JSON Schema), ``lag`` (a group's lag),
``rewind`` (move a stopped group's offsets back to a time), ``dlq replay`` (publish dead
letters again), ``model`` (publish, promote, roll back, pack and check model versions),
``train`` and ``produce`` (the shipped example's
model and load generator), ``demo`` (everything end to end on a local broker), ``bench``
(throughput and latency against the Kafka ceiling and a naive loop), ``local-kafka`` (a
single-node Apache Kafka broker for development and tests), ``local-registry`` (a Schema
Registry) and ``local-mlflow`` (an MLflow tracking server).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_scorer import logs
from stream_scorer.devtools.soak import add_arguments as add_soak_arguments
from stream_scorer.errors import EXIT_INTERRUPTED, ConfigError, StreamScorerError, exit_code
from stream_scorer.model.commands import add_model_commands
from stream_scorer.stages.records import Reason

if TYPE_CHECKING:
    from stream_scorer.config import Config
    from stream_scorer.worker.flow import StopFlag

log = logging.getLogger("stream_scorer")


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
    return 0


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


def _cmd_lag(args: argparse.Namespace) -> int:
    from stream_scorer.ops.lag import describe_group, to_json, to_table

    settings: dict[str, str] = {}
    group, topic = args.group, args.topic
    if args.config is not None:
        from stream_scorer.config import client_settings, load_config

        cfg = load_config(args.config)
        settings = client_settings(cfg)
        group = group or cfg.input.group_id
        topic = topic or cfg.input.topic
    if args.bootstrap_servers:
        settings["bootstrap.servers"] = args.bootstrap_servers
    if not settings.get("bootstrap.servers"):
        raise ConfigError("kafka.bootstrap_servers", "give --bootstrap-servers or --config")
    if not group:
        raise ConfigError("input.group_id", "give --group or --config")
    rows = describe_group(settings, group, topic, timeout=args.timeout)
    print(to_json(group, rows) if args.json else to_table(group, rows), flush=True)
    return 0


def _cmd_rewind(args: argparse.Namespace) -> int:
    import time

    from stream_scorer.ops.rewind import parse_duration, rewind, to_json, to_table

    settings: dict[str, str] = {}
    group, topics = args.group, list(args.topic or ())
    if args.config is not None:
        from stream_scorer.config import client_settings, load_config

        cfg = load_config(args.config)
        settings = client_settings(cfg)
        group = group or cfg.input.group_id
        topics = topics or [cfg.input.topic]
    if args.bootstrap_servers:
        settings["bootstrap.servers"] = args.bootstrap_servers
    if not settings.get("bootstrap.servers"):
        raise ConfigError("kafka.bootstrap_servers", "give --bootstrap-servers or --config")
    if not group:
        raise ConfigError("input.group_id", "give --group or --config")
    if args.by is not None:
        to_ms = int((time.time() - parse_duration(args.by)) * 1000)
    else:
        to_ms = _time_ms("--to", args.to) or 0
    report = rewind(settings, group, to_ms, topics, dry_run=args.dry_run, timeout=args.timeout)
    print(to_json(report) if args.json else to_table(report), flush=True)
    return 0


def _cmd_topics_create(args: argparse.Namespace) -> int:
    from stream_scorer.config import kafka_client, load_config
    from stream_scorer.kafka.topics import ensure_topics

    cfg = load_config(args.config)
    for name, value in (
        ("--partitions", args.partitions),
        ("--output-partitions", args.output_partitions),
        ("--dead-letter-partitions", args.dead_letter_partitions),
        ("--replication-factor", args.replication_factor),
    ):
        if value is not None and value < 1:
            raise ConfigError(name, f"must be at least 1, got {value}")
    topics = {
        cfg.input.topic: args.partitions,
        cfg.output.topic: args.output_partitions or args.partitions,
        cfg.dead_letter.topic: args.dead_letter_partitions,
    }
    bootstrap = args.bootstrap_servers or cfg.kafka.bootstrap_servers
    created = ensure_topics(
        bootstrap,
        topics,
        replication_factor=args.replication_factor,
        client=kafka_client(cfg.kafka),
    )
    for name, partitions in topics.items():
        state = "created" if name in created else "already there"
        print(f"{name}: {state}, {partitions} partitions (at {bootstrap})")
    return 0


def _cmd_acl_grant(args: argparse.Namespace) -> int:
    """Grant a principal exactly what a role needs for the deployment of ``--config``."""
    from pydantic import ValidationError

    from stream_scorer.config import KafkaConfig, client_settings, load_config, read_file
    from stream_scorer.kafka.access import role_grants
    from stream_scorer.ops.grant import grant

    cfg = load_config(args.config)
    grants = role_grants(cfg, args.role)
    for g in grants:
        print(f"ALLOW {args.principal} {g.describe()}")
    if args.dry_run:
        return 0
    settings = client_settings(cfg)
    if args.admin_config is not None:
        table = read_file(args.admin_config).get("kafka")
        if not isinstance(table, dict):
            raise ConfigError("--admin-config", f"{args.admin_config} has no kafka table")
        try:
            kafka = KafkaConfig.model_validate(
                table, context={"base": args.admin_config.resolve().parent}
            )
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError("--admin-config", f"{args.admin_config}: kafka.{where}") from exc
        settings = client_settings(cfg.model_copy(update={"kafka": kafka}))
    grant(settings, grants, args.principal)
    print(f"granted {len(grants)} rights to {args.principal} ({args.role})", flush=True)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from stream_scorer.example.train import train

    manifest = train(
        args.out, rows=args.rows, seed=args.seed, objective=args.objective, n_estimators=args.trees
    )
    print(f"model {manifest.model_version} ({manifest.objective}) saved in {args.out}")
    for split, values in manifest.metrics.items():
        print(f"  {split}: {json.dumps(values)}")
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from stream_scorer.example.produce import confluent_frame, produce_events

    frame = b""
    if args.format == "confluent":
        if not args.registry_url:
            raise ConfigError("--registry-url", "is required by --format confluent")
        frame = confluent_frame(args.registry_url, args.topic)
    report = produce_events(
        args.bootstrap_servers,
        args.topic,
        args.count,
        malformed_fraction=args.malformed_fraction,
        rate=args.rate,
        seed=args.seed,
        frame=frame,
    )
    print(
        f"produced {report.produced} events ({report.valid} valid, malformed: "
        f"{json.dumps(report.malformed_by_kind)}) in {report.elapsed_s:.2f} s"
    )
    return 0


def _cmd_example_init(args: argparse.Namespace) -> int:
    from stream_scorer.example.files import MODEL_SUBDIR, init_example

    config = init_example(args.dir)
    print(f"example configuration {config} (schemas beside it)")
    print(f"next: stream-scorer train --out {args.dir / MODEL_SUBDIR}")
    print(f"      stream-scorer run --config {config}")
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    """Load a configuration and its schemas and model as a worker's start-up does, offline."""
    from stream_scorer.config import check_clients, load_config, worker_identity
    from stream_scorer.errors import ModelError, SchemaError
    from stream_scorer.worker.loop import build_pipeline, model_source
    from stream_scorer.worker.metrics import Metrics

    cfg = load_config(args.file)
    check_clients(cfg, worker_identity(cfg))  # librdkafka's own checks, as at start-up
    model_key = "model.path" if cfg.model.path is not None else "model.source"
    try:
        models = model_source(cfg)
        try:
            _, scorer = build_pipeline(cfg, Metrics(), models.fetch(models.wanted()))
        finally:
            models.close()
    except ConfigError:
        raise
    except StreamScorerError as exc:  # every problem of the file is a configuration error here
        key = "input.schema" if isinstance(exc, SchemaError) else "config"
        key = model_key if isinstance(exc, ModelError) else key
        raise ConfigError(key, str(exc)) from exc
    manifest = scorer.manifest
    print(
        f"OK {args.file}: {cfg.input.topic} -> {cfg.output.topic} "
        f"(dead letters {cfg.dead_letter.topic}, group {cfg.input.group_id}, "
        f"{cfg.delivery.mode}); model {manifest.model_version} ({manifest.objective}, "
        f"{len(manifest.features)} features)",
        flush=True,
    )
    return 0


def _cmd_config_schema(args: argparse.Namespace) -> int:
    from stream_scorer.config import config_schema

    print(json.dumps(config_schema(), indent=2), flush=True)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stream_scorer.example.demo import run_demo

    return run_demo(
        events=args.events,
        workers=args.workers,
        port=args.port,
        malformed_fraction=args.malformed_fraction,
        paced_rate=args.paced_rate,
        paced_seconds=args.paced_seconds,
        fmt=args.format,
        registry_port=args.registry_port,
    )


def _time_ms(name: str, text: str | None) -> int | None:
    """Milliseconds since the epoch from an ISO 8601 time (UTC unless it says) or a number."""
    from datetime import UTC, datetime

    if text is None:
        return None
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(name, f"not an ISO 8601 time or epoch milliseconds: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _cmd_dlq_replay(args: argparse.Namespace) -> int:
    from stream_scorer.config import kafka_client, load_config
    from stream_scorer.ops.replay import ReplayFilter, replay

    bootstrap, dlq, target, client = args.bootstrap_servers, args.dead_letter_topic, args.to, {}
    signing_key = args.signing_key
    if args.config is not None:
        cfg = load_config(args.config)
        bootstrap = bootstrap or cfg.kafka.bootstrap_servers
        dlq = dlq or cfg.dead_letter.topic
        target = target or cfg.input.topic
        client = kafka_client(cfg.kafka)
        signing_key = signing_key or cfg.dead_letter.signing_key
    for name, value in (
        ("--bootstrap-servers", bootstrap),
        ("--dead-letter-topic", dlq),
        ("--to", target),
    ):
        if not value:
            raise ConfigError(name, "is required (or give --config)")
    flt = ReplayFilter(
        frozenset(args.reason or ()),
        _time_ms("--since", args.since),
        _time_ms("--until", args.until),
    )
    report = replay(
        bootstrap,
        dlq,
        target,
        flt,
        rate=args.rate,
        group=args.group,
        client=client,
        private_key=args.private_key,
        signing_key=signing_key,
    )
    print(json.dumps(asdict(report)), flush=True)
    return 1 if report.refused else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from stream_scorer.devtools.bench import run_bench
    from stream_scorer.devtools.localkafka import default_cache_dir

    if args.framed:
        if not args.registry_url:
            raise ConfigError("--registry-url", "is required by --framed")
        from stream_scorer.devtools.bench import (
            ensure_example_model,
            example_config,
            example_payloads,
            profile_framed,
        )

        model = ensure_example_model(default_cache_dir() / "bench-models" / "100x6")
        profile = profile_framed(
            example_config(model), example_payloads(args.events), args.registry_url
        )
        print(json.dumps(profile), flush=True)
        return 0
    if args.soak:
        from stream_scorer.devtools.soak import SoakSettings, run_soak

        soak = (args.soak_seconds, args.soak_rate, args.soak_malformed, args.soak_interval)
        out = args.out or default_cache_dir() / "bench-results"
        run_soak(SoakSettings(*soak, args.partitions), port=args.port, out_dir=out)
        return 0
    run_bench(
        events=args.events,
        partitions=args.partitions,
        port=args.port,
        naive_events=args.naive_events,
        latency_seconds=args.latency_seconds,
        out_dir=args.out or default_cache_dir() / "bench-results",
    )
    return 0


def _cmd_local_kafka(args: argparse.Namespace) -> int:
    from stream_scorer.devtools.localkafka import (
        SECURE_USERS,
        LocalKafka,
        default_cache_dir,
        fetch_jars,
    )

    if args.action == "fetch":
        print(fetch_jars())
        return 0
    state_dir = args.dir or default_cache_dir() / f"broker-{args.port}"
    broker = LocalKafka(
        state_dir, port=args.port, controller_port=args.controller_port, secure=args.secure
    )
    if args.action == "start":
        print(broker.start())
        if args.secure:
            print(f"SASL_SSL (SCRAM-SHA-512), CA {broker.ca_file}; ACLs deny what is not granted")
            for user in SECURE_USERS:
                print(f"  {user}: merge the kafka table of {broker.client_file(user)}")
            print(
                "grant the worker its rights: stream-scorer acl grant --config CONFIG "
                f"--admin-config {broker.client_file('admin')} --principal User:worker "
                "--role worker"
            )
    elif args.action == "stop":
        print("stopped" if broker.stop() else "not running")
    else:
        status = broker.status()
        if status is None:
            print("not running")
            return 1
        state = "answering" if status.answering else "not answering"
        print(f"pid {status.pid} at {status.bootstrap}: {state}")
        return 0 if status.answering else 1
    return 0


def version_text() -> str:
    """What ``--version`` prints: the package and what it runs with, one per line.

    The package version (pyproject.toml, through the installed metadata), XGBoost, librdkafka
    (and its Python binding), and the Apache Kafka broker jars the development tools run
    (``local-kafka``, the tests, the demo).
    """
    import platform
    from importlib import metadata

    import confluent_kafka
    import xgboost

    from stream_scorer import __version__
    from stream_scorer.devtools.localkafka import KAFKA_VERSION

    return "\n".join(
        [
            f"stream-scorer {__version__}",
            f"xgboost {xgboost.__version__}",
            f"librdkafka {confluent_kafka.libversion()[0]} "
            f"(confluent-kafka {metadata.version('confluent-kafka')})",
            f"kafka broker jars (local-kafka, tests) {KAFKA_VERSION}",
            f"python {platform.python_version()}",
        ]
    )


class _VersionAction(argparse.Action):
    """``--version``: print ``version_text()`` and exit 0 (its imports only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(version_text(), flush=True)
        parser.exit()


def _cmd_local_registry(args: argparse.Namespace) -> int:
    from stream_scorer.devtools.localkafka import default_cache_dir
    from stream_scorer.devtools.localregistry import LocalRegistry, fetch_registry, find_java

    if args.action == "fetch":
        find_java()
        print(fetch_registry())
        return 0
    state_dir = args.dir or default_cache_dir() / f"registry-{args.port}"
    registry = LocalRegistry(state_dir, port=args.port, management_port=args.management_port)
    if args.action == "start":
        print(registry.start())
    elif args.action == "stop":
        print("stopped" if registry.stop() else "not running")
    else:
        status = registry.status()
        if status is None:
            print("not running")
            return 1
        state = "answering" if status.answering else "not answering"
        print(f"pid {status.pid} at {status.url}: {state}")
        return 0 if status.answering else 1
    return 0


def _cmd_local_mlflow(args: argparse.Namespace) -> int:
    from stream_scorer.devtools.localkafka import default_cache_dir
    from stream_scorer.devtools.localmlflow import LocalMlflow, fetch_mlflow

    if args.action == "fetch":
        print(fetch_mlflow())
        return 0
    state_dir = args.dir or default_cache_dir() / f"mlflow-{args.port}"
    server = LocalMlflow(state_dir, port=args.port)
    if args.action == "start":
        uri = server.start()
        print(uri)
        print(f"model.mlflow_tracking_uri: {uri} (or MLFLOW_TRACKING_URI={uri})")
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    else:
        status = server.status()
        if status is None:
            print("not running")
            return 1
        state = "answering" if status.answering else "not answering"
        print(f"pid {status.pid} at {status.uri}: {state}")
        return 0 if status.answering else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="stream-scorer", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level", help="DEBUG, INFO, WARNING or ERROR (default: logging.level or INFO)"
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version, with those of xgboost, librdkafka and the Kafka broker jars",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scoring worker")
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

    lag = sub.add_parser("lag", help="a consumer group's lag in records and seconds")
    lag.add_argument("--group", help="consumer group (default with --config: input.group_id)")
    lag.add_argument("--topic", help="only this topic (default with --config: input.topic)")
    lag.add_argument("--json", action="store_true", help="print JSON instead of a table")
    lag.add_argument("--bootstrap-servers", help="brokers (or take them from --config)")
    lag.add_argument("--config", type=Path, help="a worker configuration (brokers, security)")
    lag.add_argument("--timeout", type=float, default=15.0, help="seconds per broker request")
    lag.set_defaults(func=_cmd_lag)

    rw = sub.add_parser(
        "rewind",
        help="move a stopped group's committed offsets back to a time (re-score a window)",
        description="Move the group's committed offsets to the first record at or after the "
        "time (a time after the last record: the end offset). Refused while the group has "
        "members: stop its workers first. Prints each partition's offsets before and after.",
    )
    rw.add_argument("--group", help="consumer group (default with --config: input.group_id)")
    when = rw.add_mutually_exclusive_group(required=True)
    when.add_argument("--to", help="the time: ISO 8601 (UTC unless it says) or epoch ms")
    when.add_argument("--by", help="this long before now: 90s, 15m, 2h, 1h30m, 1d")
    rw.add_argument(
        "--topic",
        action="append",
        help="only this topic (repeatable; default with --config: input.topic, else every "
        "topic the group committed offsets for)",
    )
    rw.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    rw.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rw.add_argument("--bootstrap-servers", help="brokers (or take them from --config)")
    rw.add_argument("--config", type=Path, help="a worker configuration (brokers, security)")
    rw.add_argument("--timeout", type=float, default=15.0, help="seconds per broker request")
    rw.set_defaults(func=_cmd_rewind)

    topics = sub.add_parser("topics", help="the deployment's topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    create = topics_sub.add_parser(
        "create",
        help="create a configuration's input, output and dead-letter topics (idempotent)",
        description="Create input.topic, output.topic and dead_letter.topic of a worker "
        "configuration unless they exist (an existing topic must have the asked partitions). "
        "The input's partition count bounds how many workers of the group are useful.",
    )
    create.add_argument("--config", type=Path, required=True, help="a worker configuration")
    create.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    create.add_argument("--partitions", type=int, default=6, help="input topic (default 6)")
    create.add_argument("--output-partitions", type=int, help="default: --partitions")
    create.add_argument("--dead-letter-partitions", type=int, default=1, help="default 1")
    create.add_argument("--replication-factor", type=int, default=1, help="default 1")
    create.set_defaults(func=_cmd_topics_create)

    train = sub.add_parser("train", help="train the example ride-duration model")
    train.add_argument("--out", type=Path, default=Path("models/rides"))
    train.add_argument("--rows", type=int, default=50_000)
    train.add_argument("--trees", type=int, default=100)
    train.add_argument("--seed", type=int, default=7)
    train.add_argument(
        "--objective", default="reg:squarederror", choices=["reg:squarederror", "binary:logistic"]
    )
    train.set_defaults(func=_cmd_train)

    produce = sub.add_parser("produce", help="produce example ride events")
    produce.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    produce.add_argument("--topic", default="rides")
    produce.add_argument("--count", type=int, default=10_000)
    produce.add_argument(
        "--rate", type=float, help="events per second (default: as fast as possible)"
    )
    produce.add_argument("--malformed-fraction", type=float, default=0.0)
    produce.add_argument("--seed", type=int, default=1)
    produce.add_argument(
        "--format",
        choices=["schemaless", "confluent"],
        default="schemaless",
        help="confluent: register the ride schema under <topic>-value and frame every event",
    )
    produce.add_argument("--registry-url", help="the registry's Confluent-compatible API URL")
    produce.set_defaults(func=_cmd_produce)

    example = sub.add_parser("example", help="the shipped example's files")
    example_sub = example.add_subparsers(dest="example_command", required=True)
    init = example_sub.add_parser(
        "init", help="write the example's configuration and schemas into a folder"
    )
    init.add_argument("dir", type=Path, help="folder to write (created if missing)")
    init.set_defaults(func=_cmd_example_init)

    config = sub.add_parser("config", help="check a configuration file; its JSON Schema")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check",
        help="validate a configuration, its schemas and model as a worker's start-up does, "
        "without connecting to Kafka (exit 2 on any problem)",
    )
    check.add_argument("file", type=Path, help="YAML or TOML configuration")
    check.set_defaults(func=_cmd_config_check)
    config_sub.add_parser(
        "schema", help="print the configuration file's JSON Schema (for editors)"
    ).set_defaults(func=_cmd_config_schema)

    demo = sub.add_parser("demo", help="run the example end to end on a local broker")
    demo.add_argument("--events", type=int, default=100_000)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--port", type=int, default=39092)
    demo.add_argument("--malformed-fraction", type=float, default=0.005)
    demo.add_argument(
        "--paced-rate", type=float, default=1000.0, help="events/s of the latency phase"
    )
    demo.add_argument(
        "--paced-seconds", type=float, default=5.0, help="length of the latency phase"
    )
    demo.add_argument(
        "--format",
        choices=["schemaless", "confluent"],
        default="schemaless",
        help="confluent: a local Schema Registry too, framed events and predictions",
    )
    demo.add_argument(
        "--registry-port", type=int, default=39081, help="local registry port (--format confluent)"
    )
    demo.set_defaults(func=_cmd_demo)

    dlq = sub.add_parser("dlq", help="dead-letter tools")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    rp = dlq_sub.add_parser(
        "replay",
        help="publish dead letters again (all, or by reason or time range), once",
        description="Re-publish dead letters with their original key, value and headers. "
        "Safe to run twice: progress commits with the records in one transaction.",
    )
    rp.add_argument("--config", type=Path, help="worker configuration (topics, connection)")
    rp.add_argument("--bootstrap-servers", help="default: the config's kafka.bootstrap_servers")
    rp.add_argument("--dead-letter-topic", help="default: the config's dead_letter.topic")
    rp.add_argument("--to", help="target topic (default: the config's input.topic)")
    rp.add_argument(
        "--reason",
        action="append",
        choices=[r.value for r in Reason],
        metavar="REASON",
        help="replay only this dead-letter reason code (repeatable; README lists them)",
    )
    rp.add_argument("--since", help="dead-lettered at or after (ISO 8601 or epoch ms)")
    rp.add_argument("--until", help="dead-lettered before (ISO 8601 or epoch ms)")
    rp.add_argument("--rate", type=float, help="records per second (default: unlimited)")
    rp.add_argument("--group", help="progress group (default: derived from topics and filter)")
    rp.add_argument(
        "--private-key",
        type=Path,
        help="PEM RSA private key that opens encrypted dead letters (dead_letter.payload)",
    )
    rp.add_argument(
        "--signing-key",
        type=Path,
        help="replay only dead letters signed with this key (default: the config's "
        "dead_letter.signing_key); unsigned or altered ones are refused",
    )
    rp.set_defaults(func=_cmd_dlq_replay)

    acl = sub.add_parser("acl", help="least-privilege ACLs for the worker and the tools")
    acl_sub = acl.add_subparsers(dest="acl_command", required=True)
    ag = acl_sub.add_parser(
        "grant",
        help="grant a principal exactly what a role needs (README.md, Security)",
        description="Create the ALLOW ACLs a role needs for the deployment a configuration "
        "describes: worker (in its delivery mode), lag, or replay. Idempotent.",
    )
    ag.add_argument("--config", type=Path, required=True, help="the worker configuration")
    ag.add_argument("--principal", required=True, help="User:<name>")
    ag.add_argument("--role", required=True, choices=["worker", "lag", "replay"])
    ag.add_argument(
        "--admin-config",
        type=Path,
        help="a file whose kafka table connects as a user allowed to alter ACLs "
        "(default: --config's own connection)",
    )
    ag.add_argument("--dry-run", action="store_true", help="print the ACLs, change nothing")
    ag.set_defaults(func=_cmd_acl_grant)

    bench = sub.add_parser(
        "bench",
        help="benchmark: Kafka ceiling, naive loop, stream-scorer (docs/manual/benchmarks.md)",
    )
    bench.add_argument("--events", type=int, default=1_000_000, help="events preloaded per run")
    bench.add_argument("--partitions", type=int, default=8)
    bench.add_argument("--port", type=int, default=39192, help="local broker port")
    bench.add_argument(
        "--naive-events", type=int, default=20_000, help="events the naive loop runs over"
    )
    bench.add_argument(
        "--latency-seconds", type=float, default=10.0, help="length of each latency run"
    )
    bench.add_argument(
        "--out", type=Path, help="results folder (default: bench-results in the cache folder)"
    )
    bench.add_argument(
        "--framed",
        action="store_true",
        help="no broker: framed input (Confluent wire format) against the stock "
        "AvroDeserializer per record, µs per event (needs --registry-url)",
    )
    bench.add_argument("--registry-url", help="the registry's Confluent-compatible API URL")
    add_soak_arguments(bench)
    bench.set_defaults(func=_cmd_bench)

    add_model_commands(sub)

    lk = sub.add_parser("local-kafka", help="a local single-node Kafka broker")
    lk.add_argument("action", choices=["start", "stop", "status", "fetch"])
    lk.add_argument("--port", type=int, default=9092, help="client port (default 9092)")
    lk.add_argument(
        "--controller-port", type=int, help="KRaft controller port (default: --port + 1)"
    )
    lk.add_argument("--dir", type=Path, help="state and data directory")
    lk.add_argument(
        "--secure",
        action="store_true",
        help="SASL_SSL (SCRAM-SHA-512) with a throwaway CA, ACLs on, users admin, worker, tools",
    )
    lk.set_defaults(func=_cmd_local_kafka)

    lr = sub.add_parser(
        "local-registry", help="a local Schema Registry (Apicurio, Confluent-compatible API)"
    )
    lr.add_argument("action", choices=["start", "stop", "status", "fetch"])
    lr.add_argument("--port", type=int, default=8081, help="HTTP port (default 8081)")
    lr.add_argument("--management-port", type=int, help="management port (default: --port + 1)")
    lr.add_argument("--dir", type=Path, help="state directory")
    lr.set_defaults(func=_cmd_local_registry)

    lm = sub.add_parser(
        "local-mlflow", help="a local MLflow tracking server (the models:/ source's registry)"
    )
    lm.add_argument("action", choices=["start", "stop", "status", "fetch"])
    lm.add_argument("--port", type=int, default=5000, help="HTTP port (default 5000)")
    lm.add_argument("--dir", type=Path, help="state directory (database, artifacts)")
    lm.set_defaults(func=_cmd_local_mlflow)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (README.md, "Exit codes").

    0 a clean stop; 2 the deployment must be fixed (configuration, model, schema: no restart
    helps); 1 any other failure; 130 interrupted.
    """
    args = build_parser().parse_args(argv)
    logs.setup("auto", args.log_level or "INFO")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        log.error("%s", exc)
        return exit_code(exc)
    except StreamScorerError as exc:
        where = {k: getattr(exc, k, None) for k in ("topic", "partition", "offset")}
        extra = {k: v for k, v in where.items() if v is not None}
        log.error("%s: %s", type(exc).__name__, exc, extra={**extra, "error": type(exc).__name__})
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
