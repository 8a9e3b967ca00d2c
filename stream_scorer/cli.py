"""The ``stream-scorer`` command line.

Subcommands: ``run`` (a worker), ``train`` and ``produce`` (the shipped example's model and
load generator), ``demo`` (everything end to end on a local broker), ``bench`` (throughput and
latency against the Kafka ceiling and a naive loop) and ``local-kafka`` (a single-node Apache
Kafka broker for development and tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stream_scorer.errors import ConfigError, StreamScorerError

log = logging.getLogger("stream_scorer")


def _cmd_run(args: argparse.Namespace) -> int:
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
    report = run_worker(cfg)
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


def _cmd_bench(args: argparse.Namespace) -> int:
    from stream_scorer.bench import run_bench
    from stream_scorer.localkafka import default_cache_dir

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

    bench = sub.add_parser(
        "bench", help="benchmark: Kafka ceiling, naive loop, stream-scorer (docs/benchmarks.md)"
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
    bench.set_defaults(func=_cmd_bench)

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
