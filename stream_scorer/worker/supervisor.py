"""``stream-scorer run --workers N``: N worker processes on one host, one group member each.

Python threads share one interpreter lock, so one process per core is how a host scales. The
parent only supervises (docs/manual/commands.md):

- worker ``i`` (0-based) gets the id ``<id>-<i>`` and serves HTTP on ``metrics.port + i``;
- SIGTERM or SIGINT to the parent is passed to every worker, and each drains and leaves;
  a worker still running ``grace_s`` after that is killed;
- a worker that exits 0 on its own (``--max-messages``, ``--idle-timeout``), or 3 (idle, with
  records left in partitions no live member consumes), is left alone;
- a worker that fails or dies while nobody asked it to stop makes the parent stop the others
  and exit non-zero: the host runs all or nothing, and the orchestrator restarts the whole
  thing (its restart policy and back-off apply, rather than a second one in here);
- the parent's exit code is the highest of its workers' failures (2, a deployment error,
  stays 2: docs/manual/commands.md, "Exit codes"), or 1 when the only failures were workers
  killed by a signal; without failures, 3 when a worker exited 3, else 0.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from stream_scorer.errors import EXIT_OK, EXIT_ORPHANED_LAG

log = logging.getLogger(__name__)
#: A worker's exit codes when it stopped on its own without failing: left alone.
_OWN_STOPS = frozenset({EXIT_OK, EXIT_ORPHANED_LAG})


def run_command(config: Path, *extra: str, log_level: str | None = None) -> list[str]:
    """The command line of ``stream-scorer run --config CONFIG EXTRA...`` in this interpreter.

    The one way every tool, the demo and the tests start a worker process.
    """
    level = ["--log-level", log_level] if log_level else []
    return [sys.executable, "-m", "stream_scorer", *level, "run", "--config", str(config), *extra]


def worker_commands(
    base: Sequence[str], workers: int, worker_id: str, port: int
) -> list[list[str]]:
    """Return the command line of each worker: ``base`` plus its id and metrics port.

    Args:
        base: a ``stream-scorer … run …`` command line without ``--workers``.
        workers: how many.
        worker_id: the base id; worker ``i`` is ``<worker_id>-<i>``.
        port: the base metrics port; worker ``i`` serves on ``port + i`` (0 stays disabled).
    """
    return [
        [*base, "--worker-id", f"{worker_id}-{i}", "--metrics-port", str(port + i if port else 0)]
        for i in range(workers)
    ]


class Supervisor:
    """Start worker processes, forward stop signals, and decide the exit code."""

    def __init__(
        self,
        commands: Sequence[Sequence[str]],
        *,
        grace_s: float = 90.0,
        env: Mapping[str, str] | None = None,
        poll_s: float = 0.1,
    ) -> None:
        """Prepare one process per command (started by ``run``)."""
        self._commands = [list(c) for c in commands]
        self._grace = grace_s
        self._env = dict(env) if env is not None else None
        self._poll = poll_s
        self._procs: list[subprocess.Popen[bytes]] = []
        self._stop_reason = ""
        self._stop_at: float | None = None
        self._tick = threading.Event()
        #: Stop signals received and not yet acted on: the handler only records them (taking the
        #: event's lock, logging or polling the workers there could deadlock with the loop)
        self._signalled: list[str] = []

    @property
    def pids(self) -> list[int]:
        """The workers' process ids, in worker order."""
        return [p.pid for p in self._procs]

    def stop(self, reason: str) -> None:
        """Ask every running worker to drain and stop (SIGTERM)."""
        if not self._stop_reason:
            self._stop_reason = reason
            self._stop_at = time.monotonic()
            log.info("stopping %d workers: %s", len(self._procs), reason)
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self._tick.set()

    @contextmanager
    def _signals(self) -> Iterator[None]:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self._signalled.append(signal.Signals(signum).name)  # acted on by the loop

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def run(self) -> int:
        """Run the workers until all have exited; return 0 only if every one exited 0.

        Otherwise the highest exit code of a failed worker, or 1 if every failed worker was
        killed by a signal (a negative return code); with no failure, 3 when a worker stopped
        idle with records left in partitions no live member consumes (``EXIT_ORPHANED_LAG``).
        """
        with self._signals():
            for i, cmd in enumerate(self._commands):
                self._procs.append(subprocess.Popen(cmd, env=self._env))
                log.info("worker %d started", i, extra={"pid": self._procs[-1].pid})
            codes: dict[int, int] = {}
            while len(codes) < len(self._procs):
                while self._signalled:
                    self.stop(self._signalled.pop(0))
                for i, proc in enumerate(self._procs):
                    code = proc.poll()
                    if code is None or i in codes:
                        continue
                    codes[i] = code
                    if code in _OWN_STOPS or self._stop_reason:
                        (log.info if code in _OWN_STOPS else log.error)(
                            "worker %d exited with %d", i, code, extra={"pid": proc.pid}
                        )
                    else:
                        log.error(
                            "worker %d exited unexpectedly with %d: stopping the others",
                            i,
                            code,
                            extra={"pid": proc.pid},
                        )
                        self.stop(f"worker {i} exited unexpectedly with {code}")
                if (
                    self._stop_at is not None
                    and time.monotonic() - self._stop_at > self._grace
                    and len(codes) < len(self._procs)
                ):
                    for i, proc in enumerate(self._procs):
                        if i not in codes and proc.poll() is None:
                            log.error(
                                "worker %d did not stop within %.0f s: killed", i, self._grace
                            )
                            proc.kill()
                    self._stop_at = None
                self._tick.wait(self._poll)
                self._tick.clear()
        failed = [c for c in codes.values() if c not in _OWN_STOPS]
        if not failed:
            return max(codes.values(), default=EXIT_OK)
        return max(failed) if max(failed) > 0 else 1
