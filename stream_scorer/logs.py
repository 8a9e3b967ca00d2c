"""Logging: one JSON object per line, or readable text on a terminal; secrets never logged.

Every event carries ``ts``, ``level``, ``logger``, ``msg``, and the process context set with
``set_context`` (``worker_id``, ``group``); ``topic``, ``partition``, ``offset``, ``error`` and
other fields come from a call's ``extra={...}`` (README.md, "Logs"). Values of keys that look
secret (password, secret, token, key) are replaced by ``***`` in fields and in messages'
``name=value`` and ``'name': 'value'`` pairs; a prose ``name: value`` only when the name is a
known secret (``password``, ``sasl.password``, ``token``, ...); passwords in URLs
(``scheme://user:password@``) too.

The Kafka clients' own lines (``client_logger``) go through a ``RepeatFilter``: a client that
cannot reach a broker says so several times a second, and that becomes one line and a count.
"""

from __future__ import annotations

import atexit
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from stream_scorer.urls import USERINFO

_CONTEXT: dict[str, str] = {}
_SECRET = r"[\w.\-]*(?:password|secret|token|sasl\.oauthbearer\.config|\bkey)[\w.\-]*"
#: Names that *are* secrets, not merely look like one: the last part (after ``.``, ``_``, ``-``)
#: says so (``sasl.password``, ``client_secret``, ``ssl.key.pem``), or a known key-material name.
_KNOWN_SECRET = (
    r"(?:[\w.\-]*[._\-])?(?:password|passwd|secret|token|pem|credentials)"
    r"|[\w.\-]*(?:sasl\.oauthbearer\.config|ssl\.keystore\.key)"
)
# `name': 'value'`, `"name": "value"`, `name=value` with a secret-looking name; prose `name: value`
# (unquoted name and a colon) only with a known secret name: "--private-key: dead letter ..." is
# a sentence, not a secret; nor is a configuration error's `config: <key>: <problem>`
# (``ConfigError`` lists its problems after "config: " and "; ", and never quotes a secret value)
_SECRET_IN_TEXT = re.compile(
    rf"""(?P<name>['"]{_SECRET}['"]\s*[:=]\s*|(?<![\w.\-]){_SECRET}\s*=\s*"""
    rf"""|(?<![\w.\-])(?<!config: )(?<!; )(?:{_KNOWN_SECRET})\s*:\s*)"""
    rf"""(?P<q>['"]?)(?P<value>[^'",\s}}]*)(?P=q)""",
    re.IGNORECASE,
)
_SECRET_NAME = re.compile(_SECRET, re.IGNORECASE)
#: LogRecord attributes that are not user fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_HANDLER_MARK = "_stream_scorer_handler"


def set_context(**fields: str) -> None:
    """Add fields (e.g. ``worker_id``, ``group``) to every later event of this process."""
    _CONTEXT.update({k: v for k, v in fields.items() if v})


def redact_text(text: str) -> str:
    """Replace secret values in ``text`` by ``***``.

    Those of ``name=value`` / ``'name': 'value'`` pairs with a secret-looking name, of a prose
    ``name: value`` with a known secret name, and URL passwords (``scheme://user:***@``).
    """
    text = USERINFO.sub(lambda m: f"{m['head']}***@", text)
    return _SECRET_IN_TEXT.sub(lambda m: f"{m['name']}{m['q']}***{m['q']}", text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = dict(_CONTEXT)
    for key, value in vars(record).items():
        if key in _STANDARD or key.startswith("_"):
            continue
        out[key] = "***" if _SECRET_NAME.fullmatch(key) else value
    return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single-line JSON object."""
        event: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": redact_text(record.getMessage()),
        }
        event.update(_fields(record))
        if record.exc_info:
            event["error"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(event, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for people at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as one readable line (plus a traceback when there is one)."""
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{when} {record.levelname:<7} {record.name}: {redact_text(record.getMessage())}"
        line = f"{line}  [{extra}]" if extra else line
        if record.exc_info:
            line += "\n" + redact_text(self.formatException(record.exc_info))
        return line


def setup(fmt: str = "auto", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send the process's logs to ``stream`` (default stderr) in ``fmt`` at ``level``.

    ``auto`` means text when the stream is a terminal, else JSON. Calling again replaces the
    handler installed before (handlers others installed, e.g. pytest's, are left alone).
    """
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        fmt = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


#: A line of a kind seen again within this many seconds of the last one is a repeat: held
#: back and counted. Longer than librdkafka's longest reconnect backoff (10 s by default), so
#: a broker that stays unreachable is one episode, not one line every backoff.
REPEAT_QUIET_S = 15.0
#: While a kind keeps repeating, how often a line says how many repeats were held back.
REPEAT_REPORT_S = 60.0
#: Parts of a message that differ between repeats of one kind: durations, and librdkafka's own
#: "N identical error(s) suppressed" note. Addresses, codes and states stay: "Connection
#: refused" from another broker, or in another state, is another kind.
_DURATION = re.compile(r"\b\d+(?:\.\d+)?\s?ms\b")
_SUPPRESSED = re.compile(r", \d+ identical error\(s\) suppressed")
_SUMMARY_MARK = "_repeat_summary"
#: Runs ``callback`` after ``delay`` seconds (``threading.Timer`` by default; tests pass a fake).
Scheduler = Callable[[float, Callable[[], None]], None]


def _timer(delay: float, callback: Callable[[], None]) -> None:
    timer = threading.Timer(delay, callback)
    timer.daemon = True
    timer.start()


@dataclass
class _Episode:
    """A kind of line seen and not yet quiet, and its repeats held back."""

    last: float  # the last line of the kind
    reported: float  # when held-back repeats were last reported, or the episode began
    held: int = 0
    record: logging.LogRecord | None = None  # the last held-back repeat


class RepeatFilter(logging.Filter):
    """Let the first line of a kind through, hold back its repeats, then say how many there were.

    A kind is the logger, the level and the message without its durations and librdkafka's
    "identical error(s) suppressed" note. A line of a kind seen within ``quiet_s`` of its
    previous one is held back and counted. When the kind has been quiet for ``quiet_s``, and
    every ``report_s`` while it goes on, one line repeats the last held-back message with
    "(repeated N times in S s)", S counted from the line said before; nothing is said when
    nothing was held back. The next line of a quiet kind starts a new
    episode and passes. Checks run on every line through the filter and on a timer armed while
    something is held back, so a summary comes even when the client falls silent.
    """

    def __init__(
        self,
        quiet_s: float = REPEAT_QUIET_S,
        report_s: float = REPEAT_REPORT_S,
        *,
        clock: Callable[[], float] = time.monotonic,
        schedule: Scheduler = _timer,
    ) -> None:
        """Hold back repeats closer than ``quiet_s``; report them at least every ``report_s``."""
        super().__init__()
        self._quiet = quiet_s
        self._report = report_s
        self._clock = clock
        self._schedule = schedule
        self._episodes: dict[tuple[str, int, str], _Episode] = {}
        self._lock = threading.RLock()
        self._armed = False

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass the first line of a kind and the summaries; hold back repeats."""
        if getattr(record, _SUMMARY_MARK, False):
            return True
        kind = _DURATION.sub("#", _SUPPRESSED.sub("", record.getMessage()))
        key = (record.name, record.levelno, kind)
        with self._lock:
            now = self._clock()
            self._report_due(now)
            episode = self._episodes.get(key)
            if episode is None:
                self._episodes[key] = _Episode(last=now, reported=now)
                return True
            episode.last = now
            episode.held += 1
            episode.record = record
            if not self._armed:
                self._armed = True
                self._schedule(self._quiet, self.flush)
            return False

    def flush(self, final: bool = False) -> None:
        """Report what is due now (the timer's callback), or all that is held when ``final``.

        Never raises.
        """
        try:
            with self._lock:
                self._armed = False
                self._report_due(self._clock(), final)
                if any(e.held for e in self._episodes.values()):
                    self._armed = True
                    self._schedule(self._quiet, self.flush)
        except Exception:  # pragma: no cover - defensive: a timer callback must not raise
            logging.getLogger(__name__).exception("summarising repeated log lines failed")

    def _report_due(self, now: float, final: bool = False) -> None:
        """End quiet episodes and report held-back repeats that are due (lock held)."""
        for key, episode in list(self._episodes.items()):
            quiet = final or now - episode.last >= self._quiet
            if episode.held and (quiet or now - episode.reported >= self._report):
                self._summarise(episode, now)
            if quiet:
                del self._episodes[key]

    def _summarise(self, episode: _Episode, now: float) -> None:
        held = episode.record
        assert held is not None
        summary = logging.makeLogRecord(vars(held))
        span = episode.last - episode.reported
        summary.msg = f"{held.getMessage()} (repeated {episode.held} times in {span:.1f} s)"
        summary.args = None
        summary.created = time.time()  # said now
        summary.msecs = summary.created % 1 * 1000
        setattr(summary, _SUMMARY_MARK, True)
        episode.held, episode.record, episode.reported = 0, None, now
        logging.getLogger(held.name).handle(summary)


def client_logger(client: str) -> logging.Logger:
    """``librdkafka.<client>``: where a Kafka client's own lines go, repeats summarised.

    For the client's ``logger`` setting (librdkafka's log lines) and for what its
    ``error_cb`` reports; every client of the process uses one of these.
    """
    logger = logging.getLogger(f"librdkafka.{client}")
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        repeats = RepeatFilter()
        logger.addFilter(repeats)
        atexit.register(_flush_at_exit, logger, repeats)
    return logger


def _flush_at_exit(logger: logging.Logger, repeats: RepeatFilter) -> None:
    """Report what is still held, before logging shuts down (if anything still listens).

    A handler whose stream is closed by now (a test runner's captured stderr) does not listen.
    """
    if any(_listening(h) for h in _handlers(logger)):
        repeats.flush(final=True)


def _handlers(logger: logging.Logger) -> list[logging.Handler]:
    """The handlers a record of ``logger`` reaches (its own and its ancestors', as propagated)."""
    found: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        found.extend(current.handlers)
        current = current.parent if current.propagate else None
    return found


def _listening(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return stream is None or not getattr(stream, "closed", False)
