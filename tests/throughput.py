"""Measure scoring throughput with 1 and with 2 worker processes (``run --workers N``).

Usage: ``.venv/bin/python tests/throughput.py [--bootstrap HOST:PORT] [--events N] [--rounds R]
[--modes at-least-once,exactly-once]`` (without ``--bootstrap`` a local broker is started in a
temporary directory). With two modes, every round runs 1 and 2 processes in each mode.

The input topic (4 partitions, so 2 workers split it evenly) is filled once; each run is a new
consumer group reading all of it from the start. Throughput is measured from the group's
committed offsets: records committed between the first commit seen and the last, divided by the
time in between, so process start-up and the group join are left out. Runs alternate
(1, 2, 1, 2, ...) so that a noisy, shared machine disturbs both alike; compare the ratio of the
same round rather than absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))

from support import (
    PAYMENT_SCHEMA,
    avro,
    committed_lag,
    payments,
    produce_raw,
    train_payment_classifier,
    write_schema,
)

from stream_scorer.kafka.topics import ensure_topics
from stream_scorer.worker.supervisor import run_command

ROOT = Path(__file__).parents[1]
PARTITIONS = 4


def _committed(bootstrap: str, group: str, topic: str, total: int) -> int:
    return total - sum(committed_lag(bootstrap, group, topic).values())


def measure(bootstrap: str, config: Path, topic: str, total: int, workers: int, mode: str) -> float:
    """Run ``workers`` processes on a fresh group until all is committed; return records/s."""
    group = f"tp-{workers}-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        run_command(config, "--workers", str(workers), "--metrics-port", "0"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={
            **os.environ,
            "STREAM_SCORER_INPUT__GROUP_ID": group,
            "STREAM_SCORER_DELIVERY__MODE": mode,
            "STREAM_SCORER_WORKER__ID": group,  # a fresh transactional id per run
        },
    )
    try:
        first: tuple[float, int] | None = None
        tick = threading.Event()  # never set: paces the sampling
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            done = _committed(bootstrap, group, topic, total)
            now = time.monotonic()
            if first is None and done > 0:
                first = (now, done)
            if done >= total and first is not None:
                return (total - first[1]) / (now - first[0])
            tick.wait(0.1)  # the measurement's sampling interval
        raise TimeoutError(f"{workers} workers did not finish within 600 s")
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", default="at-least-once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        broker = None
        bootstrap = args.bootstrap
        if bootstrap is None:
            from stream_scorer.devtools.localkafka import LocalKafka

            broker = LocalKafka(tmp / "kafka", port=39592)
            bootstrap = broker.start(timeout=120)
        try:
            topic = f"tp-in-{uuid.uuid4().hex[:6]}"
            ensure_topics(
                bootstrap, {topic: PARTITIONS, f"{topic}-out": PARTITIONS, f"{topic}-dlq": 1}
            )
            train_payment_classifier(tmp / "model")
            config = tmp / "w.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "kafka": {"bootstrap_servers": bootstrap},
                        "input": {
                            "topic": topic,
                            "group_id": "unused",
                            "schema": str(write_schema(tmp / "p.avsc", PAYMENT_SCHEMA)),
                            "id_field": "txn_id",
                        },
                        "output": {
                            "topic": f"{topic}-out",
                            "schema": str(ROOT / "schemas" / "prediction.v1.avsc"),
                        },
                        "dead_letter": {"topic": f"{topic}-dlq"},
                        "model": {"path": str(tmp / "model")},
                        "logging": {"level": "WARNING"},
                    }
                )
            )
            recs = payments(args.events, seed=1)
            items = [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs]
            for start in range(0, len(items), 40_000):  # below the producer's queue limit
                produce_raw(bootstrap, topic, items[start : start + 40_000], PARTITIONS)
            modes = args.modes.split(",")
            results: dict[tuple[str, int], list[float]] = {
                (m, w): [] for m in modes for w in (1, 2)
            }
            for rnd in range(args.rounds):
                for mode in modes:
                    for workers in (1, 2):
                        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        rate = measure(bootstrap, config, topic, args.events, workers, mode)
                        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                        cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
                        results[(mode, workers)].append(rate)
                        print(
                            f"round {rnd + 1}: {mode}, {workers} worker process(es): "
                            f"{rate:,.0f} records/s (workers' CPU incl. start-up {cpu:.1f} s; "
                            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
                            flush=True,
                        )
                    ratio = results[(mode, 2)][-1] / results[(mode, 1)][-1]
                    print(f"round {rnd + 1}: {mode}: 2 vs 1 processes: x{ratio:.2f}", flush=True)
            for (mode, workers), rates in results.items():
                print(
                    f"median, {mode}, {workers} process(es): "
                    f"{statistics.median(rates):,.0f} records/s"
                )
        finally:
            if broker is not None:
                broker.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
