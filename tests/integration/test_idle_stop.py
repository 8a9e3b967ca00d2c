"""``worker.idle_timeout_s`` against a real broker: idle means nothing left to do, and a stop
that leaves anything undelivered is a failure.

A dead group member keeps its partitions until its session times out; the tests use one (a
plain consumer killed with SIGKILL) to hold a rebalance open for longer than the idle timeout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import test_worker_stream
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from support import (
    PAYMENT_SCHEMA,
    avro,
    committed_lag,
    committed_offsets,
    high_watermarks,
    payments,
    produce_raw,
    read_topic,
    wait_for,
)
from test_worker_stream import PARTITIONS, Env, _worker

from stream_scorer.config import load_config
from stream_scorer.errors import EXIT_ORPHANED_LAG
from stream_scorer.kafka.topics import describe_group, members_holding_partitions
from stream_scorer.worker.loop import run_worker

pytestmark = pytest.mark.integration
# the worker-stream tests' fixtures: a fresh input, output and dead-letter topic and a model
env = test_worker_stream.env
model_dir = test_worker_stream.model_dir

#: The dead member's session: how long the group waits for it before rebalancing without it.
DEAD_SESSION_MS = 15_000

_MEMBER = """
import sys
from confluent_kafka import Consumer
bootstrap, topic, group, session_ms = sys.argv[1:5]
consumer = Consumer({
    "bootstrap.servers": bootstrap, "group.id": group, "session.timeout.ms": session_ms,
    "heartbeat.interval.ms": "500", "partition.assignment.strategy": "cooperative-sticky",
    "enable.auto.commit": "false", "auto.offset.reset": "earliest",
})
def show(what):
    return lambda _c, parts: print(what, sorted(p.partition for p in parts), flush=True)
consumer.subscribe([topic], on_assign=show("assigned"), on_revoke=show("revoked"))
while True:
    consumer.poll(0.1)  # reads, never commits: what it read is redelivered after it dies
"""


class _Member:
    """A group member in its own process that reads nothing for good and can be killed."""

    def __init__(self, bootstrap: str, topic: str, group: str) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _MEMBER, bootstrap, topic, group, str(DEAD_SESSION_MS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def said(self, prefix: str) -> bool:
        return any(line.startswith(prefix) for line in self.lines)

    def kill(self) -> None:
        """Die without leaving the group (its session runs out later)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _Watcher:
    """A live group member in this process: records each rebalance callback's time; with
    ``leave_when_assigned`` it leaves the group as soon as it is given a partition."""

    def __init__(self, bootstrap: str, topic: str, group: str, *, leave_when_assigned: bool):
        self.callbacks: list[tuple[float, str, list[int]]] = []
        self._leave = leave_when_assigned
        self._done = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "heartbeat.interval.ms": "500",
                "partition.assignment.strategy": "cooperative-sticky",
                "enable.auto.commit": "false",
                "auto.offset.reset": "latest",
            }
        )
        self._consumer.subscribe(
            [topic], on_assign=self._note("assigned"), on_revoke=self._note("revoked")
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _note(self, what: str) -> Callable[[Any, list[Any]], None]:
        def note(_consumer: Any, parts: list[Any]) -> None:
            self.callbacks.append((time.monotonic(), what, sorted(p.partition for p in parts)))

        return note

    def got_partitions(self) -> bool:
        return any(what == "assigned" and parts for _t, what, parts in self.callbacks)

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                self._consumer.poll(0.1)  # reads nothing: offsets start at the end
                if self._leave and self.got_partitions():
                    break
        finally:
            self._consumer.close()

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=60)


@contextmanager
def _cleanup(*procs: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)  # closes its pipes, also when it had ended by itself


def _items(n: int, seed: int) -> list[tuple[bytes | None, bytes | None]]:
    return [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in payments(n, seed=seed)]


def _report(out: str) -> dict[str, Any]:
    return dict(json.loads(out.strip().splitlines()[-1]))


# --- (c) idle still stops a worker that is done ---------------------------------------------
@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_idle_stops_a_worker_that_read_and_delivered_everything(env: Env, mode: str) -> None:
    # two partitions of three get records, one of them ends in transaction markers and an
    # aborted transaction; the third stays empty: each must count as read to its end
    produce_raw(env.bootstrap, env.topic, _items(200, seed=31), 2)
    txn = Producer({"bootstrap.servers": env.bootstrap, "transactional.id": f"{env.topic}-t"})
    txn.init_transactions(30)
    txn.begin_transaction()
    for i, (key, value) in enumerate(_items(10, seed=32)):
        txn.produce(env.topic, value, key, partition=i % 2)
    txn.commit_transaction(30)
    txn.begin_transaction()
    txn.produce(env.topic, b"never committed", partition=1)
    txn.abort_transaction(30)
    cfg = load_config(
        env.config,
        environ={},
        overrides={
            "delivery": {"mode": mode},
            "worker": {"id": f"done-{mode}", "idle_timeout_s": 2},
        },
    )

    report = run_worker(cfg)

    assert (report.stopped_by, report.consumed, report.predictions) == ("idle_timeout", 210, 210)
    assert len(read_topic(env.bootstrap, env.out)) == 210
    # each partition with records committed after its last one (105 records: offsets 0-104);
    # what follows is a commit marker (and in partition 1 an aborted record and its marker)
    assert committed_offsets(env.bootstrap, env.group, env.topic) == {0: 105, 1: 105, 2: -1001}
    # started again on a topic it already finished: nothing consumed, nothing to read, idle
    again = run_worker(cfg)
    assert (again.stopped_by, again.consumed) == ("idle_timeout", 0)


# --- (a) a worker does not stop while the group is rebalancing towards it ------------------
@pytest.mark.slow  # a member killed, its session timeout, a rebalance
def test_idle_waits_for_a_rebalance_that_hands_a_dead_members_partitions_over(env: Env) -> None:
    produce_raw(env.bootstrap, env.topic, _items(600, seed=33), PARTITIONS)
    dead = _Member(env.bootstrap, env.topic, env.group)
    wait_for(lambda: dead.said("assigned [0, 1, 2]"), 60, "the first member got no partitions")
    worker = _worker(
        env,
        "--idle-timeout",
        "6",
        extra_env={
            "STREAM_SCORER_KAFKA__STATISTICS_INTERVAL_MS": "500",
            "STREAM_SCORER_KAFKA__CONSUMER__HEARTBEAT_INTERVAL_MS": "500",
        },
    )
    watcher = None
    with _cleanup(worker):
        try:
            # the worker joined (the member gave a partition up); the member dies holding the
            # others, and a new member joins at once: the rebalance that follows waits for the
            # dead member's session (15 s), far longer than the worker's idle timeout (6 s)
            wait_for(lambda: dead.said("revoked"), 120, "the worker never joined")
            dead.kill()
            watcher = _Watcher(env.bootstrap, env.topic, env.group, leave_when_assigned=True)
            out, err = worker.communicate(timeout=180)
        finally:
            dead.kill()
            if watcher is not None:
                watcher.close()
    assert worker.returncode == 0, err
    report = _report(out)
    assert report["stopped_by"] == "idle_timeout"
    # the rebalance handed the dead member's partitions out; the watcher left with its share
    # at once: the worker took everything over and finished it before it stopped
    assert report["predictions"] == 600
    assert watcher.got_partitions()
    assert committed_lag(env.bootstrap, env.group, env.topic) == dict.fromkeys(range(PARTITIONS), 0)


# --- (d) without partitions: idle only once the group has settled --------------------------
@pytest.mark.slow  # idle timeouts around a rebalance
def test_a_worker_without_partitions_stops_only_after_the_group_settled(
    env: Env, unique: Callable[[str], str], make_topics: Callable[[dict[str, int]], None]
) -> None:
    single = unique("single")
    make_topics({single: 1})
    holder = _Watcher(env.bootstrap, single, env.group, leave_when_assigned=False)
    dead = None
    worker = None
    try:
        wait_for(holder.got_partitions, 60, "the holder got no partition")
        dead = _Member(env.bootstrap, single, env.group)
        wait_for(lambda: dead.said("assigned []"), 60, "the second member never joined")
        dead.kill()  # the group now waits for its session to run out before any rebalance ends
        started = time.monotonic()
        worker = _worker(
            env,
            "--idle-timeout",
            "3",
            extra_env={"STREAM_SCORER_INPUT__TOPIC": single},
        )
        with _cleanup(worker):
            out, err = worker.communicate(timeout=180)
        stopped = time.monotonic()
    finally:
        if dead is not None:
            dead.kill()
        holder.close()
    assert worker.returncode == 0, err
    report = _report(out)
    assert (report["stopped_by"], report["consumed"]) == ("idle_timeout", 0)
    # the rebalance the worker's join started ended only when the dead member's session ran
    # out; the worker stopped after that, not while it was still waiting to join
    settled = [t for t, what, _parts in holder.callbacks if what == "assigned" and t > started]
    assert settled, holder.callbacks
    assert stopped > settled[0]


# --- (b) a failing run never ends in 0 -----------------------------------------------------
@pytest.mark.slow  # transactions that time out one by one
def test_exactly_once_with_its_output_topic_gone_fails_instead_of_idling_out(env: Env) -> None:
    # records keep arriving (10 s), so the worker is never idle before its transactions fail;
    # each failing one blocks until its outputs time out (6 s), longer than the idle timeout
    items = _items(200, seed=34)
    producing = threading.Thread(
        target=produce_raw,
        args=(env.bootstrap, env.topic, items, PARTITIONS),
        kwargs={"per_second": 20},
    )
    worker = _worker(
        env,
        "--idle-timeout",
        "3",
        extra_env={
            "STREAM_SCORER_DELIVERY__MODE": "exactly-once",
            "STREAM_SCORER_DELIVERY__TRANSACTION_TIMEOUT_S": "6",
            "STREAM_SCORER_WORKER__ID": "output-gone",
        },
    )
    producing.start()
    with _cleanup(worker):
        try:
            wait_for(
                lambda: max(committed_offsets(env.bootstrap, env.group, env.topic).values()) > 0,
                120,
                "the worker delivered nothing",
            )
            admin = AdminClient({"bootstrap.servers": env.bootstrap})
            admin.delete_topics([env.out])[env.out].result(timeout=30)
        finally:
            producing.join()
        out, err = worker.communicate(timeout=300)
    assert worker.returncode == 1, (out, err)
    assert "idle_timeout" not in out
    assert "rolled back" in err
    # what could not be delivered stays uncommitted
    assert sum(committed_lag(env.bootstrap, env.group, env.topic).values()) > 0


# --- (e) an idle stop that leaves a dead member's records behind says so --------------------
@pytest.mark.slow  # a member killed, its session timeout
def test_an_idle_stop_names_the_records_a_dead_member_left_and_exits_3(env: Env) -> None:
    admin = AdminClient({"bootstrap.servers": env.bootstrap})

    def holders() -> dict[str, list[int]]:
        group = describe_group(admin, env.group)
        if group is None or members_holding_partitions(group, PARTITIONS) != 2:
            return {}
        return {
            m.client_id: sorted(tp.partition for tp in m.assignment.topic_partitions)
            for m in group.members
        }

    stop = threading.Event()
    producing = threading.Thread(
        target=produce_raw,
        args=(env.bootstrap, env.topic, _items(6000, seed=35), PARTITIONS),
        kwargs={"per_second": 100, "until": stop},
    )
    # the victim keeps the default session (45 s), far longer than the survivor's idle timeout
    victim = _worker(env, "--worker-id", "victim")
    with _cleanup(victim):
        wait_for(lambda: describe_group(admin, env.group) is not None, 120, "victim joined")
        producing.start()  # records keep coming: neither worker is idle meanwhile
        try:
            # idle timeout well above a rebalance's few seconds (a survivor idle before it is
            # given partitions would stop early) and far below the victim's session
            survivor = _worker(env, "--worker-id", "survivor", "--idle-timeout", "8")
            with _cleanup(survivor):
                wait_for(lambda: len(holders()) == 2, 120, "both workers hold partitions")
                left = holders()["stream-scorer-victim"]
                victim.kill()
                victim.communicate(timeout=30)
                marks = high_watermarks(env.bootstrap, env.topic)
                wait_for(
                    lambda: all(
                        high_watermarks(env.bootstrap, env.topic)[p] > marks[p] + 20 for p in left
                    ),
                    60,
                    "records for the dead member's partitions",
                )
                stop.set()  # the survivor then finishes its own partitions and idles out
                out, err = survivor.communicate(timeout=120)
        finally:
            stop.set()
            producing.join()
    lag = committed_lag(env.bootstrap, env.group, env.topic)
    assert survivor.returncode == EXIT_ORPHANED_LAG == 3, err
    report = _report(out)
    assert report["stopped_by"] == "idle_timeout"
    assert report["orphaned_lag"] == {
        "records": sum(lag[p] for p in left),
        "partitions": [f"{env.topic}[{p}]" for p in left],
    }
    assert sum(lag[p] for p in left) > 0
    assert all(lag[p] == 0 for p in range(PARTITIONS) if p not in left)  # the survivor's: done
    assert "no live member consumes" in err
