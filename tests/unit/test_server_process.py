"""The development servers' process record (devtools/process.py), with real child processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from support import wait_for

from stream_scorer.devtools.process import STATE_FILE, ServerProcess, ServerStatus, alive, tail
from stream_scorer.errors import LocalKafkaError

# a server stand-in: waits for a signal (SIGTERM ends it), nothing else
SLEEPER = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_DFL)\nsignal.pause()"


def test_spawn_record_status_and_stop(tmp_path: Path) -> None:
    marker = f"--marker={tmp_path}"
    server = ServerProcess(tmp_path, "the sleeper", (marker.encode(),), LocalKafkaError, log=print)
    proc = server.spawn([sys.executable, "-c", SLEEPER, marker], tmp_path / "out", {"port": 1})
    try:
        recorded = server.recorded()
        assert recorded is not None and recorded["pid"] == proc.pid and recorded["port"] == 1
        assert json.loads((tmp_path / STATE_FILE).read_text())["started_at"]
        # its command line is read from /proc: polled, as a loaded machine may show it late
        wait_for(lambda: server.is_ours(proc.pid), 30, "the sleeper seen as this server")
        assert alive(proc.pid)
        # the same pid with other markers (a recycled pid) is not this server
        other = ServerProcess(tmp_path, "another", (b"--not-there",), LocalKafkaError)
        assert not other.is_ours(proc.pid)
        assert server.stop(timeout=10) is True
        assert not alive(proc.pid) and server.recorded() is None
        assert server.stop() is False  # nothing recorded: nothing to do
    finally:  # a failed assert leaves no sleeper behind (it would fail a later test's GC)
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_a_killed_process_is_reaped_when_its_record_is_forgotten(tmp_path: Path) -> None:
    """kill -9 of a server, then a new start (the fault suite's broker restart): ``forget``
    reaps the old child, so the dropped ``Popen`` never warns "still running" when collected."""
    server = ServerProcess(tmp_path, "the sleeper", (b"--k",), LocalKafkaError, log=print)
    proc = server.spawn([sys.executable, "-c", SLEEPER, "--k"], tmp_path / "out", {})
    try:
        os.kill(proc.pid, signal.SIGKILL)
        server.forget()
        assert proc.returncode == -signal.SIGKILL  # reaped: no zombie, no warning at collection
        assert server.recorded() is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_stale_record_is_not_running_and_is_removed_by_stop(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "the sleeper", (b"x",), LocalKafkaError)
    proc = server.spawn([sys.executable, "-c", "pass"], tmp_path / "out", {})
    proc.wait(10)
    assert not server.is_ours(proc.pid)
    assert server.stop() is False and not (tmp_path / STATE_FILE).exists()


def test_an_unstartable_command_raises_the_servers_error(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path, "the broker", (b"x",), LocalKafkaError)
    with pytest.raises(LocalKafkaError, match="cannot start"):
        server.spawn([str(tmp_path / "no-such-java")], tmp_path / "out", {})


def test_tail_names_the_file_and_keeps_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    assert tail(log) == ""
    log.write_text("\n".join(f"line {i}" for i in range(50)))
    text = tail(log, lines=3)
    assert text.splitlines() == [f"--- last lines of {log} ---", "line 47", "line 48", "line 49"]


def test_status_reads_the_record_and_probes_only_a_running_server(tmp_path: Path) -> None:
    """One status for every local server: the recorded address, alive, and answering."""
    marker = f"--marker={tmp_path}"
    server = ServerProcess(tmp_path, "the sleeper", (marker.encode(),), LocalKafkaError)
    assert server.status("url", lambda _: True) is None  # nothing recorded
    probed: list[str] = []

    def answers(address: str) -> bool:
        probed.append(address)
        return True

    proc = server.spawn([sys.executable, "-c", SLEEPER, marker], tmp_path / "out", {"url": "u:1"})
    try:
        assert server.status("bootstrap", answers) is None  # recorded, but not under that key
        wait_for(lambda: server.is_ours(proc.pid), 30, "the sleeper seen as this server")
        assert server.status("url", answers) == ServerStatus(proc.pid, "u:1", True, True)
        assert probed == ["u:1"]
        proc.kill()
        proc.wait(10)
        # a record left by a dead process: not running, and not probed
        assert server.status("url", answers) == ServerStatus(proc.pid, "u:1", False, False)
        assert probed == ["u:1"]
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_the_logs_of_a_failed_start_hold_the_servers_log_files_then_its_output(
    tmp_path: Path,
) -> None:
    (tmp_path / "server.log").write_text("ERROR the log line\n")
    (tmp_path / "out").write_text("the output line\n")
    server = ServerProcess(
        tmp_path, "the sleeper", (b"x",), LocalKafkaError, logs=(tmp_path / "server.log",)
    )
    text = server.logs(tmp_path / "out")
    assert text.index("ERROR the log line") < text.index("the output line")
