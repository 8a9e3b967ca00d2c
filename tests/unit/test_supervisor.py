"""``run --workers N``'s supervisor, with small stand-in worker processes (no Kafka)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import wait_for

from stream_scorer.worker.supervisor import worker_commands

# A stand-in worker: announces itself, drains (writes a file) on SIGTERM and exits 0;
# mode "exit0" exits 0 at once, "exit3" 3 (idle, with a dead member's records left); any
# exits 4 (a failure) on SIGUSR1.
CHILD = """
import os, signal, sys, pathlib
d, i, mode = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def term(*_):
    (d / f"drained-{i}").write_text("1")
    sys.exit(0)
signal.signal(signal.SIGTERM, term)
signal.signal(signal.SIGUSR1, lambda *_: sys.exit(4))
(d / f".ready-{i}").write_text(str(os.getpid()))
(d / f".ready-{i}").rename(d / f"ready-{i}")  # atomic: the test never reads it half written
if mode.startswith("exit"):
    sys.exit(int(mode[4:]))
while True:
    signal.pause()
"""

PARENT = """
import json, sys
from stream_scorer.worker.supervisor import Supervisor
sys.exit(Supervisor(json.loads(sys.argv[1]), grace_s=float(sys.argv[2]), poll_s=0.02).run())
"""


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    """Whatever a test asserts, its supervisor and stand-in workers do not outlive it."""
    yield
    while _STARTED:
        parent = _STARTED.pop()
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)  # its own session: the workers go too
        parent.communicate()  # reaps it and closes its pipes (a leak fails a later test)


def _start(tmp_path: Path, modes: list[str], grace: float = 30.0) -> subprocess.Popen[str]:
    import json

    commands = [
        [sys.executable, "-c", CHILD, str(tmp_path), str(i), mode] for i, mode in enumerate(modes)
    ]
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, json.dumps(commands), str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    _STARTED.append(parent)
    wait_for(
        lambda: all((tmp_path / f"ready-{i}").exists() for i in range(len(modes))),
        30,
        "workers did not start",
        interval=0.02,
    )
    return parent


def _pid(tmp_path: Path, i: int) -> int:
    return int((tmp_path / f"ready-{i}").read_text())


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts: it takes no more signals)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def _drained(tmp_path: Path) -> set[int]:
    return {int(p.name.split("-")[1]) for p in tmp_path.glob("drained-*")}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_reaches_every_worker_and_each_drains(tmp_path: Path, sig: int) -> None:
    parent = _start(tmp_path, ["wait", "wait", "wait"])
    parent.send_signal(sig)
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 0, err
    assert _drained(tmp_path) == {0, 1, 2}


def test_a_worker_finishing_cleanly_leaves_the_others_running(tmp_path: Path) -> None:
    parent = _start(tmp_path, ["exit0", "wait"])
    wait_for(lambda: _gone(_pid(tmp_path, 0)), 30, "worker 0 did not exit", interval=0.02)
    assert parent.poll() is None
    os.kill(_pid(tmp_path, 1), 0)  # still alive
    parent.send_signal(signal.SIGTERM)
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 0, err
    assert _drained(tmp_path) == {1}


def test_a_failing_worker_stops_the_others_and_the_parent_fails(tmp_path: Path) -> None:
    parent = _start(tmp_path, ["wait", "wait", "wait"])
    os.kill(_pid(tmp_path, 1), signal.SIGUSR1)  # worker 1 exits with 4
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 4, err
    assert _drained(tmp_path) == {0, 2}  # the others were asked to drain
    assert "worker 1 exited unexpectedly with 4" in err


def test_a_worker_stopping_idle_with_records_left_elsewhere_leaves_the_others_running(
    tmp_path: Path,
) -> None:
    parent = _start(tmp_path, ["exit3", "wait"])  # EXIT_ORPHANED_LAG: its own stop
    wait_for(lambda: _gone(_pid(tmp_path, 0)), 30, "worker 0 did not exit", interval=0.02)
    assert parent.poll() is None
    os.kill(_pid(tmp_path, 1), 0)  # still alive
    parent.send_signal(signal.SIGTERM)
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 3, err  # no failure: the records left behind are the news
    assert _drained(tmp_path) == {1}


def test_a_killed_worker_makes_the_parent_exit_non_zero(tmp_path: Path) -> None:
    parent = _start(tmp_path, ["wait", "wait"])
    os.kill(_pid(tmp_path, 0), signal.SIGKILL)
    _out, err = parent.communicate(timeout=30)
    assert parent.returncode == 1, err
    assert _drained(tmp_path) == {1}


def test_worker_commands_give_each_worker_its_id_and_port() -> None:
    base = ["py", "-m", "stream_scorer", "run", "--config", "c.yaml"]
    cmds = worker_commands(base, 3, "host-7", 9400)
    assert [c[len(base) :] for c in cmds] == [
        ["--worker-id", "host-7-0", "--metrics-port", "9400"],
        ["--worker-id", "host-7-1", "--metrics-port", "9401"],
        ["--worker-id", "host-7-2", "--metrics-port", "9402"],
    ]
    assert worker_commands(base, 2, "h", 0)[1][-1] == "0"  # disabled stays disabled
