"""Logging: one JSON object per line, or readable text on a terminal; secrets never logged.

Every event carries ``ts``, ``level``, ``logger``, ``msg``, and the process context set with
``set_context`` (``worker_id``, ``group``); ``topic``, ``partition``, ``offset``, ``error`` and
other fields come from a call's ``extra={...}`` (README.md, "Logs"). Values of keys that look
secret (password, secret, token, key) are replaced by ``***`` both in fields and in messages.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_CONTEXT: dict[str, str] = {}
_SECRET = r"[\w.\-]*(?:password|secret|token|sasl\.oauthbearer\.config|\bkey)[\w.\-]*"
# `name': 'value'`, `"name": "value"`, `name=value`, `name: value` with a secret-looking name
_SECRET_IN_TEXT = re.compile(
    rf"""(?P<name>['"]?{_SECRET}['"]?\s*[:=]\s*)(?P<q>['"]?)(?P<value>[^'",\s}}]*)(?P=q)""",
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
    """Replace the values of secret-looking ``name=value`` / ``'name': 'value'`` pairs."""
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
