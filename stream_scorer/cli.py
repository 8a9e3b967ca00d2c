"""The ``stream-scorer`` command line.

Subcommands: ``run`` (a worker), ``dlq replay`` (publish dead letters again), ``train`` and
``produce`` (the shipped example's model and load generator), ``demo`` (everything end to end
on a local broker) and ``local-kafka`` (a single-node Apache Kafka broker for development and
tests).
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

from stream_scorer.errors import ConfigError, StreamScorerError

if TYPE_CHECKING:
    from stream_scorer.flow import StopFlag

log = logging.getLogger("stream_scorer")


def _cmd_run(args: argparse.Namespace) -> int:
    from stream_scorer.flow import StopFlag

    stop = StopFlag()
    with stop.on_signals():  # before the heavy imports: a SIGTERM during start-up stops cleanly
        return _run(args, stop)


def _run(args: argparse.Namespace, stop: StopFlag) -> int:
    from stream_scorer.app import run_worker
    from stream_scorer.config import load_config

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
    report = run_worker(cfg, stop)
    print(json.dumps(asdict(report)), flush=True)
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
    from stream_scorer.example.produce import produce_events

    report = produce_events(
        args.bootstrap_servers,
        args.topic,
        args.count,
        malformed_fraction=args.malformed_fraction,
        rate=args.rate,
        seed=args.seed,
    )
    print(
        f"produced {report.produced} events ({report.valid} valid, malformed: "
        f"{json.dumps(report.malformed_by_kind)}) in {report.elapsed_s:.2f} s"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from stream_scorer.example.demo import run_demo

    return run_demo(
        events=args.events,
        workers=args.workers,
        port=args.port,
        malformed_fraction=args.malformed_fraction,
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
    from stream_scorer.config import load_config
    from stream_scorer.replay import ReplayFilter, replay

    bootstrap, dlq, target, client = args.bootstrap_servers, args.dead_letter_topic, args.to, {}
    if args.config is not None:
        cfg = load_config(args.config)
        bootstrap = bootstrap or cfg.kafka.bootstrap_servers
        dlq = dlq or cfg.dead_letter.topic
        target = target or cfg.input.topic
        client = dict(cfg.kafka.client)
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
    report = replay(bootstrap, dlq, target, flt, rate=args.rate, group=args.group, client=client)
    print(json.dumps(asdict(report)), flush=True)
    return 0


def _cmd_local_kafka(args: argparse.Namespace) -> int:
    from stream_scorer.localkafka import LocalKafka, default_cache_dir, fetch_jars

    if args.action == "fetch":
        print(fetch_jars())
        return 0
    state_dir = args.dir or default_cache_dir() / f"broker-{args.port}"
    broker = LocalKafka(state_dir, port=args.port)
    if args.action == "start":
        print(broker.start())
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


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="stream-scorer", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a scoring worker")
    run.add_argument("--config", type=Path, required=True, help="YAML or TOML configuration")
    run.add_argument("--max-messages", type=int, help="stop after this many records")
    run.add_argument("--idle-timeout", type=float, help="stop after this many idle seconds")
    run.add_argument("--metrics-port", type=int, help="Prometheus port (0 disables)")
    run.add_argument("--worker-id", help="worker id (default: host-pid)")
    run.add_argument("--bootstrap-servers", help="override kafka.bootstrap_servers")
    run.set_defaults(func=_cmd_run)

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
    produce.set_defaults(func=_cmd_produce)

    demo = sub.add_parser("demo", help="run the example end to end on a local broker")
    demo.add_argument("--events", type=int, default=100_000)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--port", type=int, default=39092)
    demo.add_argument("--malformed-fraction", type=float, default=0.005)
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
    rp.add_argument("--reason", action="append", help="replay only this reason (repeatable)")
    rp.add_argument("--since", help="dead-lettered at or after (ISO 8601 or epoch ms)")
    rp.add_argument("--until", help="dead-lettered before (ISO 8601 or epoch ms)")
    rp.add_argument("--rate", type=float, help="records per second (default: unlimited)")
    rp.add_argument("--group", help="progress group (default: derived from topics and filter)")
    rp.set_defaults(func=_cmd_dlq_replay)

    lk = sub.add_parser("local-kafka", help="a local single-node Kafka broker")
    lk.add_argument("action", choices=["start", "stop", "status", "fetch"])
    lk.add_argument("--port", type=int, default=9092)
    lk.add_argument("--dir", type=Path, help="state and data directory")
    lk.set_defaults(func=_cmd_local_kafka)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (2 for bad configuration, 1 for failures)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except StreamScorerError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
