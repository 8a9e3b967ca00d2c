"""``stream-scorer demo``: the shipped example end to end on a local broker.

Starts a single-node Kafka broker (unless one already answers on the port), creates run-unique
topics, trains the example model if there is none (and a second version of it), starts worker
processes that follow the alias ``champion`` of a model store, produces example ride events with
a share of malformed ones, waits until the group has committed everything, then paces events
and halfway through promotes v2 (a live update, no restart), stops the workers with SIGTERM,
reads every prediction and dead letter back, prints a summary (predictions by model version,
the swap's latency) and stops the broker it started. Exit 0 only when the books balance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from stream_scorer import headers as hdr
from stream_scorer.clients import read_to_end, topic_end_offsets
from stream_scorer.contracts.manifest import MANIFEST_FILE, read_manifest
from stream_scorer.devtools.localkafka import LocalKafka, default_cache_dir
from stream_scorer.devtools.localregistry import LocalRegistry
from stream_scorer.errors import StreamScorerError
from stream_scorer.example.files import MODEL_SUBDIR, cached_example
from stream_scorer.example.produce import ProduceReport, confluent_frame, produce_events
from stream_scorer.kafka.topics import (
    describe_group,
    ensure_topics,
    group_lag,
    members_holding_partitions,
)
from stream_scorer.model.store import ModelStore, promote
from stream_scorer.worker.supervisor import run_command

INPUT_PARTITIONS = 4
#: How often the demo's workers ask the model store which version ``champion`` points at.
DEMO_REFRESH_S = 0.5
#: The second version's training seed (the first is the example's default).
V2_SEED = 8


def _say(text: str) -> None:
    print(text, flush=True)


def _start_workers(
    n: int, config: Path, env: dict[str, str], log_dir: Path
) -> list[tuple[subprocess.Popen[str], Path]]:
    procs = []
    for i in range(n):
        log_path = log_dir / f"worker-{i}.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                run_command(config, "--worker-id", f"demo-{i}"),
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=env,
            )
        procs.append((proc, log_path))
    return procs


def _wait_for_members(
    bootstrap: str,
    group: str,
    n: int,
    procs: list[tuple[subprocess.Popen[str], Path]],
    timeout: float = 120.0,
) -> int:
    """Wait until ``n`` workers share the input partitions (or one exits, or ``timeout``).

    A worker's first start in a fresh checkout compiles the fast path's kernel (seconds); without
    this wait the first worker ready takes every partition and the demo shows one worker.
    Returns how many members hold partitions.
    """
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": "0"})
    deadline = time.monotonic() + timeout
    tick = threading.Event()  # never set: paces the polling
    members = 0
    while members < n and time.monotonic() < deadline:
        if any(proc.poll() is not None for proc, _log in procs):
            break  # a worker exited: the summary's checks will say what went wrong
        members = members_holding_partitions(describe_group(admin, group), INPUT_PARTITIONS)
        tick.wait(0.2)
    return members


def _ensure_model(model_dir: Path, seed: int | None = None) -> None:
    from stream_scorer.example.rides import FEATURES

    if (model_dir / MANIFEST_FILE).is_file():
        manifest = read_manifest(model_dir)
        if manifest.features == FEATURES:
            _say(f"model: {manifest.model_version} (existing, {model_dir})")
            return
        _say("model: the existing one predates the example's features or value policies")
    from stream_scorer.example.train import train

    _say("model: training the example model ...")
    manifest = train(model_dir) if seed is None else train(model_dir, seed=seed)
    val = manifest.metrics.get("validation", {})
    base = manifest.metrics.get("baseline", {})
    _say(f"model: {manifest.model_version}")
    _say(f"      validation {json.dumps(val)}; mean-predictor baseline {json.dumps(base)}")


def _wait_drained(
    bootstrap: str,
    group: str,
    topic: str,
    produced: int,
    procs: list[tuple[subprocess.Popen[str], Path]],
    log_dir: Path,
) -> None:
    """Wait until the group committed everything in ``topic`` (or a worker exits early)."""
    last = -1
    while True:
        lag = sum(group_lag(bootstrap, group, topic).values())
        if lag == 0:
            return
        dead_workers = [p for p, _ in procs if p.poll() is not None]
        if dead_workers:
            raise StreamScorerError(
                f"a worker exited early with code {dead_workers[0].returncode}; see {log_dir}"
            )
        if lag != last:
            _say(f"      committed {produced - lag:,} / {produced:,}")
            last = lag
        time.sleep(0.5)


def run_demo(
    *,
    events: int,
    workers: int,
    port: int,
    malformed_fraction: float,
    paced_rate: float = 1000.0,
    paced_seconds: float = 5.0,
    fmt: str = "schemaless",
    registry_port: int = 39081,
    controller_port: int | None = None,
) -> int:
    """Run the demo; return the process exit code.

    Two phases: ``events`` produced as fast as possible (a backlog: the workers' drain rate),
    then ``paced_rate`` events per second for ``paced_seconds`` (the end-to-end latency of a
    stream the workers keep up with). ``fmt`` ``confluent``: a local Schema Registry
    (``registry_port``) too, the events framed with the ride schema's id and the predictions
    with the prediction schema's. ``controller_port``: the broker's KRaft controller port
    (default ``port`` + 1).
    """
    state = default_cache_dir() / f"demo-broker-{port}"
    broker = LocalKafka(state, port=port, controller_port=controller_port)
    running = broker.status()
    ours = running is None or not running.answering
    _say(
        f"[1/6] broker: {'starting a local Kafka broker' if ours else 'reusing the running broker'}"
    )
    bootstrap = broker.start()
    _say(f"      bootstrap {bootstrap}")
    procs: list[tuple[subprocess.Popen[str], Path]] = []
    registry: LocalRegistry | None = None
    registry_ours = False
    try:
        frame = b""
        extra_env: dict[str, str] = {}
        if fmt == "confluent":
            registry = LocalRegistry(
                default_cache_dir() / f"demo-registry-{registry_port}", port=registry_port
            )
            present = registry.status()
            registry_ours = present is None or not present.answering
            url = registry.start()
            _say(f"      schema registry {url} (Apicurio, Confluent-compatible API)")
            extra_env = {
                "STREAM_SCORER_INPUT__FORMAT": "confluent",
                "STREAM_SCORER_OUTPUT__FORMAT": "confluent",
                "STREAM_SCORER_REGISTRY__URL": url,
            }
        run = time.strftime("%Y%m%d-%H%M%S")
        topic, out, dlq, group = (
            f"rides-{run}",
            f"ride-predictions-{run}",
            f"ride-dead-letters-{run}",
            f"demo-{run}",
        )
        ensure_topics(bootstrap, {topic: INPUT_PARTITIONS, out: INPUT_PARTITIONS, dlq: 1})
        if registry is not None:
            frame = confluent_frame(registry.url, topic)
            _say(f"      events framed with schema id {int.from_bytes(frame[1:], 'big')}")
        _say(f"[2/6] topics: {topic} ({INPUT_PARTITIONS} partitions), {out}, {dlq}")
        _say("[3/6] model")
        config = cached_example()
        _ensure_model(config.parent / MODEL_SUBDIR)
        _ensure_model(config.parent / f"{MODEL_SUBDIR}-v2", seed=V2_SEED)
        store, v1, v2 = _model_store(state / "model-store", config.parent / MODEL_SUBDIR)
        _say(f"      model store {store.describe()}: champion -> {v1}; {v2} waits")
        env = {
            **os.environ,
            "STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "STREAM_SCORER_INPUT__TOPIC": topic,
            "STREAM_SCORER_INPUT__GROUP_ID": group,
            "STREAM_SCORER_OUTPUT__TOPIC": out,
            "STREAM_SCORER_DEAD_LETTER__TOPIC": dlq,
            "STREAM_SCORER_METRICS__PORT": "0",
            "STREAM_SCORER_WORKER__IDLE_TIMEOUT_S": "300",
            "STREAM_SCORER_MODEL__PATH": "none",
            "STREAM_SCORER_MODEL__SOURCE": f"{store.describe()}@champion",
            "STREAM_SCORER_MODEL__REFRESH_S": str(DEMO_REFRESH_S),
            **extra_env,
        }
        log_dir = state / "demo-logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        procs = _start_workers(workers, config, env, log_dir)
        _say(f"[4/6] workers: {workers} processes (logs in {log_dir})")
        joined = _wait_for_members(bootstrap, group, workers, procs)
        _say(f"      {joined} of {workers} workers in the group")
        _say(f"[5/6] backlog: producing {events:,} ride events, {malformed_fraction:.1%} malformed")
        started = time.monotonic()
        step = max(1, events // 5)
        report = produce_events(
            bootstrap,
            topic,
            events,
            malformed_fraction=malformed_fraction,
            progress=lambda n: _say(f"      produced {n:,}") if n % step == 0 else None,
            frame=frame,
        )
        _say(f"      produced {report.produced:,} in {report.elapsed_s:.1f} s; draining")
        _wait_drained(bootstrap, group, topic, report.produced, procs, log_dir)
        drained = time.monotonic() - started
        paced_from = topic_end_offsets(bootstrap, topic)
        paced_n = round(paced_rate * paced_seconds)
        _say(f"      paced: {paced_n:,} events at {paced_rate:,.0f}/s (latency is measured here)")
        promoted: list[float] = []

        def promote_v2() -> None:
            promoted.append(time.time())
            promote(store, v2)
            _say(f"      live update: champion -> {v2} (model promote, no restart)")

        halfway = threading.Timer(paced_seconds / 2, promote_v2)
        halfway.start()
        paced = produce_events(bootstrap, topic, paced_n, rate=paced_rate, seed=2, frame=frame)
        halfway.join()
        _wait_drained(bootstrap, group, topic, paced.produced, procs, log_dir)
        _say("[6/6] stopping workers (SIGTERM), reading back every prediction and dead letter")
        reports = []
        for proc, log_path in procs:
            proc.send_signal(signal.SIGTERM)
            stdout, _ = proc.communicate(timeout=60)
            if proc.returncode != 0:
                raise StreamScorerError(f"worker exited with {proc.returncode}; see {log_path}")
            reports.append(json.loads(stdout.strip().splitlines()[-1]))
        return _summary(
            bootstrap,
            (topic, out, dlq),
            group,
            (report, paced),
            paced_from,
            reports,
            drained,
            (v1, v2, promoted[0]),
        )
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if registry is not None and registry_ours:
            registry.stop()
            _say("schema registry stopped")
        if ours:
            broker.stop()
            _say("broker stopped")


def _model_store(root: Path, v1_dir: Path) -> tuple[ModelStore, str, str]:
    """A fresh model store holding v1 and v2 of the example model, ``champion`` on v1."""
    shutil.rmtree(root, ignore_errors=True)
    store = ModelStore(root, "rides")
    v1 = store.publish(v1_dir)
    v2 = store.publish(v1_dir.with_name(f"{v1_dir.name}-v2"))
    promote(store, v1)
    return store, v1, v2


def _summary(
    bootstrap: str,
    topics: tuple[str, str, str],
    group: str,
    phases: tuple[ProduceReport, ProduceReport],
    paced_from: dict[int, int],
    reports: list[dict[str, Any]],
    drained: float,
    update: tuple[str, str, float],
) -> int:
    topic, out, dlq = topics
    produced, paced = phases
    event_ts: dict[tuple[int, int], int] = {}

    def on_event(msg: Any) -> None:
        event_ts[(msg.partition(), msg.offset())] = msg.timestamp()[1]

    latencies: list[int] = []
    v1, v2, promoted_s = update
    promoted_ms = promoted_s * 1000
    by_version: Counter[str] = Counter()
    v2_at: list[int] = []  # when each v2 prediction was produced
    v1_after: list[int] = []  # v1 predictions produced after the promotion (the rollout)
    around: dict[str, list[int]] = {"earlier": [], "before": [], "swap": [], "after": []}

    def on_prediction(msg: Any) -> None:
        h = dict(msg.headers() or [])
        src = (int(h[hdr.SOURCE_PARTITION]), int(h[hdr.SOURCE_OFFSET]))
        version = h[hdr.MODEL_VERSION].decode()
        by_version[version] += 1
        at = msg.timestamp()[1]
        if version == v2:
            v2_at.append(at)
        elif at > promoted_ms:
            v1_after.append(at)
        if src[1] >= paced_from.get(src[0], 0):  # the paced phase's events only
            latency = at - event_ts[src]
            latencies.append(latency)
            sent = event_ts[src] - promoted_ms  # when its event was produced, from the promotion
            around[_window(sent)].append(latency)

    reasons: Counter[str] = Counter()

    def on_dead_letter(msg: Any) -> None:
        reasons[dict(msg.headers() or [])[hdr.REASON].decode()] += 1

    read_to_end(bootstrap, topic, on_event)
    predictions = read_to_end(bootstrap, out, on_prediction)
    read_to_end(bootstrap, dlq, on_dead_letter)
    dead = sum(reasons.values())
    lag = sum(group_lag(bootstrap, group, topic).values())
    malformed = sum(produced.malformed_by_kind.values())
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (math.nan, math.nan)
    per_worker = ", ".join(f"{r['worker_id']} {r['consumed']:,}" for r in reports)
    rows = [
        (
            "events produced",
            f"{produced.produced:,} ({produced.valid:,} valid, {malformed:,} malformed)",
        ),
        ("malformed by kind", json.dumps(produced.malformed_by_kind)),
        ("predictions published", f"{predictions:,}"),
        ("dead letters", f"{dead:,} by reason {json.dumps(dict(sorted(reasons.items())))}"),
        ("paced events", f"{paced.produced:,} at {paced.produced / paced.elapsed_s:,.0f}/s"),
        ("predictions + dead", f"{predictions + dead:,}"),
        (
            "drain rate",
            f"{produced.produced / drained:,.0f} events/s (backlog of {produced.produced:,}: "
            f"first produced -> all committed in {drained:.1f} s)",
        ),
        (
            "end-to-end latency",
            f"p50 {p50:.0f} ms, p99 {p99:.0f} ms at the paced load "
            f"(event produced -> prediction, broker timestamps)",
        ),
        ("records per worker", per_worker),
        ("predictions by model", f"v1 {v1} {by_version[v1]:,}, v2 {v2} {by_version[v2]:,}"),
        ("live update", _update_line(v2_at, v1_after, promoted_ms)),
        ("p99 around the swap", _around_line(around)),
        ("remaining lag", f"{lag:,}"),
    ]
    _say("\nsummary")
    for name, value in rows:
        _say(f"  {name:<23} {value}")
    total = produced.produced + paced.produced
    balanced = predictions + dead == total and dead == malformed and lag == 0
    stamps_ok = set(by_version) <= {v1, v2} and all(at >= promoted_ms for at in v2_at)
    if not stamps_ok:
        _say(f"FAILED: predictions stamped {sorted(by_version)}; v2 before its promotion?")
        return 1
    if balanced:
        _say("OK: every event has exactly one prediction or one dead letter, and the lag is 0")
        return 0
    _say("FAILED: predictions + dead letters != events, dead letters != malformed, or lag > 0")
    return 1


#: The paced events produced within this long after the promotion count as "during the swap".
SWAP_WINDOW_MS = 1000


def _window(sent_ms: float) -> str:
    """Which window an event produced ``sent_ms`` after the promotion falls in."""
    if sent_ms < -SWAP_WINDOW_MS:
        return "earlier"
    if sent_ms < 0:
        return "before"
    return "swap" if sent_ms < SWAP_WINDOW_MS else "after"


def _update_line(v2_at: list[int], v1_after: list[int], promoted_ms: float) -> str:
    """Alias moved -> first v2 prediction, and -> the last v1 one (every worker swapped)."""
    if not v2_at:
        return "v2 promoted, but no prediction by v2"
    first = min(v2_at) - promoted_ms
    last_v1 = (max(v1_after) - promoted_ms) if v1_after else 0.0
    return (
        f"alias moved -> first prediction by v2 {first:.0f} ms, last by v1 {last_v1:.0f} ms "
        f"(model.refresh_s = {DEMO_REFRESH_S})"
    )


def _around_line(around: dict[str, list[int]]) -> str:
    """The paced events' p99 latency around the promotion (``_window``)."""
    parts = []
    for name, values in around.items():
        p99 = f"{np.percentile(values, 99):.0f} ms" if values else "-"
        parts.append(f"{name} {p99} ({len(values):,})")
    return ", ".join(parts) + " (events produced earlier / 1 s before / 1 s after / later)"
