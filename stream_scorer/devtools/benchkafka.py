"""The broker side of ``stream-scorer bench``: the measured loops and how they are fed.

Every mode reads its own input topic and is *fed after it has joined its group* (all its
partitions assigned), so that no measurement includes start-up or a rebalance: the ceiling and
naive loops run in a child process (``python -m stream_scorer.devtools.benchkafka``) that prints
``ready`` once assigned; the workers are ``stream-scorer run`` processes whose metrics endpoint
says when they are assigned and how far they got.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer

from stream_scorer.clients import produce_retrying, read_to_end
from stream_scorer.example.files import cached_example
from stream_scorer.kafka.topics import ensure_topics
from stream_scorer.stages.features import field_getter
from stream_scorer.worker.supervisor import run_command

STAGES = ("decode", "features", "predict", "encode", "produce")
#: Where ``paced`` warms up its producer's connection before its clock starts.
WARMUP_TOPIC = "stream-scorer-bench-warmup"
#: The example's configuration (written into the cache; its model path is always overridden).
EXAMPLE_CONFIG = cached_example()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss_mb(pid: int) -> float:
    """The high-water mark of a process's resident memory (``VmHWM``), in MiB; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def scrape(port: int) -> dict[tuple[str, str], float]:
    """A worker's Prometheus samples: (name, stage label) to value; {} if it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {
        (s.name, s.labels.get("stage", "")): float(s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def produce_event(producer: Any, topic: str, i: int, value: bytes, partitions: int) -> None:
    """Produce event ``i`` (key ``i``, round-robin partition), waiting while the queue is full."""
    produce_retrying(producer, topic, value, key=b"%d" % i, partition=i % partitions)


def flushed(producer: Any, topic: str) -> None:
    """Wait for every acknowledgement; raise if the broker did not give them all."""
    if producer.flush(120):
        raise RuntimeError(f"the broker did not acknowledge every event for {topic}")


def burst(bootstrap: str, topic: str, payloads: Sequence[bytes], partitions: int) -> None:
    """Produce pre-encoded ``payloads`` round-robin over ``partitions``, as fast as possible."""
    producer = Producer(
        {"bootstrap.servers": bootstrap, "linger.ms": "20", "batch.size": "1000000"}
    )
    for i, value in enumerate(payloads):
        produce_event(producer, topic, i, value, partitions)
        if i % 1000 == 0:
            producer.poll(0)
    flushed(producer, topic)


# --- the ceiling and naive loops (child process) -------------------------------------------
def client_loop(args: dict[str, Any]) -> dict[str, Any]:
    """Consume, work (nothing, or the naive per-message work), produce, commit.

    Prints ``ready`` once the consumer is assigned; stops after ``limit`` events, or when
    nothing came for ``idle_s`` seconds. Returns events, seconds (first event consumed to
    every output acknowledged), peak RSS in MiB and µs per event of each timed stage.
    """
    naive = args["mode"] == "naive"
    consumer = Consumer(
        {
            "bootstrap.servers": args["bootstrap"],
            "group.id": args["group"],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": "true",
        }
    )
    producer = Producer(
        {
            "bootstrap.servers": args["bootstrap"],
            "enable.idempotence": "true",
            "acks": "all",
            "linger.ms": "5",
        }
    )
    stages = dict.fromkeys(STAGES, 0.0)
    step: Callable[[Any], bytes] = _naive_step(args, stages) if naive else _passthrough

    def assigned(_consumer: Any, _partitions: Any) -> None:
        print("ready", flush=True)

    consumer.subscribe([args["topic"]], on_assign=assigned)
    limit, idle_s = int(args["limit"]), float(args["idle_s"])
    count, first, last_seen = 0, 0.0, time.monotonic()
    try:
        while count < limit and time.monotonic() - last_seen < idle_s:
            for msg in consumer.consume(1 if naive else 1000, 0.1):
                if msg.error():
                    continue
                first = first or time.perf_counter()
                value = step(msg)
                t0 = time.perf_counter()
                produce_retrying(producer, args["out"], value, key=msg.key())
                producer.poll(0)
                stages["produce"] += time.perf_counter() - t0
                count += 1
                last_seen = time.monotonic()
        producer.flush(60)
        done = time.perf_counter()
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()
    return {
        "events": count,
        "seconds": done - first if first else 0.0,
        # VmHWM: Linux keeps ru_maxrss across fork and exec, so it would report the parent's
        "rss": peak_rss_mb(os.getpid()),
        "stages": {k: round(v / max(1, count) * 1e6, 3) for k, v in stages.items() if v},
    }


def _passthrough(msg: Any) -> bytes:
    value: bytes = msg.value()
    return value


def _naive_step(args: dict[str, Any], stages: dict[str, float]) -> Callable[[Any], bytes]:
    """The tutorial loop's work for one message: decode, one-row predict, encode."""
    import fastavro
    import xgboost as xgb

    from stream_scorer.config import load_config
    from stream_scorer.contracts.manifest import read_manifest
    from stream_scorer.stages.decode import load_schema
    from stream_scorer.stages.encode import PredictionEncoder
    from stream_scorer.stages.features import FeatureBuilder

    cfg = load_config(EXAMPLE_CONFIG, environ={}, overrides={"model": {"path": args["model"]}})
    schema = load_schema(cfg.input.schema)
    manifest = read_manifest(cfg.first.model.directory)
    booster = xgb.Booster(model_file=str(cfg.first.model.directory / manifest.model_file))
    booster.set_param({"nthread": 1})
    features = FeatureBuilder(manifest.features)
    encoder = PredictionEncoder(load_schema(cfg.first.output.schema))
    get_id = field_getter(cfg.input.id_field)
    get_time = field_getter(cfg.input.event_time_field)

    def step(msg: Any) -> bytes:
        t0 = time.perf_counter()
        record: Any = fastavro.schemaless_reader(io.BytesIO(msg.value()), schema, None)
        t1 = time.perf_counter()
        row, _rejected = features.build([record])
        t2 = time.perf_counter()
        value = float(booster.inplace_predict(row)[0])
        t3 = time.perf_counter()
        when = get_time(record)
        millis = int(when.timestamp() * 1000) if hasattr(when, "timestamp") else 0
        version = manifest.model_version
        out = encoder.encode(
            str(get_id(record)), value, None, version, millis, int(time.time() * 1000)
        )
        t4 = time.perf_counter()
        for name, took in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=False):
            stages[name] += took
        return out

    return step


def start_client(mode: str, args: dict[str, Any]) -> subprocess.Popen[str]:
    """Start the ``mode`` loop in a child process and wait until it is assigned."""
    cmd = [
        sys.executable,
        "-m",
        "stream_scorer.devtools.benchkafka",
        json.dumps({**args, "mode": mode}),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the {mode} loop did not start (said {line!r})")
    return proc


def client_result(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for a loop started by ``start_client``; return what it measured."""
    out, _ = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"a bench loop exited with {proc.returncode}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


# --- stream-scorer workers ------------------------------------------------------------------
class Workers:
    """``n`` worker processes on one input topic, watched through their metrics endpoints."""

    def __init__(
        self,
        bootstrap: str,
        topics: tuple[str, str, str],
        model: Path,
        n: int,
        nthread: int,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        """Start the workers (``stream-scorer run`` on the example configuration).

        ``extra_env``: more ``STREAM_SCORER_*`` settings (e.g. drift off).
        """
        inp, out, dlq = topics
        self.ports = [free_port() for _ in range(n)]
        env = {
            **os.environ,
            "STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "STREAM_SCORER_INPUT__TOPIC": inp,
            "STREAM_SCORER_INPUT__GROUP_ID": f"{inp}-group",
            "STREAM_SCORER_OUTPUT__TOPIC": out,
            "STREAM_SCORER_DEAD_LETTER__TOPIC": dlq,
            "STREAM_SCORER_MODEL__PATH": str(model),
            "STREAM_SCORER_MODEL__NTHREAD": str(nthread),
            **(extra_env or {}),
        }
        self.procs = [
            subprocess.Popen(
                run_command(EXAMPLE_CONFIG, "--metrics-port", str(port), log_level="WARNING"),
                env=env,
                stdout=subprocess.DEVNULL,
            )
            for port in self.ports
        ]

    def _samples(self) -> list[dict[tuple[str, str], float]]:
        if any(p.poll() is not None for p in self.procs):
            raise RuntimeError("a bench worker exited early (run it by hand to see why)")
        return [scrape(port) for port in self.ports]

    def wait_assigned(self, timeout: float = 120.0) -> None:
        """Return once every worker has partitions."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self._samples()
            if all(s.get(("stream_scorer_assigned_partitions", ""), 0) > 0 for s in samples):
                return
            time.sleep(0.1)  # polling the workers' metrics endpoints
        raise RuntimeError("the bench workers were not all assigned partitions in time")

    def measure(
        self, expected: int, timeout: float = 3600.0
    ) -> tuple[float, int, dict[str, float]]:
        """Wait until ``expected`` events are consumed and every output acknowledged.

        Returns seconds from the first sample with progress, the events done in that time, and
        µs per event of each stage (the workers' own stage timers).
        """
        start, base = 0.0, 0.0
        samples: list[dict[tuple[str, str], float]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            samples = self._samples()
            now = time.perf_counter()
            done = sum(s.get(("stream_scorer_records_consumed_total", ""), 0) for s in samples)
            if not start and done > 0:
                start, base = now, done
            busy = sum(s.get(("stream_scorer_in_flight_records", ""), 1) for s in samples)
            if done >= expected and busy == 0:
                break
            time.sleep(0.1)  # sampling interval (each scrape costs the worker ~1.5 ms)
        else:
            raise RuntimeError(f"the workers did not finish {expected} events in time")
        stages = {}
        for stage in STAGES:
            total = sum(
                s.get(("stream_scorer_stage_duration_seconds_sum", stage), 0.0) for s in samples
            )
            stages[stage] = round(total / expected * 1e6, 3)
        drift = sum(
            s.get(("stream_scorer_stage_duration_seconds_sum", "drift"), 0.0) for s in samples
        )
        stages["drift"] = round(drift / expected * 1e6, 3)
        return time.perf_counter() - start, int(expected - base), stages

    def peak_rss(self) -> list[float]:
        """Each worker's peak resident memory so far, in MiB."""
        return [round(peak_rss_mb(p.pid), 1) for p in self.procs]

    def stop(self) -> None:
        """SIGTERM every worker and wait for it."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=90)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def latencies(bootstrap: str, inp: str, out: str) -> list[float]:
    """Per output record: its broker append time minus its input's create time, in ms.

    Inputs and outputs are matched by key (every mode keeps the input's key; ``burst`` and
    ``paced`` give event ``i`` the key ``i``), and the list is in event order.
    """
    created: dict[bytes | None, int] = {}
    lat: list[tuple[int, float]] = []

    def output(m: Any) -> None:
        lat.append((int(m.key()), float(m.timestamp()[1] - created[m.key()])))

    read_to_end(
        bootstrap, inp, lambda m: created.__setitem__(m.key(), m.timestamp()[1]), timeout_s=300
    )
    read_to_end(bootstrap, out, output, timeout_s=300)
    return [ms for _i, ms in sorted(lat)]


def paced(
    bootstrap: str, topic: str, payloads: Sequence[bytes], partitions: int, rate: float
) -> float:
    """Produce ``payloads`` at ``rate`` events/s (keys 0, 1, ...); return the rate reached."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": "5"})
    # learn the topic's leaders and open the connection that produces (a first produce request
    # on a new connection took ~100 ms here) before the first event's create time starts the
    # clock: a few records to a topic of their own, acknowledged
    producer.list_topics(topic=topic, timeout=30)
    ensure_topics(bootstrap, {WARMUP_TOPIC: 1})
    for _ in range(10):
        produce_retrying(producer, WARMUP_TOPIC, b"warm-up")
    producer.flush(30)
    tick = threading.Event()  # never set: its wait() paces production
    step = max(1, int(rate) // 500)
    started = time.monotonic()
    for i, value in enumerate(payloads):
        produce_event(producer, topic, i, value, partitions)
        if i % step == 0:
            producer.poll(0)
            tick.wait(max(0.0, started + (i + 1) / rate - time.monotonic()))
    elapsed = time.monotonic() - started
    flushed(producer, topic)
    return len(payloads) / max(elapsed, 1e-9)


if __name__ == "__main__":
    print(json.dumps(client_loop(json.loads(sys.argv[1]))), flush=True)
