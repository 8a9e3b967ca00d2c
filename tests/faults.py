"""Fault-injection harness: real worker processes, a real broker, faults, an independent check.

A run streams ``events`` example ride events (unique keys, with poison of many kinds mixed in)
over 4 partitions at a steady rate while 3 ``stream-scorer run`` processes score them and a
fault is injected mid-stream. Like an orchestrator, the harness restarts a worker that exits
unexpectedly. When the group has committed everything, the workers are stopped and an
independent ``read_committed`` reader compares the output and dead-letter topics with the input.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from support import committed_offsets, produce_raw, read_topic, wait_for

from stream_scorer import headers as hdr
from stream_scorer.example.produce import EXPECTED_DEAD_LETTERS, MALFORMED_KINDS, RideEncoder
from stream_scorer.example.rides import generate_rides
from stream_scorer.ops.topics import ensure_topics, group_lag

ROOT = Path(__file__).parents[1]
PARTITIONS = 4
WORKERS = 3
MAX_MESSAGE_BYTES = 4096
#: Poison kinds: the example generator's malformed kinds plus one the harness makes itself.
POISON_KINDS = (*MALFORMED_KINDS, "too_large")
EXPECTED_REASON = {k: reason for k, (_stage, reason) in EXPECTED_DEAD_LETTERS.items()}
EXPECTED_REASON["too_large"] = "too_large"


def make_events(n: int, poison_every: int, seed: int) -> list[tuple[bytes, bytes | None, str]]:
    """Return ``(key, value, kind)``; ``kind`` is ``""`` for a valid event, else the poison kind.

    Every ``poison_every``-th event is poison, cycling through ``POISON_KINDS``.
    """
    rides = generate_rides(n, seed=seed)
    enc = RideEncoder()
    rng = random.Random(seed)
    out: list[tuple[bytes, bytes | None, str]] = []
    for i, ride in enumerate(rides):
        if i % poison_every == poison_every - 1:
            kind = POISON_KINDS[(i // poison_every) % len(POISON_KINDS)]
            key = f"poison-{kind}-{i}".encode()
            value: bytes | None
            if kind == "too_large":
                value = enc.encode(ride) + bytes(MAX_MESSAGE_BYTES)
            else:
                value = enc.malformed(kind, ride)
            out.append((key, value, kind))
        else:
            out.append((f"{ride['ride_id']}-{i}".encode(), enc.encode(ride), ""))
    rng.shuffle(out)
    return out


@dataclass
class Worker:
    """One ``stream-scorer run`` process and where its output goes."""

    wid: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Outcome:
    """What the independent reader found."""

    mode: str
    fault: str
    events: int
    valid: int
    lost: int
    duplicated: int
    dead_letters_expected: int
    dead_letters_found: int
    dead_letter_mismatches: int
    aborted_records: int
    poison_kinds: int
    unexpected_exits: list[str] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """One line for the test log and the closing note."""
        return (
            f"{self.mode:14} {self.fault:16} events={self.events} valid={self.valid} "
            f"lost={self.lost} duplicated={self.duplicated} "
            f"dead_letters={self.dead_letters_found}/{self.dead_letters_expected} "
            f"poison_kinds={self.poison_kinds} "
            f"dl_mismatch={self.dead_letter_mismatches} aborted_records={self.aborted_records} "
            f"unexpected_exits={len(self.unexpected_exits)} {' '.join(self.notes)}"
        )


class FaultRun:
    """Workers, topics and the event stream of one run."""

    def __init__(
        self,
        bootstrap: str,
        workdir: Path,
        model_dir: Path,
        *,
        mode: str,
        name: str,
        events: int,
        rate: float,
        poison_every: int = 90,
    ) -> None:
        """Create the topics and the worker configuration."""
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.mode = mode
        self.name = name
        suffix = f"{name}-{mode}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.topic, self.out, self.dlq = f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}"
        self.group = f"grp-{suffix}"
        ensure_topics(bootstrap, {self.topic: PARTITIONS, self.out: PARTITIONS, self.dlq: 1})
        self.items = make_events(events, poison_every, seed=len(name))
        self.rate = rate
        self.workers: dict[str, Worker] = {}
        self.unexpected: list[str] = []
        self.expected_exit: set[str] = set()
        self.commits_at_kills: list[dict[int, int]] = []
        self._starts = Counter[str]()
        self._producer_error: list[BaseException] = []
        self._producer: threading.Thread | None = None
        raw = {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "statistics_interval_ms": 1000,
                "unreachable_timeout_s": 90,
                "consumer": {
                    "session.timeout.ms": "6000",
                    "heartbeat.interval.ms": "1000",
                    "max.poll.interval.ms": "8000",
                },
            },
            "input": {
                "topic": self.topic,
                "group_id": self.group,
                "schema": str(ROOT / "schemas" / "ride_request.v1.avsc"),
                "id_field": "ride_id",
                "event_time_field": "requested_at",
                "max_message_bytes": MAX_MESSAGE_BYTES,
            },
            "output": {"topic": self.out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
            "dead_letter": {"topic": self.dlq},
            "model": {"path": str(model_dir)},
            "batch": {"max_records": 500, "max_wait_ms": 20, "max_processing_s": 2},
            "worker": {"shutdown_timeout_s": 20},
            "metrics": {"port": 0},
            "delivery": {"mode": mode, "transaction_timeout_s": 20},
        }
        self.config = workdir / f"{name}-{mode}.yaml"
        self.config.write_text(yaml.safe_dump(raw))

    # --- workers ---------------------------------------------------------------------------
    def start(self, wid: str, worker_id: str | None = None) -> Worker:
        """Start (or restart) worker ``wid``; its stdout and stderr go to a log file.

        ``worker_id`` (default ``wid``) is the worker id it runs with.
        """
        self._starts[wid] += 1
        log = self.workdir / f"{self.name}-{self.mode}-{wid}-{self._starts[wid]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "stream_scorer",
                    "run",
                    "--config",
                    str(self.config),
                    "--worker-id",
                    worker_id or wid,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONWARNINGS": "error"},
            )
        worker = Worker(wid, proc, log)
        self.workers[wid] = worker
        return worker

    def start_all(self) -> None:
        """Start the workers ``w0`` … ``w2``."""
        for i in range(WORKERS):
            self.start(f"w{i}")

    def supervise(self) -> None:
        """Restart any worker that exited without being told to (an orchestrator's job)."""
        for wid, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None or wid in self.expected_exit:
                continue
            self.unexpected.append(f"{wid} exit {code}: {tail(worker.log)}")
            self.start(wid)

    def kill9(self, wid: str) -> None:
        """SIGKILL ``wid``, wait for it to be gone, snapshot committed offsets, restart it."""
        proc = self.workers[wid].proc
        self.expected_exit.add(wid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self.commits_at_kills.append(self.committed())
        self.expected_exit.discard(wid)
        self.start(wid)

    def terminate(self, wid: str, timeout: float = 60) -> int:
        """SIGTERM ``wid`` (once started) and wait for its exit code."""
        self.wait_started(wid)
        proc = self.workers[wid].proc
        self.expected_exit.add(wid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=timeout)
        return code

    def committed(self) -> dict[int, int]:
        """The group's committed offset per input partition (negative when none)."""
        return committed_offsets(self.bootstrap, self.group, self.topic)

    # --- the stream ------------------------------------------------------------------------
    def produce_in_background(self, first: int = 0, stop: int | None = None) -> None:
        """Produce the events (``items[first:stop]``) at ``rate`` per second in a thread.

        ``first`` must be a multiple of the partition count, so that every event lands in the
        partition it would have landed in had all been produced at once (round robin).
        """
        assert first % PARTITIONS == 0, first
        items = [(k, v) for k, v, _kind in self.items[first:stop]]

        def run() -> None:
            try:
                produce_raw(self.bootstrap, self.topic, items, PARTITIONS, per_second=self.rate)
            except BaseException as exc:  # reported by wait_produced
                self._producer_error.append(exc)

        self._producer = threading.Thread(target=run, daemon=True)
        self._producer.start()

    @property
    def producing(self) -> bool:
        """Whether the producer thread is still running."""
        return self._producer is not None and self._producer.is_alive()

    def wait_produced(self, timeout: float = 120) -> None:
        """Wait for the producer thread; re-raise its failure."""
        assert self._producer is not None
        self._producer.join(timeout)
        assert not self._producer.is_alive(), "the producer did not finish"
        if self._producer_error:
            raise self._producer_error[0]

    def wait_committed(self, timeout: float = 120) -> None:
        """Supervise the workers until the group has committed every input record."""

        def done() -> bool:
            self.supervise()
            lag = group_lag(self.bootstrap, self.group, self.topic)
            return len(lag) == PARTITIONS and sum(lag.values()) == 0

        wait_for(done, timeout, f"group {self.group} committed everything", interval=0.5)

    def wait_started(self, wid: str, timeout: float = 60) -> None:
        """Wait until worker ``wid`` has started (its first log line) or exited.

        A SIGTERM that arrives while the interpreter itself is still starting, before any
        handler can be installed, ends the process with -15; an orchestrator would see the same.
        The harness stops only workers that have started, so the exit codes it checks are the
        workers' own.
        """
        worker = self.workers[wid]

        def started() -> bool:
            return worker.proc.poll() is not None or "consumer settings" in _read(worker.log)

        wait_for(started, timeout, f"worker {wid} started")

    def stop_all(self) -> dict[str, int]:
        """SIGTERM every worker (once started); return their exit codes."""
        codes = {}
        for wid in self.workers:
            self.wait_started(wid)
        for wid, worker in self.workers.items():
            if worker.proc.poll() is None:
                self.expected_exit.add(wid)
                worker.proc.send_signal(signal.SIGTERM)
        for wid, worker in self.workers.items():
            codes[wid] = worker.proc.wait(timeout=60)
        return codes

    def kill_all(self) -> None:
        """Clean up after a failed test: SIGKILL whatever still runs."""
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(timeout=30)

    def aborted_records(self) -> int:
        """Output records written in aborted transactions so far (uncommitted view - committed)."""
        everything = len(read_topic(self.bootstrap, self.out, isolation="read_uncommitted"))
        return everything - len(read_topic(self.bootstrap, self.out))

    # --- verification ----------------------------------------------------------------------
    def verify(self) -> Outcome:
        """Compare outputs and dead letters with the input, as an independent reader."""
        inputs = {(m.partition(), m.offset()): m for m in read_topic(self.bootstrap, self.topic)}
        kinds = {k: kind for k, _v, kind in self.items}
        valid = {tp for tp, m in inputs.items() if not kinds[m.key()]}
        poison = {tp for tp, m in inputs.items() if kinds[m.key()]}

        preds = read_topic(self.bootstrap, self.out)
        pred_count = Counter(_source(m, PREDICTION_SOURCE) for m in preds)
        dead = read_topic(self.bootstrap, self.dlq)
        dead_count = Counter(_source(m, DEAD_LETTER_SOURCE) for m in dead)
        mismatches = 0
        for m in dead:
            original = inputs.get(_source(m, DEAD_LETTER_SOURCE))
            if original is None or (original.key(), original.value()) != (m.key(), m.value()):
                mismatches += 1
                continue
            reason = dict(m.headers() or [])[hdr.REASON].decode()
            if reason != EXPECTED_REASON[kinds[original.key()]]:
                mismatches += 1
        uncommitted_view = len(read_topic(self.bootstrap, self.out, isolation="read_uncommitted"))
        lost = sum(1 for tp in valid if pred_count[tp] == 0)
        dups = [tp for tp, c in pred_count.items() for _ in range(c - 1)]
        dups += [tp for tp, c in dead_count.items() for _ in range(c - 1)]
        stray = sum(c for tp, c in pred_count.items() if tp not in valid)
        stray += sum(c for tp, c in dead_count.items() if tp not in poison)
        outcome = Outcome(
            mode=self.mode,
            fault=self.name,
            events=len(inputs),
            valid=len(valid),
            lost=lost + sum(1 for tp in poison if dead_count[tp] == 0),
            duplicated=len(dups),
            dead_letters_expected=len(poison),
            dead_letters_found=len(dead),
            dead_letter_mismatches=mismatches + stray,
            poison_kinds=len({kinds[inputs[tp].key()] for tp in poison}),
            aborted_records=uncommitted_view - len(preds),
            unexpected_exits=list(self.unexpected),
            duplicates=dups,
        )
        return outcome


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


#: The headers naming an output's input record: a prediction's, a dead letter's.
PREDICTION_SOURCE = (hdr.SOURCE_PARTITION, hdr.SOURCE_OFFSET)
DEAD_LETTER_SOURCE = (hdr.CONNECT_PARTITION, hdr.CONNECT_OFFSET)


def _source(msg: Any, names: tuple[str, str]) -> tuple[int, int]:
    headers = dict(msg.headers() or [])
    return int(headers[names[0]]), int(headers[names[1]])


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a worker's log, for failure messages."""
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def recovery_s(run: FaultRun, timeout: float = 180) -> tuple[float, float]:
    """Seconds from now (the broker answers again) until the group commits again.

    Returns ``(first, every)``: until any partition's committed offset moves, and until every
    partition's has (or it has nothing left to consume). Measured, never asserted. The
    baseline is the first committed offsets read from now on, so a commit that lands before
    that read (a very fast recovery) is not seen: the figures err long by at most the read's
    duration plus one batch, never short.
    """
    start = time.monotonic()
    baseline = run.committed()
    first: list[float] = []

    def moved() -> bool:
        run.supervise()
        now = run.committed()
        still = {p for p, o in baseline.items() if now.get(p, o) <= o}
        if len(still) < len(baseline) and not first:
            first.append(time.monotonic() - start)
        if still and not run.producing:  # a partition with nothing left to do has recovered
            still -= {
                p for p, lag in group_lag(run.bootstrap, run.group, run.topic).items() if not lag
            }
        return not still

    wait_for(moved, timeout, "every partition committed after the broker came back", interval=0.1)
    every = time.monotonic() - start
    return (first[0] if first else every), every


def when_committed(run: FaultRun, fraction: float, timeout: float = 120) -> None:
    """Supervise until the group has committed ``fraction`` of the run's events.

    Faults are injected on progress, not on a clock: at a fraction below 1 the stream is still
    going, so each fault hits a group that is working.
    """
    target = int(fraction * len(run.items))

    def reached() -> bool:
        run.supervise()
        return sum(max(0, o) for o in run.committed().values()) >= target

    wait_for(reached, timeout, f"{target} records committed", interval=0.2)
