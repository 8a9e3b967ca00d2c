"""Share-group bench: a model-bound workload on ONE partition, 1 vs N share workers.

``python -m stream_scorer.devtools.sharebench --bootstrap-servers HOST:PORT [--events N]
[--trees T] [--depth D] [--workers 1,2]`` trains the example's model with ``T`` trees of depth
``D`` (model-bound: scoring dominates), then for each worker count: a fresh one-partition topic
and share group, the workers started and ready (``/readyz``), ``N`` ride events produced at
once, and the time until the output topic holds ``N`` predictions. Prints one JSON line per
worker count: events/s, and each worker's ``stream_scorer_startup_seconds`` (start → could
score) and ``stream_scorer_first_batch_seconds`` (start → first delivered batch).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import fastavro
import yaml
from confluent_kafka import Producer

from stream_scorer.clients import topic_end_offsets
from stream_scorer.devtools.benchkafka import EXAMPLE_CONFIG, free_port, scrape
from stream_scorer.example.rides import generate_rides, load_ride_schema
from stream_scorer.example.train import train
from stream_scorer.kafka.topics import ensure_topics
from stream_scorer.worker.supervisor import run_command


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _payloads(events: int) -> list[bytes]:
    schema = fastavro.parse_schema(load_ride_schema())
    out = []
    for ride in generate_rides(events, seed=11):
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, ride)
        out.append(buf.getvalue())
    return out


def run_once(bootstrap: str, model: Path, workers: int, payloads: list[bytes]) -> dict[str, Any]:
    """One measurement: ``workers`` share workers on a fresh one-partition topic."""
    tag = uuid.uuid4().hex[:8]
    inp, out, dlq, group = (f"sb-{k}-{tag}" for k in ("in", "out", "dlq", "g"))
    ensure_topics(bootstrap, {inp: 1, out: 1, dlq: 1})
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    base = EXAMPLE_CONFIG.parent
    raw["kafka"]["bootstrap_servers"] = bootstrap
    raw["input"].update(topic=inp, group_id=group, group_type="share")
    raw["input"]["schema"] = str(base / raw["input"]["schema"])
    raw["output"].update(topic=out, schema=str(base / raw["output"]["schema"]))
    raw["dead_letter"]["topic"] = dlq
    raw["model"]["path"] = str(model)
    raw["batch"].update(max_records=200, max_wait_ms=10)
    raw.setdefault("logging", {})["format"] = "json"
    folder = Path(tempfile.mkdtemp(prefix="sharebench-"))
    config = folder / "worker.yaml"
    config.write_text(yaml.safe_dump(raw))
    ports = [free_port() for _ in range(workers)]
    procs = [
        subprocess.Popen(
            run_command(config, "--worker-id", f"w{i}", "--metrics-port", str(port)),
            stdout=subprocess.DEVNULL,
            stderr=(folder / f"w{i}.err").open("w"),
        )
        for i, port in enumerate(ports)
    ]
    try:
        deadline = time.monotonic() + 300
        while not all(_ready(p) for p in ports):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers not ready; see {folder}")
            time.sleep(0.2)
        producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": "20"})
        started = time.monotonic()
        for value in payloads:
            producer.produce(inp, value=value, partition=0)
            producer.poll(0)
        producer.flush(60)
        while sum(topic_end_offsets(bootstrap, out).values()) < len(payloads):
            if time.monotonic() > started + 600:
                raise RuntimeError("predictions never all arrived")
            time.sleep(0.05)
        seconds = time.monotonic() - started
        samples = [scrape(p) for p in ports]
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    return {
        "workers": workers,
        "partitions": 1,
        "events": len(payloads),
        "seconds": round(seconds, 2),
        "events_per_s": round(len(payloads) / seconds),
        "consumed_per_worker": [
            int(s.get(("stream_scorer_records_consumed_total", ""), 0)) for s in samples
        ],
        "startup_s": [round(s.get(("stream_scorer_startup_seconds", ""), 0), 2) for s in samples],
        "first_batch_s": [
            round(s.get(("stream_scorer_first_batch_seconds", ""), 0), 2) for s in samples
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print one JSON line per worker count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--trees", type=int, default=400)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args(argv)
    model = Path(tempfile.mkdtemp(prefix="sharebench-model-"))
    train(model, rows=20_000, n_estimators=args.trees, max_depth=args.depth)
    payloads = _payloads(args.events)
    for n in (int(x) for x in args.workers.split(",")):
        print(json.dumps(run_once(args.bootstrap_servers, model, n, payloads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
