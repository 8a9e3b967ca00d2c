"""``stream-scorer bench --soak``: one worker under a steady load for minutes, its memory over time.

One ``stream-scorer run`` worker (default settings, the example configuration, the bench's local
broker and example model) is fed at a fixed rate for ``--soak-seconds``, with a fraction of
malformed records (the example's kinds, taken in turn) so that dead letters flow the whole time.
Every ``--soak-interval`` seconds the worker's current resident memory (``VmRSS``), its
high-water mark, its predictions and dead letters so far and its consumer lag (from its metrics
endpoint) are sampled. At the end the worker is stopped with SIGTERM and both output topics are
read back: every produced event must be there, as a prediction or (malformed ones only) as a
dead letter, else ``SoakError``; malformed events the model's value policies let through are
counted. The samples and a summary (RSS after the warm-up, slope by least squares) go to a JSON
file and a markdown section in the bench results folder.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from statistics import fmean
from typing import Any

from stream_scorer.clients import produce_retrying, read_to_end
from stream_scorer.errors import StreamScorerError

WARMUP_S = 60.0
_POOL = 10_000  # pre-encoded events the producer cycles through (keys stay unique)
_print = partial(print, flush=True)


class SoakError(StreamScorerError):
    """The soak failed: an event was lost, a valid one dead-lettered, or the worker failed."""


@dataclass(frozen=True, slots=True)
class Sample:
    """The worker at one moment: seconds since the feed started, memory and progress."""

    t_s: float
    rss_mib: float
    peak_rss_mib: float
    produced: int
    predictions: int
    dead_letters: int
    lag: int


def rss_mib(pid: int) -> float:
    """A process's current resident memory (``VmRSS``), in MiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def metric_totals(port: int) -> dict[str, float]:
    """A worker's Prometheus samples summed over their labels (e.g. every dead-letter reason)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def slope_mib_per_min(samples: Sequence[Sample]) -> float:
    """Least-squares slope of RSS against time over ``samples``, MiB per minute (0 if flat)."""
    if len(samples) < 2:
        return 0.0
    mt, mr = fmean(s.t_s for s in samples), fmean(s.rss_mib for s in samples)
    var = sum((s.t_s - mt) ** 2 for s in samples)
    cov = sum((s.t_s - mt) * (s.rss_mib - mr) for s in samples)
    return cov / var * 60.0 if var else 0.0


def summarize(samples: Sequence[Sample], warmup_s: float = WARMUP_S) -> dict[str, Any]:
    """RSS first/last/min/max and slope over the samples after ``warmup_s`` (all if none)."""
    after = [s for s in samples if s.t_s >= warmup_s] or list(samples)
    rss = [s.rss_mib for s in after]
    return {
        "warmup_s": warmup_s,
        "samples_after_warmup": len(after),
        "rss_first_mib": round(rss[0], 1) if rss else 0.0,
        "rss_last_mib": round(rss[-1], 1) if rss else 0.0,
        "rss_min_mib": round(min(rss), 1) if rss else 0.0,
        "rss_max_mib": round(max(rss), 1) if rss else 0.0,
        "peak_rss_mib": round(max((s.peak_rss_mib for s in samples), default=0.0), 1),
        "slope_mib_per_min": round(slope_mib_per_min(after), 4),
    }


def markdown(samples: Sequence[Sample], summary: Mapping[str, Any], every_s: float = 60.0) -> str:
    """The curve as a markdown table (one row per ``every_s``, and the last sample), then totals."""
    last = len(samples) - 1
    rows = [
        s
        for i, s in enumerate(samples)
        if i in (0, last) or s.t_s // every_s > samples[i - 1].t_s // every_s
    ]
    lines = [
        "| time | RSS MiB | peak RSS MiB | produced | predictions | dead letters | lag |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in rows:
        lines.append(
            f"| {int(s.t_s) // 60}:{int(s.t_s) % 60:02d} | {s.rss_mib:.1f} | {s.peak_rss_mib:.1f} "
            f"| {s.produced:,} | {s.predictions:,} | {s.dead_letters:,} | {s.lag:,} |"
        )
    g = summary.get
    lines += [
        "",
        f"RSS after the first {g('warmup_s', 0):.0f} s ({g('samples_after_warmup', 0)} samples): "
        f"first {g('rss_first_mib')}, last {g('rss_last_mib')}, min {g('rss_min_mib')}, "
        f"max {g('rss_max_mib')} MiB; peak (VmHWM) {g('peak_rss_mib')} MiB. "
        f"Slope (least squares): **{g('slope_mib_per_min', 0.0):+.3f} MiB per minute**.",
    ]
    if "produced" in summary:
        lines.append(
            f"Events produced: {g('produced'):,} at {g('rate_reached'):,.0f} events/s "
            f"({g('malformed'):,} malformed); read back: {g('predictions'):,} predictions + "
            f"{g('dead_letters'):,} dead letters, {g('missing'):,} missing, "
            f"{g('duplicates'):,} duplicates, {g('malformed_scored'):,} malformed scored, "
            f"{g('valid_dead_lettered'):,} valid dead-lettered; "
            f"worker exit code {g('worker_exit_code')}."
        )
    return "\n".join(lines) + "\n"


def _pool(size: int, malformed: float, seed: int = 1) -> tuple[list[bytes | None], list[bool]]:
    """``size`` example events, ``malformed`` of them malformed (kinds in turn, random places)."""
    import numpy as np

    from stream_scorer.example.produce import MALFORMED_KINDS, RideEncoder
    from stream_scorer.example.rides import generate_columns, to_records

    rng = np.random.default_rng(seed)
    rides = to_records(generate_columns(size, seed))
    bad = sorted(int(i) for i in rng.choice(size, round(size * malformed), replace=False))
    kinds = {i: MALFORMED_KINDS[j % len(MALFORMED_KINDS)] for j, i in enumerate(bad)}
    enc = RideEncoder()
    values = [
        enc.encode(r) if i not in kinds else enc.malformed(kinds[i], r, rng)
        for i, r in enumerate(rides)
    ]
    return values, [i in kinds for i in range(size)]


class _Feeder(threading.Thread):
    """Produces the pool in a loop at ``rate`` until ``until``; keys are 0, 1, 2, ..."""

    def __init__(
        self, bootstrap: str, topic: str, pool: list[bytes | None], partitions: int, rate: float
    ) -> None:
        from confluent_kafka import Producer

        super().__init__(daemon=True)
        self.args, self.until = (topic, pool, partitions, rate), 0.0
        self.produced, self.failed, self.seconds = 0, 0, 0.0
        lost = self._lost = [0]  # not self: no reference cycle keeps the producer alive

        def failed(_err: Any, _msg: Any) -> None:  # called for failed deliveries only
            lost[0] += 1

        only_errors = {"delivery.report.only.error": True, "on_delivery": failed}
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **only_errors})

    def run(self) -> None:
        topic, pool, partitions, rate = self.args
        producer = self.producer
        tick, step, started = threading.Event(), max(1, int(rate) // 500), time.monotonic()
        i = 0
        while time.monotonic() < self.until:
            value, key = pool[i % len(pool)], b"%d" % i
            produce_retrying(producer, topic, value, key=key, partition=i % partitions)
            i += 1
            self.produced = i
            if i % step == 0:
                producer.poll(0)
                tick.wait(max(0.0, started + i / rate - time.monotonic()))
        self.failed = producer.flush(120) + self._lost[0]
        self.seconds = time.monotonic() - started  # set last: 0 means the thread failed


def _read_back(
    bootstrap: str, topics: Sequence[str], produced: int, bad: Sequence[bool]
) -> list[tuple[int, int, int]]:
    """Per topic: distinct events seen, duplicates, and how many of those were malformed."""
    seen = bytearray(produced)
    out = []
    for topic in topics:
        counts = [0, 0, 0]

        def count(msg: Any, counts: list[int] = counts, topic: str = topic) -> None:
            k = int(msg.key())
            if not 0 <= k < produced:
                raise SoakError(f"{topic} holds key {k}, never produced")
            counts[seen[k]] += 1
            counts[2] += not seen[k] and bad[k % len(bad)]
            seen[k] = 1

        read_to_end(bootstrap, topic, count, timeout_s=300)
        out.append((counts[0], counts[1], counts[2]))
    return out


@dataclass(frozen=True, slots=True)
class SoakSettings:
    """How long, how fast, how many malformed events, how often to sample; the warm-up."""

    seconds: float = 600.0
    rate: float = 10_000.0
    malformed: float = 0.01
    interval: float = 10.0
    partitions: int = 8
    warmup_s: float = WARMUP_S


def soak(
    bootstrap: str, model: Path, cfg: SoakSettings, say: Callable[[str], None] = _print
) -> tuple[list[Sample], dict[str, Any]]:
    """Run the soak on ``bootstrap`` with ``model``; return the samples and the summary."""
    from stream_scorer.devtools import benchkafka as bk
    from stream_scorer.kafka.topics import ensure_topics

    pool, bad = _pool(_POOL, cfg.malformed)
    base = f"soak-{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}"
    topics = (f"{base}-in", f"{base}-out", f"{base}-dlq")
    ensure_topics(bootstrap, {topics[0]: cfg.partitions, topics[1]: cfg.partitions, topics[2]: 1})
    workers = bk.Workers(bootstrap, topics, model, 1, 1)
    feeder = _Feeder(bootstrap, topics[0], pool, cfg.partitions, cfg.rate)
    samples: list[Sample] = []
    try:
        workers.wait_assigned()
        pid, port = workers.procs[0].pid, workers.ports[0]

        def sample(t: float) -> Sample:
            m = metric_totals(port)
            s = Sample(
                round(t, 1),
                round(rss_mib(pid), 1),
                round(bk.peak_rss_mb(pid), 1),
                feeder.produced,
                int(m.get("stream_scorer_predictions_produced_total", 0)),
                int(m.get("stream_scorer_dead_letters_total", 0)),
                int(m.get("stream_scorer_consumer_lag_records", 0)),
            )
            say(f"soak: {s.t_s:6.0f} s  RSS {s.rss_mib:7.1f} MiB  {s.predictions:,} predictions")
            return s

        start = time.monotonic()
        feeder.until = start + cfg.seconds
        feeder.start()
        wait, k = threading.Event(), 0
        while k * cfg.interval <= cfg.seconds:
            wait.wait(max(0.0, start + k * cfg.interval - time.monotonic()))
            if workers.procs[0].poll() is not None or not feeder.is_alive():
                break
            samples.append(sample(time.monotonic() - start))
            k += 1
        feeder.join()
        if not feeder.seconds or feeder.failed:
            raise SoakError(f"the producer failed ({feeder.failed} events not acknowledged)")
        workers.measure(feeder.produced, timeout=600)  # until every event is acknowledged
        samples.append(sample(time.monotonic() - start))
    finally:
        feeder.until = 0.0  # stops the producer if the soak ended early
        workers.stop()
    n = feeder.produced
    (pred, pred_dup, scored_bad), (dead, dead_dup, dead_bad) = _read_back(
        bootstrap, topics[1:], n, bad
    )
    summary = summarize(samples, cfg.warmup_s) | {
        "seconds": cfg.seconds,
        "rate": cfg.rate,
        "rate_reached": round(n / max(feeder.seconds, 1e-9)),
        "produced": n,
        "malformed": n // len(pool) * sum(bad) + sum(bad[: n % len(pool)]),
        "predictions": pred,
        "dead_letters": dead,
        "missing": n - pred - dead,
        "malformed_scored": scored_bad,  # the model's value policies let them through
        "valid_dead_lettered": dead - dead_bad,
        "duplicates": pred_dup + dead_dup,
        "worker_exit_code": workers.procs[0].returncode,
    }
    return samples, summary


def run_soak(
    cfg: SoakSettings,
    *,
    port: int = 39192,
    out_dir: Path = Path("bench-results"),
    bootstrap: str | None = None,
    model: Path | None = None,
    say: Callable[[str], None] = _print,
) -> dict[str, Any]:
    """Run the soak (on the bench's local broker unless ``bootstrap``), write JSON and markdown.

    Raises:
        SoakError: an event is missing from both output topics, the dead letters are not
            exactly the malformed events, or the worker did not exit with 0 on SIGTERM (the
            results are written first).
    """
    from stream_scorer.devtools.bench import _machine, ensure_example_model
    from stream_scorer.devtools.localkafka import LocalKafka, default_cache_dir

    cache = default_cache_dir()
    broker = None
    if bootstrap is None:
        broker = LocalKafka(cache / f"bench-broker-{port}", port=port, log=say)
        running = broker.status()
        bootstrap = broker.start()
        if running is not None and running.answering:
            broker = None  # it was running already: leave it so
    try:
        model = model or ensure_example_model(cache / "bench-models" / "100x6")
        say(f"soak: {cfg.seconds:.0f} s at {cfg.rate:,.0f} events/s, {cfg.malformed:.1%} malformed")
        samples, summary = soak(bootstrap, model, cfg, say)
    finally:
        if broker is not None:
            broker.stop()
    body = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "summary": summary,
        "samples": [asdict(s) for s in samples],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    name = out_dir / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    name.with_suffix(".json").write_text(json.dumps(body, indent=2) + "\n")
    text = markdown(samples, summary)
    name.with_suffix(".md").write_text(text)
    say(text + f"\nsoak: results in {name}.json and .md")
    s = summary
    if s["missing"] or s["valid_dead_lettered"] or s["worker_exit_code"] != 0:
        raise SoakError(
            f"soak accounting failed: {s['missing']} of {s['produced']} events missing, "
            f"{s['valid_dead_lettered']} valid events dead-lettered, "
            f"worker exit code {s['worker_exit_code']}"
        )
    return body
