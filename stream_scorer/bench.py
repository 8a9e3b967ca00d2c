"""``stream-scorer bench``: how fast the worker is, next to the Kafka ceiling and a naive loop.

Part one (no broker): the per-stage profile of the pure pipeline on the shipped example —
decode, features, predict, encode and the producer's enqueue — in microseconds per record.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from stream_scorer.config import Config, load_config
from stream_scorer.metrics import Metrics
from stream_scorer.offsets import OffsetTracker
from stream_scorer.sink import Sink, SinkContext

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = ROOT / "deploy" / "config" / "rides.yaml"
STAGES = ("decode", "features", "predict", "encode", "produce")


@dataclass(slots=True)
class BenchMessage:
    """A consumed record without Kafka: what the pipeline reads from a message."""

    val: bytes | None
    k: bytes | None = None
    p: int = 0
    o: int = 0
    ts: int = 0
    t: str = "bench"
    hdrs: list[tuple[str, bytes | None]] = field(default_factory=list)

    def topic(self) -> str:
        """The topic."""
        return self.t

    def partition(self) -> int:
        """The partition."""
        return self.p

    def offset(self) -> int:
        """The offset."""
        return self.o

    def key(self) -> bytes | None:
        """The key."""
        return self.k

    def value(self) -> bytes | None:
        """The value."""
        return self.val

    def headers(self) -> list[tuple[str, bytes | None]]:
        """The headers."""
        return self.hdrs

    def timestamp(self) -> tuple[int, int]:
        """(create time, milliseconds)."""
        return (1, self.ts)


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
    """Train the example model into ``model_dir`` unless a manifest is already there."""
    from stream_scorer.example.train import train
    from stream_scorer.manifest import MANIFEST_FILE

    if not (model_dir / MANIFEST_FILE).is_file():
        train(model_dir, n_estimators=trees, max_depth=depth)
    return model_dir


def _stage_sums(metrics: Metrics) -> dict[str, float]:
    out = {}
    for stage in STAGES:
        value = metrics.registry.get_sample_value(
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
    from stream_scorer.app import build_pipeline

    messages = [BenchMessage(v, k=b"k", o=i, ts=1) for i, v in enumerate(payloads)]
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
