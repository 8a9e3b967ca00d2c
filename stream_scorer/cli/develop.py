"""Development: local servers, the benchmark and soak, the demo and the shipped example."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_scorer.cli.common import Commands, command, command_group
from stream_scorer.errors import ConfigError

#: The heading of these commands in ``stream-scorer --help``, and its rows (commands, summary).
TITLE = "Develop"
ROWS = [
    (("local-kafka", "local-registry", "local-mlflow", "local-postgres"), "servers"),
    (("demo", "bench"), "end to end on a local broker; benchmark, soak"),
    (("example", "train", "produce"), "the example's files, model, events"),
]


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
        controller_port=args.controller_port,
    )


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
    if args.files:
        from stream_scorer.devtools.benchfiles import run_file_bench

        run_file_bench(
            rows=args.rows,
            pandas_rows=args.pandas_rows,
            cache_dir=default_cache_dir(),
            out_dir=args.out or default_cache_dir() / "bench-results",
        )
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
        drift_pairs=args.drift_pairs,
        only_drift=args.only_drift,
    )
    return 0


def _report(status: tuple[int, str, bool] | None) -> int:
    """Print a local server's status (pid, address, answering); 0 only when it answers."""
    if status is None:
        print("not running")
        return 1
    pid, address, answering = status
    print(f"pid {pid} at {address}: {'answering' if answering else 'not answering'}")
    return 0 if answering else 1


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
        return _report(None if status is None else (status.pid, status.address, status.answering))
    return 0


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
        return _report(None if status is None else (status.pid, status.address, status.answering))
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
        return _report(None if status is None else (status.pid, status.address, status.answering))
    return 0


def _cmd_local_postgres(args: argparse.Namespace) -> int:
    from stream_scorer.devtools.localkafka import default_cache_dir
    from stream_scorer.devtools.localpostgres import LocalPostgres

    server = LocalPostgres(args.dir or default_cache_dir() / f"postgres-{args.port}", args.port)
    if args.action == "start":
        print(server.start())
    elif args.action == "stop":
        print("stopped" if server.stop() else "not running")
    elif args.action == "destroy":
        server.destroy()
        print("stopped, cluster removed")
    else:
        status = server.status()
        return _report(None if status is None else (status.pid, status.address, status.answering))
    return 0


def _local_server(
    sub: Commands, name: str, port: int, port_kind: str, summary: str
) -> argparse.ArgumentParser:
    """Add a local server's command: ``name {start,stop,status,fetch} --port PORT``."""
    parser = command(sub, name, f"{name} start --port {port}", help=summary)
    parser.add_argument("action", choices=["start", "stop", "status", "fetch"])
    parser.add_argument("--port", type=int, default=port, help=f"{port_kind} port (default {port})")
    return parser


def add_commands(sub: Commands) -> None:
    """Add the local servers, ``bench``, ``demo`` and the example's commands."""
    lk = _local_server(sub, "local-kafka", 9092, "client", "a local single-node Kafka broker")
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

    lr = _local_server(
        sub,
        "local-registry",
        8081,
        "HTTP",
        "a local Schema Registry (Apicurio, Confluent-compatible API)",
    )
    lr.add_argument("--management-port", type=int, help="management port (default: --port + 1)")
    lr.add_argument("--dir", type=Path, help="state directory")
    lr.set_defaults(func=_cmd_local_registry)

    lm = _local_server(
        sub,
        "local-mlflow",
        5000,
        "HTTP",
        "a local MLflow tracking server (the models:/ source's model registry)",
    )
    lm.add_argument("--dir", type=Path, help="state directory (database, artifacts)")
    lm.set_defaults(func=_cmd_local_mlflow)
    lp = command(
        sub,
        "local-postgres",
        "local-postgres start --port 5433",
        help="a local PostgreSQL server (the system's binaries; sink postgres)",
    )
    lp.add_argument(
        "action",
        choices=["start", "stop", "status", "destroy"],
        help="destroy: stop and remove the cluster (stop keeps it)",
    )
    lp.add_argument("--port", type=int, default=5433, help="TCP port on 127.0.0.1 (default 5433)")
    lp.add_argument("--dir", type=Path, help="state directory (the cluster is in a temporary one)")
    lp.set_defaults(func=_cmd_local_postgres)
    bench = command(
        sub,
        "bench",
        "bench --events 200000 --partitions 4",
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
    bench.add_argument(
        "--drift-pairs",
        type=int,
        default=2,
        help="one process with drift off then on, this many times (the drift cost)",
    )
    bench.add_argument(
        "--only-drift", action="store_true", help="the ceiling and the drift pairs only"
    )
    bench.add_argument("--soak", action="store_true", help="run the soak instead (RSS over time)")
    bench.add_argument(
        "--files",
        action="store_true",
        help="score on a Parquet file vs a plain pyarrow + xgboost script and a pandas loop",
    )
    bench.add_argument("--rows", type=int, default=10_000_000, help="--files: rows of the file")
    bench.add_argument(
        "--pandas-rows", type=int, default=20_000, help="--files: rows the pandas loop runs"
    )
    bench.add_argument("--soak-seconds", type=float, default=600.0, help="length of the soak")
    bench.add_argument("--soak-rate", type=float, default=10_000.0, help="events per second")
    bench.add_argument("--soak-malformed", type=float, default=0.01, help="malformed share")
    bench.add_argument("--soak-interval", type=float, default=10.0, help="seconds per sample")
    bench.set_defaults(func=_cmd_bench)
    demo = command(
        sub,
        "demo",
        "demo --events 20000 --workers 2",
        help="run the example end to end on a local broker",
    )
    demo.add_argument("--events", type=int, default=100_000)
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--port", type=int, default=39092)
    demo.add_argument(
        "--controller-port",
        type=int,
        help="the broker's KRaft controller port (default: --port + 1)",
    )
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
    example_sub = command_group(
        sub, "example", "example init rides", help="the shipped example's files"
    )
    init = command(
        example_sub,
        "init",
        "example init rides",
        help="write the example's configuration and schemas into a folder",
    )
    init.add_argument("dir", type=Path, help="folder to write (created if missing)")
    init.set_defaults(func=_cmd_example_init)
    train = command(
        sub,
        "train",
        "train --out rides/models/rides --rows 20000",
        help="train the example ride-duration model",
    )
    train.add_argument("--out", type=Path, default=Path("models/rides"))
    train.add_argument("--rows", type=int, default=50_000)
    train.add_argument("--trees", type=int, default=100)
    train.add_argument("--seed", type=int, default=7)
    train.add_argument(
        "--objective", default="reg:squarederror", choices=["reg:squarederror", "binary:logistic"]
    )
    train.set_defaults(func=_cmd_train)

    produce = command(
        sub,
        "produce",
        "produce --topic rides --count 1000 --rate 200",
        help="produce example ride events",
    )
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
