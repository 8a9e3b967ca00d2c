"""A detached server process of the development tools: its state file, start, status, stop.

The local broker (``localkafka``), the local registry (``localregistry``) and the local MLflow
server (``localmlflow``) each run a server that outlives the command that started it. They all
record it the same way: ``state.json`` in the server's state directory holds its pid (and what
the server adds: ports, addresses), a pid counts as the server only while it is alive and its
command line holds the server's markers (a recycled pid is not it), and stopping is SIGTERM,
then SIGKILL (to the whole process group for a server with worker processes).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from stream_scorer.errors import StreamScorerError

#: The file in a server's state directory that records the running process.
STATE_FILE = "state.json"


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited child not yet reaped is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child not yet reaped (zombie) is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` of a log file under a header naming it; "" when absent or empty."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return f"--- last lines of {path} ---\n" + "\n".join(text[-lines:]) if text else ""


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """Whether ``GET url`` answers 200 within ``timeout`` (no credentials sent)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status) == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_answering(answers: Callable[[], bool], deadline: float, alive: Callable[[], bool]) -> bool:
    """Poll ``answers`` until it is true (True), or ``alive`` is false or ``deadline`` passed."""
    while True:
        if answers():
            return True
        if not alive() or time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def port_free(port: int, wait_s: float = 0.0) -> bool:
    """Whether ``port`` can be bound on loopback, polling up to ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM does
            try:
                sock.bind(("127.0.0.1", port))
                return True
            except OSError:
                if time.monotonic() >= deadline:
                    return False
        time.sleep(0.2)


@dataclass(frozen=True)
class ServerStatus:
    """What a state directory records about a server, checked against reality.

    Attributes:
        pid: the recorded process id.
        address: where it answers (a broker's ``127.0.0.1:PORT``, a registry's or MLflow's URL).
        running: that process is alive and is this state directory's server.
        answering: it answers its server's probe (a broker: metadata; HTTP: its health path).
    """

    pid: int
    address: str
    running: bool
    answering: bool


class ServerProcess:
    """The process of one server, recorded in ``<state_dir>/state.json``."""

    def __init__(
        self,
        state_dir: Path,
        what: str,
        markers: Sequence[bytes],
        error: type[StreamScorerError],
        log: Callable[[str], None] = print,
        *,
        group: bool = False,
        logs: Sequence[Path] = (),
        stop_command: str = "",
    ) -> None:
        """Describe the server's process.

        Args:
            state_dir: the server's state directory.
            what: how messages name it ("the broker").
            markers: arguments its command line holds, each of them (what tells it from
                another process that got its pid).
            error: the error raised when it cannot be started or stopped.
            log: receives one-line progress messages.
            group: signal the server's whole process group (it was started in a session of
                its own): for a server whose workers are child processes (``mlflow server``).
            logs: log files it writes besides its output, shown (their last lines) before the
                output's when it fails to start.
            stop_command: the command that stops it, named when a recorded one runs but does
                not answer.
        """
        self.state_file = state_dir / STATE_FILE
        self._what = what
        self._markers = tuple(markers)
        self._error = error
        self._log = log
        self._group = group
        self._logs = tuple(logs)
        self._stop_hint = f" (`{stop_command}`)" if stop_command else ""
        self._proc: subprocess.Popen[bytes] | None = None  # kept so it can be reaped

    def recorded(self) -> dict[str, Any] | None:
        """What ``state.json`` records (``pid`` an int), or None (absent or unreadable)."""
        try:
            raw = json.loads(self.state_file.read_text())
            raw["pid"] = int(raw["pid"])
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return raw if isinstance(raw, dict) else None

    def status(self, key: str, answers: Callable[[str], bool]) -> ServerStatus | None:
        """The recorded server's status (its address under ``key``), or None if none is recorded.

        ``answers(address)`` probes a running one; a record left by a process that died (or
        whose pid now belongs to another process) gives ``running=False``.
        """
        raw = self.recorded()
        if raw is None or key not in raw:
            return None
        pid, address = raw["pid"], str(raw[key])
        running = self.is_ours(pid)
        return ServerStatus(pid, address, running, running and answers(address))

    def is_ours(self, pid: int) -> bool:
        """Whether ``pid`` is alive and is this server (its command line holds the markers)."""
        if not alive(pid):
            return False
        if not Path("/proc/self/cmdline").exists():  # no procfs: trust the recorded pid
            return True
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return all(marker in args for marker in self._markers)

    def spawn(
        self,
        cmd: list[str],
        out: Path,
        state: dict[str, Any],
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` detached (its output into ``out``) and record it with ``state``.

        ``env``: its environment (default: this process's).
        """
        try:
            with out.open("wb") as sink:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                    cwd=out.parent, start_new_session=True,  # outlives this process
                    env=None if env is None else dict(env),
                )  # fmt: skip
        except OSError as exc:
            raise self._error(f"cannot start {cmd[0]}: {exc}") from exc
        if self._proc is not None:  # a previous process of ours that died: reap it
            self._proc.poll()
        self._proc = proc
        record = {
            "pid": proc.pid,
            **state,
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        partial = self.state_file.with_suffix(".tmp")
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(self.state_file)  # atomic: a reader never sees half a record
        return proc

    def logs(self, out: Path) -> str:
        """The last lines of its log files and of ``out``, or a line saying there are none."""
        parts = [tail(path) for path in (*self._logs, out)]
        return "\n".join(p for p in parts if p) or f"(no output in {self.state_file.parent})"

    def adopt(
        self, pid: int, where: str, answers: Callable[[], bool], timeout: float, out: Path
    ) -> None:
        """Wait (up to ``timeout``) for the recorded running ``pid`` to answer at ``where``.

        Raises:
            StreamScorerError: (the ``error`` type) it runs but does not answer (or dies).
        """
        if wait_answering(answers, time.monotonic() + timeout, lambda: self.is_ours(pid)):
            self._log(f"already running at {where} (pid {pid})")
            return
        raise self._error(
            f"{self._what} recorded in {self.state_file.parent} (pid {pid}) runs but does not "
            f"answer at {where}: stop it{self._stop_hint} and start again\n{self.logs(out)}"
        )

    def await_start(
        self,
        proc: subprocess.Popen[bytes],
        where: str,
        answers: Callable[[], bool],
        timeout: float,
        out: Path,
    ) -> None:
        """Wait (up to ``timeout``) for the just spawned ``proc`` to answer at ``where``.

        Raises:
            StreamScorerError: (the ``error`` type) it exited while starting, or did not
                answer in time (then it is stopped); the message ends with its last output.
        """
        if wait_answering(answers, time.monotonic() + timeout, lambda: proc.poll() is None):
            return
        if proc.poll() is not None:
            if self._group:
                self.stop()  # its children too
            else:
                self.forget()
            raise self._error(
                f"{self._what} exited with code {proc.returncode} while starting\n{self.logs(out)}"
            )
        self.stop()
        raise self._error(
            f"{self._what} did not answer at {where} within {timeout:.0f} s\n{self.logs(out)}"
        )

    def reap(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the process this object started to exit, and reap it.

        For a server stopped by its own tool (``pg_ctl stop``) rather than by ``stop``.
        """
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)

    def forget(self) -> None:
        """Drop the record of a process that exited by itself (or was killed: a fault test).

        A child of ours is reaped first: dropped unreaped, its ``Popen`` warns "still running"
        when collected (the fault suite's broker kill -9 and restart failed on it).
        """
        self.state_file.unlink(missing_ok=True)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(5.0)
        self._proc = None

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded process: SIGTERM, then SIGKILL if it outlasts ``timeout``.

        Safe when nothing runs; a stale record is removed. Returns whether it was running.

        Raises:
            StreamScorerError: (the ``error`` type) the process survives SIGKILL.
        """
        recorded = self.recorded()
        if recorded is None:
            return False
        pid = recorded["pid"]
        running = self.is_ours(pid)
        if running:
            self._signal(pid, signal.SIGTERM)
            if not self._wait_gone(pid, timeout):
                self._log(
                    f"{self._what} (pid {pid}) ignored SIGTERM for {timeout:.0f} s: killing it"
                )
                self._signal(pid, signal.SIGKILL)
                if not self._wait_gone(pid, 10.0):
                    raise self._error(f"{self._what} (pid {pid}) survives SIGKILL")
        self.state_file.unlink(missing_ok=True)
        return running

    def _signal(self, pid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self._group:
                os.killpg(pid, sig)  # its session's leader: the group has the pid's number
            else:
                os.kill(pid, sig)

    def _group_alive(self, pid: int) -> bool:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        proc = self._proc
        if proc is not None and proc.pid == pid:  # our child: wait() also reaps it
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            self._proc = None
            if not self._group:
                return True
        while alive(pid) or (self._group and self._group_alive(pid)):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


class LocalServer:
    """What the local servers share: ``stop`` through their ``ServerProcess``, and ``with``."""

    _server: ServerProcess

    def start(self) -> str:
        """Start the server, or report the one running; return its address."""
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded server (SIGTERM, then SIGKILL); return whether one was running."""
        return self._server.stop(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
