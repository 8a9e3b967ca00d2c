"""Flow control of the main loop: when to stop, batch size, poison tolerance.

Pure: counts, durations and signals, never a Kafka client. The CLI imports this module before
the heavy ones, so a SIGTERM during start-up is a clean stop.
"""

from __future__ import annotations

import signal
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from stream_scorer.errors import PoisonLimitError


class BatchSizer:
    """Adapts the batch size so one batch's processing stays within ``max_processing_s``.

    A batch that took longer than half the bound shrinks the next one to what the measured time
    per record allows in half the bound; faster batches let the size grow back by half each
    time, up to ``max_records``. So a slow model never keeps the worker from calling poll within
    ``max.poll.interval.ms`` (which the configuration keeps at least twice the bound).
    """

    def __init__(self, max_records: int, max_processing_s: float) -> None:
        """Start at ``max_records``."""
        self.max_records = max_records
        self.max_processing_s = max_processing_s
        self.size = max_records

    def observe(self, records: int, seconds: float) -> int:
        """Record that ``records`` took ``seconds``; return the next batch size."""
        if records <= 0:
            return self.size
        budget = self.max_processing_s / 2
        if seconds > budget:
            per_record = seconds / records
            self.size = max(1, min(self.max_records, int(budget / per_record)))
        elif self.size < self.max_records and records >= self.size:
            self.size = min(self.max_records, self.size + max(1, self.size // 2))
        return self.size


class PoisonGuard:
    """Stops the worker when dead letters pass the configured tolerance.

    ``max_ratio``: more than this fraction of the last ``window`` records dead-lettered (checked
    once the window is full); ``max_consecutive``: this many dead letters in a row. Zero turns a
    limit off; both are off by default.
    """

    def __init__(self, max_ratio: float, window: int, max_consecutive: int) -> None:
        """Configure the limits."""
        self.max_ratio = max_ratio
        self.max_consecutive = max_consecutive
        self._recent: deque[bool] = deque(maxlen=window)
        self._dead_in_window = 0
        self.consecutive = 0

    @property
    def enabled(self) -> bool:
        """Whether any limit is set (both are off by default)."""
        return bool(self.max_ratio or self.max_consecutive)

    def observe(self, outcomes: list[bool]) -> None:
        """Record each record's outcome in consume order (True = dead letter).

        Raises:
            PoisonLimitError: a limit was passed.
        """
        if not self.enabled:
            return
        recent = self._recent
        for dead in outcomes:
            if len(recent) == recent.maxlen and recent[0]:
                self._dead_in_window -= 1
            recent.append(dead)
            self._dead_in_window += dead
            self.consecutive = self.consecutive + 1 if dead else 0
            if self.max_consecutive and self.consecutive >= self.max_consecutive:
                raise PoisonLimitError(
                    f"{self.consecutive} dead letters in a row "
                    f"(dead_letter.max_consecutive = {self.max_consecutive})"
                )
            if (
                self.max_ratio
                and len(recent) == recent.maxlen
                and self._dead_in_window > self.max_ratio * len(recent)
            ):
                raise PoisonLimitError(
                    f"{self._dead_in_window} of the last {len(recent)} records dead-lettered "
                    f"(dead_letter.max_ratio = {self.max_ratio})"
                )


#: An iteration of the main loop that took longer than the poll wait plus this was blocked in a
#: call (a rebalance callback, a transactional call, a broker request): not time seen idle.
IDLE_GAP_SLACK_S = 1.0


class IdleClock:
    """Decides when the worker has been idle for ``limit_s`` seconds (``worker.idle_timeout_s``).

    Idle means nothing to do now and none coming from the group: the worker has joined its
    group (received an assignment, possibly empty), the group is settled, every partition
    assigned to it has nothing left to read, and no record it consumed awaits delivery or was
    rolled back. Anything else starts the count again: a record, a rebalance event
    (assignment, revocation, loss), a rebalance in progress, a partition with records left
    to read, a record in flight, a rolled-back batch. A worker without partitions therefore
    stops only after the group has been settled, with this worker holding nothing, for
    ``limit_s``.

    The count advances only between observations at most ``max_gap_s`` apart: when the loop
    was blocked in a call, nobody saw the worker idle, and that time does not count.

    Pure: fed one observation per loop iteration, it reads no clock and no client.
    """

    def __init__(self, limit_s: float, max_gap_s: float) -> None:
        """Count up to ``limit_s`` (0: never idle) over gaps of at most ``max_gap_s``."""
        self.limit_s = limit_s
        self.max_gap_s = max_gap_s
        self.idle_s = 0.0  # seen idle since the last reset
        self._last: float | None = None  # the previous observation, if it was idle
        self._rebalances = 0

    def observe(
        self,
        now: float,
        *,
        records: int,
        rebalances: int,
        joined: bool,
        settled: bool,
        at_end: bool,
        in_flight: int,
        rolled_back: int,
    ) -> bool:
        """Record one loop iteration; return True once the worker has been idle ``limit_s``.

        Args:
            now: a monotonic time in seconds.
            records: records consumed in this iteration.
            rebalances: rebalance events seen so far (a counter: any change is an event).
            joined: an assignment, possibly empty, has been received.
            settled: no rebalance is in progress, as far as the client knows.
            at_end: every assigned partition is read to its end (True without partitions).
            in_flight: consumed records whose outputs are not acknowledged yet.
            rolled_back: records of the last batch whose delivery was rolled back.
        """
        rebalanced = rebalances != self._rebalances
        self._rebalances = rebalances
        if (
            records
            or rebalanced
            or not joined
            or not settled
            or not at_end
            or in_flight
            or rolled_back
        ):
            self.idle_s = 0.0
            self._last = None
            return False
        if self._last is not None and now - self._last <= self.max_gap_s:
            self.idle_s += now - self._last
        self._last = now
        return self.limit_s > 0 and self.idle_s >= self.limit_s


#: The signals that ask a worker to stop (drain, commit, leave); ``StopFlag.reason`` is the name.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: ``StopFlag.reason`` of a stop that was asked for, as opposed to one the worker decided.
REQUESTED_STOPS = frozenset(s.name for s in STOP_SIGNALS)


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its batch, then drains and leaves."""

    def __init__(self) -> None:
        """Create an unset flag."""
        self.reason = ""

    def set(self, reason: str) -> None:
        """Ask the loop to stop."""
        self.reason = self.reason or reason

    def __bool__(self) -> bool:
        return bool(self.reason)

    @contextmanager
    def on_signals(self) -> Iterator[StopFlag]:
        """Install SIGTERM/SIGINT handlers for the duration of the block."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            self.set(signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
