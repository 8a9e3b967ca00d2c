"""``stream-scorer bench``: how fast the worker is, next to the Kafka ceiling and a naive loop.

Without a broker, ``profile_stages`` times the pure pipeline per stage (decode, features,
predict, encode and the producer's enqueue, µs per record) and ``profile_fast_path`` the parts
of the fast path. ``run_bench`` (the command) does the rest on a local Kafka broker
(``stream_scorer.devtools.localkafka``), all on the shipped example: it preloads N events over 8
partitions and measures, one after the other on the same topic (a new group each time):

- **ceiling**: consume bytes, produce the same bytes, commit: Kafka I/O from Python, no work;
- **naive**: per message, fastavro decode, a one-row feature matrix, ``inplace_predict``,
  fastavro encode, produce (the tutorial loop; it runs over at most ``--naive-events``);
- **stream-scorer** with 1 and 2 worker processes (``stream-scorer run``, default settings),
  with the example model and a larger one (500 trees, depth 8), and with ``model.nthread`` 2.

Throughput is events from the first one consumed until every output is acknowledged. Latency
is measured apart, at 50% of each mode's measured maximum: pre-encoded events are produced at
that rate for ``--latency-seconds`` while the mode runs; latency is the output's broker append
time (the output topics use ``LogAppendTime``) minus its input's create time (matched by key),
p50 and p99 of the events after the first ``WARMUP_S`` (steady state; the p99 of every event
is reported too). Peak RSS is each process's high-water mark. Results go to a JSON file and a
markdown table.
"""

from __future__ import annotations

import json
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from stream_scorer.config import Config, load_config
from stream_scorer.devtools import benchkafka as bk
from stream_scorer.stages.records import PlainMessage
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.sink import Sink, SinkContext

EXAMPLE_CONFIG = bk.EXAMPLE_CONFIG
STAGES = bk.STAGES
#: The first seconds of each latency run are left out of p50/p99: when a stream starts, its
#: first ~300 ms of events wait up to ~200 ms more (docs/manual/benchmarks.md, "Latency").
WARMUP_S = 1.0


def example_payloads(n: int, seed: int = 1) -> list[bytes]:
    """Return ``n`` valid example events as schemaless Avro."""
    from stream_scorer.example.produce import RideEncoder
    from stream_scorer.example.rides import generate_columns, to_records

    encoder = RideEncoder()
    return [encoder.encode(r) for r in to_records(generate_columns(n, seed))]


def example_config(model_dir: Path, **sections: dict[str, Any]) -> Config:
    """The shipped example's configuration with ``model.path`` set to ``model_dir``."""
    overrides: dict[str, Any] = {"model": {"path": str(model_dir)}, "metrics": {"port": 0}}
    for name, values in sections.items():
        overrides[name] = {**overrides.get(name, {}), **values}
    return load_config(EXAMPLE_CONFIG, environ={}, overrides=overrides)


def ensure_example_model(model_dir: Path, *, trees: int = 100, depth: int = 6) -> Path:
    """Train the example model into ``model_dir`` unless an up-to-date one is there.

    A cached model whose manifest lists other features (names, fields, bounds or value
    policies) than today's example, or has no reference bins (drift), e.g. one trained by an
    older version, is trained again.
    """
    from stream_scorer.contracts.manifest import read_manifest
    from stream_scorer.errors import ModelError
    from stream_scorer.example.rides import FEATURES
    from stream_scorer.example.train import train

    try:
        manifest = read_manifest(model_dir)
        current = tuple(manifest.features) == tuple(FEATURES) and bool(manifest.reference)
    except ModelError:  # none yet, or unreadable
        current = False
    if not current:
        train(model_dir, n_estimators=trees, max_depth=depth)
    return model_dir


def _stage_sums(metrics: Metrics) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        value = metrics.prometheus.get_sample_value(
            "stream_scorer_stage_duration_seconds_sum", {"stage": stage}
        )
        out[stage] = float(value or 0.0)
    return out


def profile_stages(
    cfg: Config, payloads: Sequence[bytes], *, batch: int = 1000, rounds: int = 3
) -> dict[str, float]:
    """Run the pure pipeline and the sink's enqueue over ``payloads``; µs per record per stage.

    Nothing reaches a broker: the producer points at a closed port with a queue large enough
    for every record, and is purged at the end. The best of ``rounds`` passes is kept (the
    machine is shared; the minimum is the least disturbed).
    """
    from stream_scorer.worker.loop import build_pipeline

    messages = [PlainMessage(v, k=b"k", o=i, ts=1) for i, v in enumerate(payloads)]
    best: dict[str, float] = {}
    for _ in range(rounds):
        metrics = Metrics()
        pipeline, scorer = build_pipeline(cfg, metrics)
        producer = Producer(
            {
                "bootstrap.servers": "127.0.0.1:9",
                "queue.buffering.max.messages": str(2 * len(messages) + 10),
                "queue.buffering.max.kbytes": str(2_000_000),
                "log_level": "0",
            }
        )
        ctx = SinkContext("out", "dead", cfg.input.group_id, "bench", scorer.model_version)
        sink = Sink(producer, ctx, OffsetTracker(), metrics)
        for start in range(0, len(messages), batch):
            result = pipeline.process(messages[start : start + batch])
            t0 = time.perf_counter()
            sink.publish(result.scored, result.dead)
            metrics.observe_stage("produce", time.perf_counter() - t0)
        producer.purge()
        producer.flush(0)
        sums = _stage_sums(metrics)
        for stage, seconds in sums.items():
            per = seconds / len(messages) * 1e6
            best[stage] = min(best.get(stage, per), per)
    return {k: round(v, 3) for k, v in best.items()}


def profile_fast_path(
    cfg: Config, payloads: Sequence[bytes], *, batch: int = 1000
) -> dict[str, float]:
    """Time the fast path's parts over ``payloads`` in batches, µs per record (best of 15).

    ``kernel``: gathering the bytes and the compiled decode into the matrix; ``columns``: the
    rest of ``FastColumns.run`` (feature policies, dead letters, id and event-time columns).
    """
    from stream_scorer.contracts.manifest import read_manifest
    from stream_scorer.fast.path import FastColumns
    from stream_scorer.stages.decode import load_schema

    fast = FastColumns(
        load_schema(cfg.input.schema),
        read_manifest(cfg.first.model.directory).features,
        id_field=cfg.input.id_field,
        event_time_field=cfg.input.event_time_field,
        max_message_bytes=cfg.input.max_message_bytes,
    )
    msgs = [PlainMessage(v, o=i) for i, v in enumerate(payloads)]
    chunks = [msgs[i : i + batch] for i in range(0, len(msgs), batch)]

    def best(step: Callable[[list[PlainMessage]], Any]) -> float:
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            for chunk in chunks:
                step(chunk)
            times.append(time.perf_counter() - t0)
        return min(times) / len(msgs) * 1e6

    kernel = best(fast.decode)
    run = best(fast.run)
    return {
        "kernel": round(kernel, 3),
        "columns": round(run - kernel, 3),
        "total": round(run, 3),
        "first_call_s": round(fast.warmup_s, 3),
    }


def profile_framed(
    cfg: Config, payloads: Sequence[bytes], registry_url: str, *, batch: int = 1000
) -> dict[str, float]:
    """Framed input (Confluent wire format) against the stock deserializer, µs per record.

    The example's ride schema (v1) is registered on the registry at ``registry_url``; the same
    events, framed with its id, go through (best of 7 passes over batches of ``batch``):

    - ``schemaless_fast``: the fast path on the bare bodies (today's input), decode + features;
    - ``framed_fast``: ``FramedColumns`` on the framed values, reader = writer (decode +
      features; the writer schema is fetched once, before timing);
    - ``framed_fast_evolved``: the same, read with the evolved reader (v2: int->long, a field
      added with a default, one dropped);
    - ``stock_deserializer``: confluent-kafka's ``AvroDeserializer`` per record (decode only,
      its default settings), and ``stock_evolved`` with the v2 reader schema;
    - ``stock_deserializer_plus_features``: that, then the feature builder over the records.
    """
    import json as _json

    from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    from stream_scorer.contracts.manifest import read_manifest
    from stream_scorer.example.rides import RIDE_SCHEMA_PATH, evolved_ride_schemas
    from stream_scorer.fast.framed import build_framed_columns
    from stream_scorer.fast.path import FastColumns
    from stream_scorer.registry import RegistryClient
    from stream_scorer.stages.decode import load_schema
    from stream_scorer.stages.features import FeatureBuilder
    from stream_scorer.stages.framing import frame_key

    features = read_manifest(cfg.first.model.directory).features
    reader_v1 = load_schema(cfg.input.schema)
    v2_text = _json.dumps(evolved_ride_schemas()["v2"])
    v1_text = _json.dumps(_json.loads(RIDE_SCHEMA_PATH.read_text(encoding="utf-8")))
    client = RegistryClient(registry_url)
    subject = f"bench-rides-{int(time.time() * 1000)}-value"
    schema_id = client.register(subject, v1_text)
    frame = b"\x00" + schema_id.to_bytes(4, "big")
    bodies = [PlainMessage(v, o=i) for i, v in enumerate(payloads)]
    framed = [PlainMessage(frame + v, o=i) for i, v in enumerate(payloads)]

    def chunks(msgs: list[PlainMessage]) -> list[list[PlainMessage]]:
        return [msgs[i : i + batch] for i in range(0, len(msgs), batch)]

    def best(
        step: Callable[[list[PlainMessage]], Any], msgs: list[PlainMessage], n: int = 7
    ) -> float:
        parts = chunks(msgs)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            for chunk in parts:
                step(chunk)
            times.append(time.perf_counter() - t0)
        return min(times) / len(msgs) * 1e6

    kw: dict[str, Any] = {
        "id_field": cfg.input.id_field,
        "event_time_field": cfg.input.event_time_field,
        "max_message_bytes": cfg.input.max_message_bytes,
    }
    fast = FastColumns(reader_v1, features, **kw)
    out = {"schemaless_fast": best(fast.run, bodies)}
    for name, reader in (("framed_fast", reader_v1), ("framed_fast_evolved", None)):
        if reader is None:
            import fastavro

            parsed = fastavro.parse_schema(_json.loads(v2_text))
            assert isinstance(parsed, dict)
            reader = parsed
        cols = build_framed_columns(reader, features, **kw)
        key = frame_key(framed[0])
        assert isinstance(key, tuple)
        cols.learn(key, client.writer_schema(key))
        cols.run(framed[:1])
        assert cols.plan_kind(key) == "fast", cols.plan_kind(key)
        out[name] = best(cols.run, framed)
    builder = FeatureBuilder(features)
    with SchemaRegistryClient({"url": registry_url}) as sr:
        plain = AvroDeserializer(sr)
        evolved = AvroDeserializer(sr, schema_str=Schema(v2_text, "AVRO"))
        for name, deser in (("stock_deserializer", plain), ("stock_evolved", evolved)):
            ctx = SerializationContext("bench", MessageField.VALUE)

            def stock(chunk: list[PlainMessage], d: Any = deser, c: Any = ctx) -> list[Any]:
                return [d(m.val, c) for m in chunk]

            stock(framed[:1])
            out[name] = best(stock, framed, n=3)

            def stock_features(chunk: list[PlainMessage], d: Any = deser, c: Any = ctx) -> Any:
                return builder.build([d(m.val, c) for m in chunk])

            if name == "stock_deserializer":
                out["stock_deserializer_plus_features"] = best(stock_features, framed, n=3)
    return {k: round(v, 3) for k, v in out.items()}


# --- on a broker --------------------------------------------------------------------------
@dataclass
class ModeResult:
    """One measured configuration (see the module docstring for how)."""

    mode: str
    model: str
    processes: int = 1
    nthread: int = 1
    events: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    peak_rss_mib: list[float] = field(default_factory=list)
    stages_us: dict[str, float] = field(default_factory=dict)
    latency_rate: float = 0.0
    latency_events: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p99_all_ms: float | None = None


@dataclass
class _Run:
    bootstrap: str
    name: str
    partitions: int
    payloads: list[bytes]
    latency_s: float
    say: Callable[[str], None]
    count: int = 0

    def topics(self, what: str) -> tuple[str, str, str]:
        from stream_scorer.kafka.topics import ensure_topics

        self.count += 1
        slug = "".join(c if c.isalnum() else "-" for c in what).strip("-")
        base = f"bench-{self.name}-{self.count}-{slug}"
        inp, out, dlq = f"{base}-in", f"{base}-out", f"{base}-dlq"
        ensure_topics(self.bootstrap, {inp: self.partitions})
        append_time = {"message.timestamp.type": "LogAppendTime"}
        ensure_topics(self.bootstrap, {out: self.partitions, dlq: 1}, config=append_time)
        return inp, out, dlq

    def feed(self, topic: str, payloads: Sequence[bytes]) -> threading.Thread:
        thread = threading.Thread(
            target=bk.burst, args=(self.bootstrap, topic, payloads, self.partitions), daemon=True
        )
        thread.start()
        return thread

    def paced(self, topic: str, rate: float) -> tuple[int, float]:
        """Feed a latency run at ``rate``: how many events, and the rate reached."""
        n = max(100, min(int(rate * self.latency_s), len(self.payloads)))
        return n, bk.paced(self.bootstrap, topic, self.payloads[:n], self.partitions, rate)

    def client(self, res: ModeResult, model: Path, payloads: Sequence[bytes]) -> None:
        inp, out, _dlq = self.topics(res.mode)
        args: dict[str, Any] = {"bootstrap": self.bootstrap, "topic": inp, "out": out}
        args["group"] = f"{inp}-g"
        args.update(model=str(model), limit=len(payloads), idle_s=30)
        proc = bk.start_client(res.mode.split()[0], args)
        self.feed(inp, payloads).join()
        got = bk.client_result(proc)
        res.events, res.seconds = got["events"], got["seconds"]
        res.events_per_s = round(res.events / max(res.seconds, 1e-9))
        res.peak_rss_mib, res.stages_us = [round(got["rss"], 1)], got["stages"]

    def client_latency(self, res: ModeResult, model: Path) -> None:
        inp, out, _dlq = self.topics(res.mode + "-lat")
        rate = res.events_per_s / 2
        args: dict[str, Any] = {"bootstrap": self.bootstrap, "topic": inp, "out": out}
        args["group"] = f"{inp}-g"
        limit = max(100, min(int(rate * self.latency_s), len(self.payloads)))
        args.update(model=str(model), limit=limit, idle_s=30)
        proc = bk.start_client(res.mode.split()[0], args)
        _n, reached = self.paced(inp, rate)
        bk.client_result(proc)
        self._percentiles(res, inp, out, reached)

    def workers(
        self, res: ModeResult, model: Path, latency: bool, env: Mapping[str, str] | None = None
    ) -> None:
        topics = self.topics(f"scorer{res.processes}")
        workers = bk.Workers(self.bootstrap, topics, model, res.processes, res.nthread, env)
        try:
            workers.wait_assigned()
            feeder = self.feed(topics[0], self.payloads)
            res.seconds, res.events, res.stages_us = workers.measure(len(self.payloads))
            feeder.join()
            res.events_per_s = round(res.events / max(res.seconds, 1e-9))
            res.peak_rss_mib = workers.peak_rss()
        finally:
            workers.stop()
        if not latency:
            return
        topics = self.topics(f"scorer{res.processes}-lat")
        workers = bk.Workers(self.bootstrap, topics, model, res.processes, res.nthread, env)
        try:
            workers.wait_assigned()
            n, reached = self.paced(topics[0], res.events_per_s / 2)
            workers.measure(n)
            peaks = zip(res.peak_rss_mib, workers.peak_rss(), strict=True)
            res.peak_rss_mib = [max(a, b) for a, b in peaks]
        finally:
            workers.stop()
        self._percentiles(res, topics[0], topics[1], reached)

    def _percentiles(self, res: ModeResult, inp: str, out: str, rate: float) -> None:
        everything = bk.latencies(self.bootstrap, inp, out)
        lat = everything[int(rate * WARMUP_S) :] if len(everything) > 2 * rate * WARMUP_S else []
        res.latency_rate, res.latency_events = round(rate), len(lat)
        if lat:
            p50, p99 = np.percentile(lat, [50, 99])
            res.p50_ms, res.p99_ms = round(float(p50), 1), round(float(p99), 1)
            res.p99_all_ms = round(float(np.percentile(everything, 99)), 1)


def run_bench(
    *,
    events: int,
    partitions: int = 8,
    port: int = 39192,
    naive_events: int = 20_000,
    latency_seconds: float = 10.0,
    out_dir: Path = Path("bench-results"),
    say: Callable[[str], None] = print,
    drift_pairs: int = 2,
    only_drift: bool = False,
) -> list[ModeResult]:
    """Run every mode on a local broker; write JSON and markdown into ``out_dir``.

    Then ``drift_pairs`` times one process of the example model with drift off, then on
    (``drift.enabled``; the model carries reference bins), side by side on the same broker;
    ``only_drift``: those pairs and the ceiling only.
    """
    from stream_scorer.devtools.localkafka import LocalKafka, default_cache_dir

    cache = default_cache_dir()
    broker = LocalKafka(cache / f"bench-broker-{port}", port=port, log=say)
    running = broker.status()
    ours = running is None or not running.answering
    bootstrap = broker.start()
    try:
        models = {
            "example (100 trees, depth 6)": ensure_example_model(cache / "bench-models" / "100x6"),
            "large (500 trees, depth 8)": ensure_example_model(
                cache / "bench-models" / "500x8", trees=500, depth=8
            ),
        }
        example, large = models.values()
        names = list(models)
        say(f"bench: encoding {events:,} example events")
        payloads = example_payloads(events)
        run = _Run(
            bootstrap, time.strftime("%Y%m%d%H%M%S"), partitions, payloads, latency_seconds, say
        )
        results = []
        ceiling = ModeResult("ceiling (passthrough)", "-")
        say("bench: ceiling")
        run.client(ceiling, example, payloads)
        naive = ModeResult("naive (per message)", names[0])
        if not only_drift:
            run.client_latency(ceiling, example)
            say("bench: naive")
            run.client(naive, example, payloads[:naive_events])
            run.client_latency(naive, example)
        if only_drift:
            results.append(ceiling)
            models = {}
        else:
            results += [ceiling, naive]
        for name, model in models.items():
            for processes, nthread in ((1, 1), (2, 1), (1, 2)):
                res = ModeResult("stream-scorer", name, processes, nthread)
                say(f"bench: stream-scorer, {name}, {processes} process(es), nthread {nthread}")
                with_latency = nthread == 1 and model == example
                run.workers(res, model, with_latency)
                results.append(res)
        del large
        for pair in range(drift_pairs):
            for on in (False, True):
                res = ModeResult(f"stream-scorer, drift {'on' if on else 'off'}", names[0])
                say(f"bench: drift {'on' if on else 'off'} ({pair + 1}/{drift_pairs})")
                env = {"STREAM_SCORER_DRIFT__ENABLED": "true" if on else "false"}
                run.workers(res, example, False, env)
                results.append(res)
        _write(results, out_dir, events=events, partitions=partitions, say=say)
        return results
    finally:
        if ours:
            broker.stop()


def _machine() -> dict[str, Any]:
    import confluent_kafka
    import xgboost

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(__import__("os").sched_getaffinity(0)),
        "python": platform.python_version(),
        "librdkafka": confluent_kafka.libversion()[0],
        "xgboost": xgboost.__version__,
        "kernel": platform.release(),
    }


def markdown(results: Sequence[ModeResult]) -> str:
    """The results as a markdown table (ratios against the first two rows)."""
    ceiling = next((r.events_per_s for r in results if r.mode.startswith("ceiling")), 0)
    naive = next((r.events_per_s for r in results if r.mode.startswith("naive")), 0)
    head = (
        "| mode | model | processes | xgb threads | events | events/s | x naive | % of ceiling "
        "| p50 ms | p99 ms | p99 incl. warm-up | at events/s | peak RSS MiB | decode | features "
        "| predict | encode | produce | drift |\n|" + "---|" * 19
    )
    rows = [head]
    for r in results:
        stages = " | ".join(f"{r.stages_us.get(s, 0):.2f}" for s in (*STAGES, "drift"))
        rows.append(
            f"| {r.mode} | {r.model} | {r.processes} | {r.nthread} | {r.events:,} "
            f"| {r.events_per_s:,} | {r.events_per_s / naive if naive else 0:.1f} "
            f"| {100 * r.events_per_s / ceiling if ceiling else 0:.0f}% "
            f"| {'-' if r.p50_ms is None else r.p50_ms} | {'-' if r.p99_ms is None else r.p99_ms} "
            f"| {'-' if r.p99_all_ms is None else r.p99_all_ms} | {r.latency_rate or '-'} "
            f"| {', '.join(str(x) for x in r.peak_rss_mib)} | {stages} |"
        )
    return "\n".join(rows) + "\n"


def _write(
    results: Sequence[ModeResult],
    out_dir: Path,
    *,
    events: int,
    partitions: int,
    say: Callable[[str], None],
) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    body = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "events": events,
        "partitions": partitions,
        "results": [asdict(r) for r in results],
    }
    (out_dir / f"bench-{stamp}.json").write_text(json.dumps(body, indent=2) + "\n")
    table = markdown(results)
    (out_dir / f"bench-{stamp}.md").write_text(table)
    say(table)
    say(f"bench: results in {out_dir / f'bench-{stamp}.json'} and .md")
