"""Bench: three models on one stream (``models:``) against three single-model workers.

``python -m stream_scorer.devtools.benchmodels --events 200000`` starts a local broker (or uses
``--bootstrap``), trains three models on the example's features (the duration regression, the
long-trip classifier, and the regression with another seed), writes the events once, then runs:

- ``three models, one worker``: one ``stream-scorer run`` process with ``models:`` (one consume
  and one decode per batch, three predictions, three output topics);
- ``three single-model workers``: three processes, one model each, each in its own group on the
  same events (each consumes and decodes every event).

Each worker is started and waits until assigned before the events are written; measured from
then to the last output acknowledged: events per second (wall) and CPU seconds (user + system
of the worker processes, from ``/proc``) per million events. Start-up is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from stream_scorer.devtools import benchkafka as bk
from stream_scorer.devtools.bench import ensure_example_model, example_payloads
from stream_scorer.kafka.topics import ensure_topics
from stream_scorer.worker.supervisor import run_command

PARTITIONS = 4


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the line)
    return ticks / os.sysconf("SC_CLK_TCK")


def train_models(cache: Path) -> dict[str, Path]:
    """The three models (example features; other targets or seeds), trained once and cached."""
    from stream_scorer.example.train import train

    base = cache / "bench-models"
    models = {"duration": ensure_example_model(base / "100x6")}
    for name, kwargs in (
        ("long_trip", {"objective": "binary:logistic"}),
        ("duration_b", {"seed": 11}),
    ):
        directory = base / f"multi-{name}"
        if not (directory / "manifest.json").exists():
            train(directory, **kwargs)
        models[name] = directory
    return models


def _config(
    path: Path, bootstrap: str, inp: str, group: str, models: dict[str, Path], dlq: str
) -> Path:
    """A worker configuration on the example's input with ``models`` (name: directory)."""
    example = yaml.safe_load(bk.EXAMPLE_CONFIG.read_text())
    schema = bk.EXAMPLE_CONFIG.parent / example["input"]["schema"]
    raw = {
        "kafka": {"bootstrap_servers": bootstrap},
        "input": {**example["input"], "topic": inp, "group_id": group, "schema": str(schema)},
        "dead_letter": {"topic": dlq},
        "models": [
            {"name": n, "model": {"path": str(d)}, "output": {"topic": f"{group}-{n}"}}
            for n, d in models.items()
        ],
        "batch": example.get("batch", {}),
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def run_mode(
    bootstrap: str, label: str, groups: list[dict[str, Path]], events: int, work: Path
) -> dict[str, Any]:
    """Run one worker per entry of ``groups`` on fresh topics; feed ``events``; measure."""
    inp = f"bench-mm-{int(time.time() * 1000)}"
    dlq = f"{inp}-dlq"
    topics = {inp: PARTITIONS, dlq: 1}
    for i, models in enumerate(groups):
        topics |= {f"{inp}-g{i}-{n}": PARTITIONS for n in models}
    ensure_topics(bootstrap, topics)
    ports, procs = [], []
    for i, models in enumerate(groups):
        path = _config(work / f"{inp}-g{i}.yaml", bootstrap, inp, f"{inp}-g{i}", models, dlq)
        port = bk.free_port()
        ports.append(port)
        procs.append(
            subprocess.Popen(
                run_command(path, "--metrics-port", str(port), log_level="WARNING"),
                stdout=subprocess.DEVNULL,
            )
        )
    try:
        deadline = time.monotonic() + 180
        while not all(
            bk.scrape(p).get(("stream_scorer_assigned_partitions", ""), 0) > 0 for p in ports
        ):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{label}: the workers did not start")
            time.sleep(0.2)  # polling the workers' metrics endpoints
        payloads = example_payloads(events)
        cpu0 = sum(cpu_seconds(p.pid) for p in procs)
        t0 = time.perf_counter()
        bk.burst(bootstrap, inp, payloads, PARTITIONS)
        while True:
            samples = [bk.scrape(p) for p in ports]
            done = [s.get(("stream_scorer_records_consumed_total", ""), 0) for s in samples]
            busy = sum(s.get(("stream_scorer_in_flight_records", ""), 1) for s in samples)
            if min(done) >= events and busy == 0:
                break
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{label}: a worker exited")
            time.sleep(0.1)  # sampling interval
        wall = time.perf_counter() - t0
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=90)
    return {
        "mode": label,
        "workers": len(procs),
        "events": events,
        "events_per_s": round(events / wall),
        "cpu_s_per_million_events": round(cpu / events * 1e6, 1),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both modes and print one JSON line each, then the markdown rows."""
    from stream_scorer.devtools.localkafka import LocalKafka, default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--bootstrap", default="")
    parser.add_argument("--port", type=int, default=39292)
    parser.add_argument("--work", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    cache = default_cache_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    broker = None
    bootstrap = args.bootstrap
    if not bootstrap:
        broker = LocalKafka(cache / f"bench-broker-{args.port}", port=args.port)
        bootstrap = broker.start()
    try:
        models = train_models(cache)
        rows = [
            run_mode(bootstrap, "three models, one worker", [models], args.events, args.work),
            run_mode(
                bootstrap,
                "three single-model workers",
                [{n: d} for n, d in models.items()],
                args.events,
                args.work,
            ),
        ]
    finally:
        if broker is not None:
            broker.stop()
    for row in rows:
        print(json.dumps(row), flush=True)
    print("| mode | workers | events/s | CPU s per million events |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['events_per_s']:,} | "
              f"{r['cpu_s_per_million_events']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
