"""The one retry policy of every outage path: which errors are retried, how, for how long.

An *outage* (a server that does not answer, or answers that it cannot now) is retried with
exponential backoff and jitter (``RetryPolicy``: ``retry.initial_backoff_s`` doubling up to
``retry.max_backoff_s``) until the path's deadline, then its last error is raised, loudly (an
``UnavailableError`` of the error tree for the HTTP servers; a ``BrokerError`` once the Kafka
paths' callers wrap it). A *configuration* error (``ConfigError``, ``RefusedError``: a refused
credential, a forbidden request) is never retried: asking again cannot help. Anything else is
not an outage either and is raised at once.

The paths and their deadlines: the schema registry (``registry.unavailable_timeout_s``), the
model registry, MLflow (``retry.model_registry_timeout_s``), the brokers' admin requests of the
operator commands, the access checks and the lag (a group coordinator still loading:
``retry.admin_timeout_s`` or the command's own timeout). Which Kafka errors are an outage is
said once, by ``kafka.topics.coordinator_busy`` (the client's ``retriable()`` flag and the
coordinator codes), passed here as ``outage``. A bad record is never an exception (a
``DeadLetter`` value), so never retried here.

Low in the layers: imports the error tree and tenacity only.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, ParamSpec, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception

from stream_scorer.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)
_P = ParamSpec("_P")
_T = TypeVar("_T")

#: What an exception is to the retry policy.
Kind = Literal["configuration", "outage", "failure"]


def classify(exc: BaseException) -> Kind:
    """Whether ``exc`` is a configuration error, an outage, or another failure.

    ``configuration``: ``ConfigError`` and its ``RefusedError`` (never retried, exit 2);
    ``outage``: ``UnavailableError`` and its ``RegistryError`` (retried, then exit 1);
    ``failure``: anything else (not retried).
    """
    if isinstance(exc, ConfigError):
        return "configuration"
    if isinstance(exc, UnavailableError):
        return "outage"
    return "failure"


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage of the error tree (``classify(exc) == "outage"``)."""
    return classify(exc) == "outage"


@dataclass(frozen=True)
class RetryPolicy:
    """The backoff between tries: ``initial_s`` doubling each time up to ``max_s``, plus jitter.

    The jitter is a random fraction (up to ``jitter``) of each wait added to it, so that workers
    losing a server together do not ask again together. No wait goes past the deadline.
    """

    initial_s: float = 0.2
    max_s: float = 5.0
    jitter: float = 0.5

    def wait_s(self, attempt: int, draw: Callable[[], float] = random.random) -> float:
        """The wait after the ``attempt``-th failed try (1 first), before the deadline cap."""
        base = min(self.max_s, self.initial_s * 2.0 ** max(0, attempt - 1))
        return min(self.max_s, base * (1.0 + self.jitter * draw()))


#: The policy of the code that is given none (tools, tests): ``retry``'s defaults.
DEFAULT_POLICY: Final = RetryPolicy()


def _never() -> bool:
    return False


def _nothing() -> None:
    return None


class _Deadline:
    """Stop once ``deadline_s`` has passed since the first try, or on ``stopping()``.

    Waits by the policy, never past the deadline. One per ``retrying`` call (holds the start).
    """

    def __init__(
        self,
        deadline_s: float,
        policy: RetryPolicy,
        what: str,
        stopping: Callable[[], bool],
        clock: Callable[[], float],
    ) -> None:
        self._deadline_s = deadline_s
        self._policy = policy
        self._what = what
        self._stopping = stopping
        self._clock = clock
        self.started: float | None = None

    def begin(self, state: RetryCallState) -> None:
        if state.attempt_number == 1:
            self.started = self._clock()

    def elapsed(self) -> float:
        return 0.0 if self.started is None else self._clock() - self.started

    def stop(self, state: RetryCallState) -> bool:
        done = self.elapsed() >= self._deadline_s or self._stopping()
        if done and state.attempt_number > 1:  # tried once only (deadline 0): nothing to add
            exc = state.outcome.exception() if state.outcome else None
            log.error(
                "%s: giving up after %d tries in %.1f s (deadline %g s%s): %s",
                self._what,
                state.attempt_number,
                self.elapsed(),
                self._deadline_s,
                "; a stop was asked for" if self._stopping() else "",
                exc,
            )
        return done

    def wait(self, state: RetryCallState) -> float:
        left = max(0.0, self._deadline_s - self.elapsed())
        return min(left, self._policy.wait_s(state.attempt_number))


def retrying(
    deadline_s: float,
    what: str,
    *,
    server: str = "server",
    policy: RetryPolicy = DEFAULT_POLICY,
    outage: Callable[[BaseException], bool] = is_outage,
    keepalive: Callable[[], None] = _nothing,
    stopping: Callable[[], bool] = _never,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Retrying:
    """A tenacity ``Retrying`` of the policy: outages retried until ``deadline_s``, then raised.

    Use it as ``for attempt in retrying(...): with attempt: ...`` or ``retrying(...)(fn, *a)``;
    make one per operation (it holds the operation's start).

    Args:
        deadline_s: how long after the first try the last may start (0: tried once).
        what: the operation, for the log lines (``subject x``, ``GET /api/...``).
        server: what does not answer, for the log lines (``registry``, ``MLflow server``).
        policy: the backoff (``Config.retry``'s ``policy()`` in the worker).
        outage: whether an exception is an outage (default: the error tree's, ``is_outage``);
            a ``ConfigError`` is never retried, whatever it says.
        keepalive: runs before every wait (the worker serves its producer and health there).
        stopping: ends the retries early (a stop signal); the last error is raised.
        sleep: the wait (tests pass a fake one).
        clock: the time in seconds (tests pass a fake one).
    """
    deadline = _Deadline(deadline_s, policy, what, stopping, clock)

    def retried(exc: BaseException) -> bool:
        return classify(exc) != "configuration" and outage(exc)

    def before_sleep(state: RetryCallState) -> None:
        keepalive()
        if state.attempt_number in (1, 5) or state.attempt_number % 20 == 0:
            # the first retry is news, not yet a problem (a fresh broker's coordinator loads for
            # a second or two): a warning once it has lasted five tries (~3 s), then every 20th
            level = logging.INFO if state.attempt_number == 1 else logging.WARNING
            exc = state.outcome.exception() if state.outcome else None
            log.log(level, "%s: %s not answering, retrying (attempt %d): %s", what, server,
                    state.attempt_number, exc)  # fmt: skip

    return Retrying(
        retry=retry_if_exception(retried),
        wait=deadline.wait,
        stop=deadline.stop,
        before=deadline.begin,
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )


def retried(
    deadline_s: float, *, server: str = "server", **options: Any
) -> Callable[[Callable[_P, _T]], Callable[_P, _T]]:
    """Decorate a function so that every call of it is ``retrying(deadline_s, ...)``'s.

    ``options``: ``retrying``'s (``outage``, ``policy``, ...); the operation is the function's
    name.
    """

    def decorate(fn: Callable[_P, _T]) -> Callable[_P, _T]:
        @functools.wraps(fn)
        def call(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            attempts = retrying(deadline_s, fn.__name__, server=server, **options)
            return attempts(fn, *args, **kwargs)

        return call

    return decorate
