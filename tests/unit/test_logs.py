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
        # prose "name: value" is redacted for known secret names only (issue: over-redaction)
        (
            "--private-key: dead letter enc-dlq/0/0 cannot be decrypted",
            "--private-key: dead letter enc-dlq/0/0 cannot be decrypted",
        ),
        ("the primary key: ride_id", "the primary key: ride_id"),
        # a configuration error names the key, never its value: its problems are not secrets
        (
            "config: kafka.client.sasl.passwd: librdkafka refuses the consumer's settings",
            "config: kafka.client.sasl.passwd: librdkafka refuses the consumer's settings",
        ),
        (
            "config: a: is required; registry.password: give it once",
            "config: a: is required; registry.password: give it once",
        ),
        ("key: value", "key: value"),
        ("password: hunter2 and more", "password: *** and more"),
        ("sasl.password: hunter2", "sasl.password: ***"),
        ("oauth token: abc", "oauth token: ***"),
        ("ssl.key.pem: -----BEGIN", "ssl.key.pem: ***"),
        ("sasl.oauthbearer.config: principal=x", "sasl.oauthbearer.config: ***"),
        ("ssl.key.password = 'abc'", "ssl.key.password = '***'"),
        # URL user-info: the password goes, the user and the host stay
        ("at http://bob:hunter2@sr:8081/apis failed", "at http://bob:***@sr:8081/apis failed"),
        ("https://bob:p@ss@sr/x", "https://bob:***@sr/x"),
        ("<urlopen error http://a:b%40c@h>", "<urlopen error http://a:***@h>"),
        ("http://sr:8081/apis and user@example.com", "http://sr:8081/apis and user@example.com"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert logs.redact_text(text) == expected


# --- repeated client lines ----------------------------------------------------------------
REFUSED = (
    "FAIL [stream-scorer-w1#consumer-1] [thrd:10.0.0.1:9092/bootstrap]: 10.0.0.1:9092/bootstrap: "
    "Connect to ipv4#10.0.0.1:9092 failed: Connection refused (after {ms}ms in state CONNECT{more})"
)


class Repeats:
    """A RepeatFilter on its own logger, a fake clock and a fake timer."""

    def __init__(self, name: str) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Any]] = []
        self.filter = logs.RepeatFilter(
            15.0, 60.0, clock=lambda: self.now, schedule=lambda d, cb: self.timers.append((d, cb))
        )
        self.log = logging.getLogger(name)
        self.log.addFilter(self.filter)

    def at(self, t: float, msg: str, level: int = logging.ERROR) -> None:
        self.now = t
        self.log.log(level, "%s", msg)

    def fire_timers(self, t: float) -> None:
        """Time passes to ``t``; the timers armed meanwhile go off."""
        self.now = t
        timers, self.timers = self.timers, []
        for _delay, callback in timers:
            callback()

    def close(self) -> None:
        self.log.removeFilter(self.filter)


@pytest.fixture
def repeats(request: pytest.FixtureRequest) -> Iterator[Repeats]:
    r = Repeats(f"librdkafka.test-{request.node.name}")
    yield r
    r.close()


def _msgs(stream: io.StringIO) -> list[str]:
    return [e["msg"] for e in _events(stream)]


def test_a_repeated_client_line_is_said_once_then_counted(
    capture: io.StringIO, repeats: Repeats
) -> None:
    repeats.at(0.0, REFUSED.format(ms=0, more=""))
    for i in range(1, 36):  # librdkafka retrying every half second for 18 s
        more = ", 1 identical error(s) suppressed" if i % 2 else ""
        repeats.at(i * 0.5, REFUSED.format(ms=i % 3, more=more))
    assert _msgs(capture) == [REFUSED.format(ms=0, more="")]
    assert repeats.timers and repeats.timers[0][0] == 15.0  # one timer armed, not one per line
    assert len(repeats.timers) == 1
    repeats.fire_timers(17.5 + 15.0)  # the broker is back: the lines stop; quiet 15 s later
    first, summary = _events(capture)
    assert summary["msg"].endswith("(repeated 35 times in 17.5 s)")
    assert "Connection refused" in summary["msg"] and summary["level"] == "ERROR"
    assert summary["logger"] == first["logger"]
    assert not repeats.timers  # nothing held back: no timer re-armed
    repeats.at(100.0, REFUSED.format(ms=0, more=""))  # a new outage: said again
    assert len(_events(capture)) == 3


def test_other_kinds_pass_and_a_quiet_kind_is_summarised_on_the_next_line(
    capture: io.StringIO, repeats: Repeats
) -> None:
    other_broker = REFUSED.format(ms=0, more="").replace("10.0.0.1", "10.0.0.2")
    repeats.at(0.0, REFUSED.format(ms=0, more=""))
    repeats.at(1.0, other_broker)  # another broker: another kind
    repeats.at(2.0, REFUSED.format(ms=0, more=""), logging.WARNING)  # another level
    repeats.at(3.0, REFUSED.format(ms=5, more=""))  # a repeat
    assert len(_msgs(capture)) == 3
    repeats.at(20.0, "Disconnected")  # the state changed; the first kind has been quiet 17 s
    msgs = _msgs(capture)
    assert msgs[3].endswith("(repeated 1 times in 3.0 s)") and msgs[4] == "Disconnected"


def test_a_flood_that_goes_on_is_reported_every_report_interval(
    capture: io.StringIO, repeats: Repeats
) -> None:
    for i in range(0, 131):  # one line a second for 130 s
        repeats.at(float(i), REFUSED.format(ms=0, more=""))
    msgs = _msgs(capture)
    assert len(msgs) == 3  # the first line and two reports (at 60 s and 120 s)
    # the repeats since the line said before, up to the last one
    assert msgs[1].endswith("(repeated 59 times in 59.0 s)")  # 1 … 59
    assert msgs[2].endswith("(repeated 60 times in 59.0 s)")  # 60 … 119


def test_a_final_flush_reports_what_is_still_held(capture: io.StringIO, repeats: Repeats) -> None:
    repeats.at(0.0, "Connection refused")
    repeats.at(1.0, "Connection refused")
    repeats.at(2.0, "Connection refused")
    repeats.filter.flush()  # not quiet yet: nothing due
    assert len(_msgs(capture)) == 1
    repeats.filter.flush(final=True)  # the process exits
    assert _msgs(capture)[1] == "Connection refused (repeated 2 times in 2.0 s)"


def test_client_loggers_summarise_repeats_once() -> None:
    logger = logs.client_logger("test-client")
    assert logs.client_logger("test-client") is logger
    assert sum(isinstance(f, logs.RepeatFilter) for f in logger.filters) == 1
    assert logger.name == "librdkafka.test-client"


def test_the_exit_flush_reports_only_where_a_stream_still_listens(repeats: Repeats) -> None:
    log = repeats.log
    stderr = io.StringIO()
    handler = logging.StreamHandler(stderr)
    log.addHandler(handler)
    log.propagate = False  # only the handler of this test (not pytest's own)
    try:
        for t in (0.0, 1.0, 2.0):
            repeats.at(t, "Connection refused")
        stderr.close()  # a test runner's captured stderr, closed before the interpreter exits
        logs._flush_at_exit(log, repeats.filter)  # nothing written: no "--- Logging error ---"
        handler.setStream(reopened := io.StringIO())
        logs._flush_at_exit(log, repeats.filter)  # still held, now said
        assert reopened.getvalue().splitlines() == [
            "Connection refused (repeated 2 times in 2.0 s)"
        ]
    finally:
        log.removeHandler(handler)
        log.propagate = True
