"""Fault-injection harness: real worker processes, a real broker, faults, an independent check.

A run streams ``events`` example ride events (unique keys, with poison of many kinds mixed in)
over 4 partitions at a steady rate while 3 ``stream-scorer run`` processes score them and a
fault is injected mid-stream. Like an orchestrator, the harness restarts a worker that exits
unexpectedly. When the group has committed everything, the workers are stopped and an
independent ``read_committed`` reader compares the output and dead-letter topics with the input.

At-least-once may repeat a record only because of a fault: each fault (and each unexpected exit)
opens a ``FaultWindow`` per input partition, from the group's committed offset read just before
the fault to the partition's high watermark right after it (to the one once the group has
settled, if a worker logged a refused commit or lost partitions meanwhile). Every duplicate
must lie in some window (``check_duplicates``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from confluent_kafka import ConsumerGroupState, Node, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported, no __all__
    ConsumerGroupDescription,
    MemberAssignment,
    MemberDescription,
)
from prometheus_client.parser import text_string_to_metric_families
from support import (
    committed_offsets,
    free_ports,
    high_watermarks,
    produce_raw,
    read_topic,
    wait_for,
)

from stream_scorer import headers as hdr
from stream_scorer.example.produce import (
    EXPECTED_DEAD_LETTERS,
    MALFORMED_KINDS,
    RideEncoder,
    confluent_frame,
)
from stream_scorer.example.rides import generate_rides
from stream_scorer.kafka.topics import ensure_topics, group_lag
from stream_scorer.stages.records import Reason
from stream_scorer.worker.supervisor import run_command

T = TypeVar("T")

ROOT = Path(__file__).parents[1]
PARTITIONS = 4
WORKERS = 3
MAX_MESSAGE_BYTES = 4096
#: The workers' consumer settings by default: the group evicts a killed or stopped worker fast.
SHORT_SESSIONS = {
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "1000",
    "max.poll.interval.ms": "8000",
}
#: Poison kinds: the example generator's malformed kinds plus one the harness makes itself.
POISON_KINDS = (*MALFORMED_KINDS, "too_large")
EXPECTED_REASON = {k: reason for k, (_stage, reason) in EXPECTED_DEAD_LETTERS.items()}
EXPECTED_REASON["too_large"] = Reason.TOO_LARGE


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
    worker_id: str

    @property
    def client_id(self) -> str:
        """The client id its consumer joins the group with."""
        return f"stream-scorer-{self.worker_id}"


#: What a worker logs when a rebalance makes it leave records uncommitted: a revoke commit the
#: broker refused (librdkafka#3306), partitions lost (another member owns them already).
REFUSAL_LOG_LINES = ("commit failed (records will be redelivered)", '"lost [')


@dataclass
class FaultWindow:
    """The input records one fault may make an at-least-once group process again.

    Per input partition, from ``committed``, the group's committed offset read just before the
    fault (at most what was committed when it hit), to the partition's high watermark right
    after the fault (``at_fault``: a killed worker cannot have consumed beyond it). A rebalance
    the fault causes can leave a surviving worker's records uncommitted too, but only when a
    revoke commit is refused or partitions are lost (librdkafka#3306); when a worker logged
    that between the fault and the group settling (``refusals``), the window extends to the
    high watermark once the group had settled (``settled``: rebalances over, every partition
    assigned to a live worker; None until then).
    """

    what: str
    committed: dict[int, int]
    at_fault: dict[int, int] | None = None  # None: unknown (the broker did not answer)
    settled: dict[int, int] | None = None
    refusals: int = 0
    logged_before: int = 0  # refusal lines in the run's logs when the window opened

    @property
    def end(self) -> dict[int, int] | None:
        """The high watermarks that end the window; None while the group has not settled."""
        if self.settled is None:
            return None
        return self.settled if self.refusals or self.at_fault is None else self.at_fault

    def holds(self, partition: int, offset: int) -> bool:
        """Whether the record at ``offset`` of ``partition`` lies in the window."""
        end = self.end
        if end is None:
            return False
        return self.committed.get(partition, -1) <= offset < end.get(partition, 0)

    @property
    def records(self) -> int:
        """How many input records the window spans (0 while open)."""
        end = self.end or {}
        return sum(h - max(0, self.committed.get(p, 0)) for p, h in end.items())


def unexplained(
    duplicates: list[tuple[int, int]], windows: list[FaultWindow]
) -> list[tuple[int, int]]:
    """The duplicated ``(partition, offset)`` inputs that lie in no fault's window."""
    return [(p, o) for p, o in duplicates if not any(w.holds(p, o) for w in windows)]


def check_duplicates(duplicates: list[tuple[int, int]], windows: list[FaultWindow]) -> None:
    """At-least-once: every duplicate was consumed but uncommitted when some fault hit.

    Raises:
        AssertionError: a window never closed, or a duplicate lies outside every window.
    """
    still_open = [w.what for w in windows if w.end is None]
    assert not still_open, f"the group never settled after {still_open}"
    outside = unexplained(duplicates, windows)
    assert not outside, (
        f"{len(outside)} of {len(duplicates)} duplicates lie in no fault's window: "
        f"{outside[:20]}; windows (what, committed before, end, refusals): "
        f"{[(w.what, w.committed, w.end, w.refusals) for w in windows]}"
    )


def settled(
    group: ConsumerGroupDescription,
    topic: str,
    partitions: int,
    live: int,
    gone: frozenset[str] = frozenset(),
) -> bool:
    """Whether a group has settled: stable, one member per ``live`` worker, none of ``gone``
    (the member ids of workers the fault took away) and every partition of ``topic`` assigned.
    """
    if group.state != ConsumerGroupState.STABLE or len(group.members) != live:
        return False
    if any(m.member_id in gone for m in group.members):
        return False
    assigned = {
        tp.partition
        for m in group.members
        for tp in m.assignment.topic_partitions
        if tp.topic == topic
    }
    return assigned == set(range(partitions))


#: Describes a group in a child process and prints it as JSON (see ``describe_isolated``).
_DESCRIBE = """
import json, sys
from confluent_kafka.admin import AdminClient
from stream_scorer.kafka.topics import describe_group
group = describe_group(AdminClient({"bootstrap.servers": sys.argv[1]}), sys.argv[2])
print(json.dumps(None if group is None else {
    "state": group.state.name,
    "members": [
        [m.member_id, m.client_id, [[p.topic, p.partition] for p in m.assignment.topic_partitions]]
        for m in group.members
    ],
}))
"""


def describe_isolated(bootstrap: str, group: str) -> ConsumerGroupDescription | None:
    """The group's description, asked for in a child process (None: not to be had now).

    While a broker restarts, librdkafka can abort the whole process when a DescribeGroups
    response arrives after its request timed out (librdkafka#4605, open; seen here in the
    broker kill -9 run): the harness asks from a child that may die instead of itself.
    """
    try:
        done = subprocess.run(
            [sys.executable, "-c", _DESCRIBE, bootstrap, group],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None
    if done.returncode != 0:
        return None
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    if raw is None:
        return None
    members = [
        MemberDescription(
            member_id, client_id, "", MemberAssignment([TopicPartition(t, p) for t, p in tps])
        )
        for member_id, client_id, tps in raw["members"]
    ]
    return ConsumerGroupDescription(
        group,
        False,
        members,
        "",
        ConsumerGroupState[raw["state"]],
        Node(-1, "", -1),
    )


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
        model: dict[str, Any] | None = None,
        registry: str = "",
        transaction_timeout_s: float = 20,
        metrics: bool = False,
        consumer: dict[str, str] | None = None,
    ) -> None:
        """Create the topics and the worker configuration.

        ``model``: the workers' ``model`` section (default: ``path`` = ``model_dir``). With
        ``registry`` (a Confluent-compatible URL) the input is framed: the ride schema is
        registered under ``<topic>-value`` and every value (poison too) carries its id.
        ``transaction_timeout_s``: ``delivery.transaction_timeout_s``. With ``metrics`` each
        worker serves its metrics on a port of its own (``metrics_ports``, kept across restarts).
        ``consumer``: the workers' ``kafka.consumer`` settings (default: sessions of 6 s and a
        poll interval of 8 s, so that the group evicts a killed or stopped worker quickly).
        """
        self.bootstrap = bootstrap
        self.workdir = workdir
        self.mode = mode
        self.name = name
        suffix = f"{name}-{mode}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.topic, self.out, self.dlq = f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}"
        self.group = f"grp-{suffix}"
        ensure_topics(bootstrap, {self.topic: PARTITIONS, self.out: PARTITIONS, self.dlq: 1})
        self.items = make_events(events, poison_every, seed=len(name))
        if registry:
            frame = confluent_frame(registry, self.topic)
            self.items = [(k, None if v is None else frame + v, kind) for k, v, kind in self.items]
        self.rate = rate
        self.workers: dict[str, Worker] = {}
        self.unexpected: list[str] = []
        self.expected_exit: set[str] = set()
        #: One per fault and per unexpected exit: what at-least-once may repeat because of it.
        self.windows: list[FaultWindow] = []
        self._watchers: list[threading.Thread] = []
        # set once the workers are stopped: watchers of windows that never settled stop asking
        # (each ask is a child process; left polling, they piled up across tests)
        self._closed = threading.Event()
        self._last_committed: dict[int, int] = {}  # the latest committed() read
        self._alive_committed: dict[int, int] = {}  # read before every worker was seen running
        self._starts = Counter[str]()
        self._producer_error: list[BaseException] = []
        self._producer: threading.Thread | None = None
        #: How many events the finished ``produce_in_background`` calls produced.
        self.produced = 0
        self._metrics = metrics
        #: Worker ``wid`` → the port its metrics are served on (with ``metrics``).
        self.metrics_ports: dict[str, int] = {}
        raw = {
            "kafka": {
                "bootstrap_servers": bootstrap,
                "statistics_interval_ms": 1000,
                "unreachable_timeout_s": 90,
                "consumer": SHORT_SESSIONS if consumer is None else consumer,
            },
            "input": {
                "topic": self.topic,
                "group_id": self.group,
                "schema": str(ROOT / "schemas" / "ride_request.v1.avsc"),
                "id_field": "ride_id",
                "event_time_field": "requested_at",
                "max_message_bytes": MAX_MESSAGE_BYTES,
                "format": "confluent" if registry else "schemaless",
            },
            "output": {"topic": self.out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
            "dead_letter": {"topic": self.dlq},
            "model": model or {"path": str(model_dir)},
            **({"registry": {"url": registry, "unavailable_timeout_s": 6}} if registry else {}),
            "batch": {"max_records": 500, "max_wait_ms": 20, "max_processing_s": 2},
            "worker": {"shutdown_timeout_s": 20},
            "metrics": {"port": 0},
            "delivery": {"mode": mode, "transaction_timeout_s": transaction_timeout_s},
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
        extra: list[str] = []
        if self._metrics:
            if wid not in self.metrics_ports:
                (self.metrics_ports[wid],) = free_ports(1)
            extra = ["--metrics-port", str(self.metrics_ports[wid])]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                run_command(self.config, "--worker-id", worker_id or wid, *extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONWARNINGS": "error"},
            )
        worker = Worker(wid, proc, log, worker_id or wid)
        self.workers[wid] = worker
        return worker

    def start_all(self) -> None:
        """Start the workers ``w0`` … ``w2``."""
        for i in range(WORKERS):
            self.start(f"w{i}")

    def supervise(self) -> None:
        """Restart any worker that exited without being told to (an orchestrator's job).

        The exit opens a fault window from the committed offsets read before the previous
        check that saw every worker running: the worker died after that read.
        """
        for wid, worker in list(self.workers.items()):
            code = worker.proc.poll()
            if code is None or wid in self.expected_exit:
                continue
            self.unexpected.append(f"{wid} exit {code}: {tail(worker.log)}")
            window = FaultWindow(f"{wid} exited {code}", self._alive_committed)
            window.logged_before = self.refusals_logged()
            gone = self._member_ids(worker)
            with contextlib.suppress(Exception):  # the broker may be down: then unknown
                window.at_fault = high_watermarks(self.bootstrap, self.topic)
            self.start(wid)
            self.settle(window, gone)
        self._alive_committed = self._last_committed

    def until(
        self,
        value: Callable[[], T | None],
        what: str,
        timeout_s: float = 120,
        explain: Callable[[], object] | None = None,
    ) -> T:
        """Supervise the run until ``value()`` is not None; return it.

        ``explain``: what to add to the ``TimeoutError`` (e.g. the workers' log lines).
        """
        got: list[T] = []

        def ready() -> bool:
            self.supervise()
            found = value()
            if found is not None:
                got.append(found)
            return bool(got)

        try:
            wait_for(ready, timeout_s, what)
        except TimeoutError:
            if explain is None:
                raise
            raise TimeoutError(f"{what}: {explain()}") from None
        return got[0]

    def open_window(self, what: str) -> FaultWindow:
        """Read the committed offsets for a fault about to be injected: call right before it."""
        window = FaultWindow(what, self.committed(), logged_before=self.refusals_logged())
        self.windows.append(window)
        return window

    def refusals_logged(self) -> int:
        """How many refused commits and lost partitions the run's workers logged so far."""
        logs = self.workdir.glob(f"{self.name}-{self.mode}-*.log")
        return sum(_read(log).count(line) for log in logs for line in REFUSAL_LOG_LINES)

    def settle(self, window: FaultWindow, gone: frozenset[str] = frozenset()) -> None:
        """Close ``window`` once the group has settled after its fault (watched in a thread).

        ``gone`` are the member ids of the worker the fault took away (they must have left).
        Call it once the fault is over (the worker restarted, the broker back); the window
        stays open if the group never settles, which ``wait_committed`` reports.
        """
        if window not in self.windows:
            self.windows.append(window)

        def watch() -> None:
            deadline = time.monotonic() + 300
            while not self._closed.is_set() and time.monotonic() < deadline:
                try:
                    if self._settled(gone):
                        window.settled = high_watermarks(self.bootstrap, self.topic)
                        window.refusals = self.refusals_logged() - window.logged_before
                        return
                except Exception:  # a broker restarting or a coordinator moving: ask again
                    pass
                self._closed.wait(0.5)

        thread = threading.Thread(target=watch, name=f"settle {window.what}", daemon=True)
        thread.start()
        self._watchers.append(thread)

    def _settled(self, gone: frozenset[str]) -> bool:
        live = [w for w in list(self.workers.values()) if w.proc.poll() is None]
        # a restarted worker has joined once it logged an assignment: until then the member
        # of the worker it replaced may still count as one of the live ones
        if not all("assigned" in _read(w.log) for w in live):
            return False
        group = self._describe()
        return group is not None and settled(group, self.topic, PARTITIONS, len(live), gone)

    def _describe(self) -> ConsumerGroupDescription | None:
        return describe_isolated(self.bootstrap, self.group)

    def _member_ids(self, worker: Worker) -> frozenset[str]:
        group = self._describe()
        if group is None:
            return frozenset()
        return frozenset(m.member_id for m in group.members if m.client_id == worker.client_id)

    def kill9(self, wid: str) -> None:
        """SIGKILL ``wid`` and restart it, in a fault window; wait for it to be gone first."""
        worker = self.workers[wid]
        gone = self._member_ids(worker)
        self.expected_exit.add(wid)
        window = self.open_window(f"kill -9 {wid}")
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=30)
        window.at_fault = high_watermarks(self.bootstrap, self.topic)
        self.expected_exit.discard(wid)
        self.start(wid)
        self.settle(window, gone)

    def sigterm_restart(self, wid: str, timeout: float = 60) -> tuple[int, Worker]:
        """SIGTERM ``wid`` (once started) and restart it, in a fault window.

        Returns the stopped worker's exit code and the stopped worker; restarts it only after a
        clean exit (0).
        """
        self.wait_started(wid)
        worker = self.workers[wid]
        gone = self._member_ids(worker)
        self.expected_exit.add(wid)
        window = self.open_window(f"SIGTERM {wid}")
        worker.proc.send_signal(signal.SIGTERM)
        code = worker.proc.wait(timeout=timeout)
        window.at_fault = high_watermarks(self.bootstrap, self.topic)
        if code == 0:
            self.expected_exit.discard(wid)
            self.start(wid)
            self.settle(window, gone)
        return code, worker

    def committed(self) -> dict[int, int]:
        """The group's committed offset per input partition (negative when none)."""
        self._last_committed = committed_offsets(self.bootstrap, self.group, self.topic)
        return self._last_committed

    # --- the stream ------------------------------------------------------------------------
    def produce_in_background(
        self, first: int = 0, stop: int | None = None, *, until: threading.Event | None = None
    ) -> None:
        """Produce the events (``items[first:stop]``) at ``rate`` per second in a thread.

        ``first`` must be a multiple of the partition count, so that every event lands in the
        partition it would have landed in had all been produced at once (round robin). With
        ``until``, production stops early once it is set (``produced`` then says how many were
        produced in all). The producer buffers whatever a broker outage holds up.
        """
        assert first % PARTITIONS == 0, first
        items = [(k, v) for k, v, _kind in self.items[first:stop]]

        def run() -> None:
            try:
                self.produced += produce_raw(
                    self.bootstrap,
                    self.topic,
                    items,
                    PARTITIONS,
                    per_second=self.rate,
                    settings={"queue.buffering.max.messages": "2000000"},
                    until=until,
                    flush_s=180,  # through a broker restart
                )
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
        """Supervise the workers until the group has committed every input record.

        Then wait for the fault windows to close (the group has settled after each fault).
        """

        def done() -> bool:
            self.supervise()
            lag = group_lag(self.bootstrap, self.group, self.topic)
            return len(lag) == PARTITIONS and sum(lag.values()) == 0

        wait_for(done, timeout, f"group {self.group} committed everything", interval=0.5)
        deadline = time.monotonic() + timeout
        for watcher in self._watchers:
            watcher.join(max(0.0, deadline - time.monotonic()))

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
        self._closed.set()
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
        self._closed.set()
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


def worker_metrics(port: int) -> tuple[float, float] | None:
    """A worker's committed transactions and its main loop's last progress (Unix time).

    None when its metrics endpoint does not answer (not started yet, or gone).
    """
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    samples = {
        (s.name, s.labels.get("outcome", "")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    committed = samples.get(("stream_scorer_transactions_total", "committed"), 0.0)
    progress = samples.get(("stream_scorer_last_progress_timestamp_seconds", ""), 0.0)
    return committed, progress


@dataclass
class _Progress:
    """What one worker did after the broker came back (``worker_recovery_s``)."""

    pid: int = 0
    committed: float = 0.0
    commits: list[float] = field(default_factory=list)  # when its count was seen to grow
    blocked: float = 0.0  # its main loop's longest block since the broker came back


def worker_recovery_s(
    run: FaultRun, back: float, *, commits: int = 5, timeout: float = 180
) -> dict[str, float]:
    """Per worker, seconds from ``back`` (Unix time the broker answered again) until it recovered.

    Watches every worker's metrics (``FaultRun(metrics=True)``) every 0.2 s, while the stream
    goes on, until none has its main loop blocked and each worker has been seen committing
    ``commits`` times since ``back``, or the stream has ended and the group committed all of
    it (a worker left with nothing to do). A worker's recovery is the longest of: the time to
    its first commit after ``back``, the longest time between two of its commits, and the
    longest its main loop stayed blocked after ``back`` (a call that hangs after a first
    commit shows, even when the group moved the worker's partitions meanwhile). A restarted
    worker's count starts again (its first commit counts). A commit made before the first look
    is not seen: the figures err long, by at most one look, never short.
    """
    seen: dict[str, _Progress] = {}

    def look() -> bool:
        run.supervise()
        now = time.time()
        busy = run.producing
        steady = True
        for wid, worker in list(run.workers.items()):
            read = worker_metrics(run.metrics_ports[wid])
            if read is None:
                steady = False
                continue
            committed, progress = read
            pid = worker.proc.pid
            state = seen.get(wid)
            if state is None:  # the first look: what it had committed before
                state = seen[wid] = _Progress(pid, committed)
            elif pid != state.pid or committed > state.committed:
                if committed > (state.committed if pid == state.pid else 0.0):
                    state.commits.append(now)
                state.pid, state.committed = pid, committed
            blocked = now - max(progress, back)
            state.blocked = max(state.blocked, blocked)
            steady = steady and blocked < 1.0 and len(state.commits) >= (commits if busy else 0)
        return steady and (busy or all_done())

    def all_done() -> bool:
        lag = group_lag(run.bootstrap, run.group, run.topic)
        return not run.producing and sum(lag.values()) == 0

    try:
        wait_for(look, timeout, "every worker committing again after the broker came back", 0.2)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: {seen}") from None
    end = time.time()
    out = {}
    for wid, state in seen.items():
        # no commit at all (the stream ended first): from back to the end, erring long
        times = [back, *(state.commits or [end])]
        longest_gap = max(b - a for a, b in itertools.pairwise(times))
        out[wid] = max(longest_gap, state.blocked)
    return out


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
