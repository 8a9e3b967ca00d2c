"""Structured logs: one JSON object per line, context fields, text on a terminal, no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from stream_scorer import logs
from stream_scorer.config import redacted


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def capture() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    saved_level = logging.getLogger().level
    saved_context = dict(logs._CONTEXT)
    logs.setup("json", "DEBUG", stream)
    try:
        yield stream
    finally:
        root = logging.getLogger()
        for h in [h for h in root.handlers if getattr(h, "_stream_scorer_handler", False)]:
            root.removeHandler(h)
        root.setLevel(saved_level)
        logs._CONTEXT.clear()
        logs._CONTEXT.update(saved_context)


def _events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_one_json_object_per_line_with_context_and_fields(capture: io.StringIO) -> None:
    logs.set_context(worker_id="w-1", group="g1")
    log = logging.getLogger("stream_scorer.test")
    log.warning("partition stalled at %d\nsecond line", 42, extra={"topic": "in", "partition": 3})
    log.debug("quiet")
    lines = capture.getvalue().splitlines()
    assert len(lines) == 2  # the newline in the message is escaped, not a second event
    first, second = _events(capture)
    assert first["level"] == "WARNING"
    assert first["logger"] == "stream_scorer.test"
    assert first["msg"] == "partition stalled at 42\nsecond line"
    assert (first["worker_id"], first["group"]) == ("w-1", "g1")
    assert (first["topic"], first["partition"]) == ("in", 3)
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert second["level"] == "DEBUG" and second["msg"] == "quiet"


def test_exception_goes_into_the_error_field(capture: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed", extra={"offset": 7})
    (event,) = _events(capture)
    assert event["msg"] == "failed"
    assert event["offset"] == 7
    assert "ValueError: boom" in event["error"]


SECRET = "hunter2-Sup3r"


@pytest.mark.parametrize(
    ("fmt", "args"),
    [
        ("settings: %s", ({"sasl.username": "bob", "sasl.password": SECRET},)),
        ("settings: %s", (json.dumps({"ssl.key.password": SECRET}),)),
        ("connect with sasl.password=%s and more", (SECRET,)),
        ("oauth token: %s", (SECRET,)),
        ("client_secret = '%s'", (SECRET,)),
    ],
)
def test_secrets_are_never_logged(capture: io.StringIO, fmt: str, args: tuple[Any, ...]) -> None:
    logging.getLogger("x").info(fmt, *args, extra={"sasl_password": SECRET})
    out = capture.getvalue()
    assert SECRET not in out
    assert "***" in out


def test_ordinary_values_are_kept(capture: io.StringIO) -> None:
    logging.getLogger("x").info("settings: %s", {"sasl.username": "bob", "acks": "all"})
    (event,) = _events(capture)
    assert "'sasl.username': 'bob'" in event["msg"]
    assert "'acks': 'all'" in event["msg"]


def test_config_redaction_and_log_redaction_agree(capture: io.StringIO) -> None:
    settings = {"sasl.password": SECRET, "bootstrap.servers": "b:9092"}
    logging.getLogger("x").info("consumer settings: %s", redacted(settings))
    assert SECRET not in capture.getvalue()
    assert "b:9092" in capture.getvalue()


def test_auto_is_text_on_a_terminal_and_json_otherwise() -> None:
    root = logging.getLogger()
    saved = root.level
    tty, pipe = Tty(), io.StringIO()
    try:
        logs.setup("auto", "INFO", tty)
        logging.getLogger("t").info("hello %s", "there", extra={"partition": 1})
        logs.setup("auto", "INFO", pipe)  # replaces the handler installed before
        logging.getLogger("t").info("hello %s", "again")
    finally:
        for h in [h for h in root.handlers if getattr(h, "_stream_scorer_handler", False)]:
            root.removeHandler(h)
        root.setLevel(saved)
    text = tty.getvalue()
    assert "INFO" in text and "t: hello there" in text and "partition=1" in text
    assert not text.lstrip().startswith("{")
    assert "again" not in text
    assert json.loads(pipe.getvalue())["msg"] == "hello again"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("password=abc rest", "password=*** rest"),
        ("{'sasl.password': 'abc', 'x': 'y'}", "{'sasl.password': '***', 'x': 'y'}"),
        ('{"api_token": "abc"}', '{"api_token": "***"}'),
        ("monkey=3 keyboard", "monkey=3 keyboard"),
        ("offset=5 partition=2", "offset=5 partition=2"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert logs.redact_text(text) == expected
