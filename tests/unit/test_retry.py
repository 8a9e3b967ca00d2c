"""The one retry policy (stream_scorer.retry), its paths, and the one bounded produce loop."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from support import http_server, load_raw, ride_config

from stream_scorer.clients import produce_retrying
from stream_scorer.errors import (
    BrokerError,
    ConfigError,
    ModelError,
    RefusedError,
    RegistryError,
    UnavailableError,
)
from stream_scorer.kafka.topics import kafka_busy
from stream_scorer.registry import RegistryClient
from stream_scorer.retry import RetryPolicy, classify, retried, retrying
from stream_scorer.worker.delivery import ProducerEvents, logged_refusal

SCHEMA = json.dumps({"type": "record", "name": "R", "fields": []})


class FakeTime:
    """A clock that only the fake sleep moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


# --- classification ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ConfigError("x.y", "bad"), "configuration"),
        (RefusedError("registry.username", "401", url="http://r", status=401), "configuration"),
        (UnavailableError("down"), "outage"),
        (RegistryError("down", status=503), "outage"),
        (BrokerError("refused"), "failure"),
        (ModelError("corrupt"), "failure"),
        (ValueError("a bug"), "failure"),
    ],
)
def test_errors_are_classified_once_on_the_error_tree(exc: BaseException, kind: str) -> None:
    assert classify(exc) == kind


@pytest.mark.parametrize(
    ("code", "busy"),
    [
        (KafkaError.NOT_COORDINATOR, True),
        (KafkaError.COORDINATOR_LOAD_IN_PROGRESS, True),
        (KafkaError._TIMED_OUT, True),
        (KafkaError.GROUP_AUTHORIZATION_FAILED, False),
        (KafkaError.GROUP_ID_NOT_FOUND, False),
    ],
)
def test_a_busy_coordinator_is_the_kafka_outage(code: int, busy: bool) -> None:
    assert kafka_busy(KafkaException(KafkaError(code))) is busy
    assert kafka_busy(RuntimeError("x")) is False


# --- the policy (fake clock and sleep) ----------------------------------------------------
def test_the_backoff_doubles_up_to_its_cap_with_jitter_on_top() -> None:
    policy = RetryPolicy(initial_s=0.2, max_s=5.0, jitter=0.5)
    assert [policy.wait_s(n, draw=lambda: 0.0) for n in range(1, 8)] == [
        0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0,
    ]  # fmt: skip
    assert policy.wait_s(2, draw=lambda: 1.0) == pytest.approx(0.6)
    assert policy.wait_s(9, draw=lambda: 1.0) == 5.0  # never past the cap


def test_an_outage_is_retried_up_to_the_deadline_then_raised_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, tries, kept = FakeTime(), [], []

    def down() -> None:
        tries.append(fake.now)
        raise UnavailableError(f"down at {fake.now:g}")

    attempts = retrying(
        10.0,
        "GET /x",
        server="test server",
        keepalive=lambda: kept.append(1),
        sleep=fake.sleep,
        clock=fake.clock,
        policy=RetryPolicy(initial_s=1.0, max_s=4.0, jitter=0.0),
    )
    with caplog.at_level(logging.INFO), pytest.raises(UnavailableError, match="down at 10"):
        attempts(down)
    assert fake.waits == [1.0, 2.0, 4.0, 3.0]  # the last wait stops at the deadline
    assert tries == [0.0, 1.0, 3.0, 7.0, 10.0] and len(kept) == 4
    assert "GET /x: test server not answering" in caplog.text
    # the first retry is news (INFO), a warning only once it has lasted five tries
    assert [r.levelname for r in caplog.records if "not answering" in r.getMessage()] == ["INFO"]
    assert "giving up after 5 tries" in caplog.text


@pytest.mark.parametrize(
    "exc",
    [
        RefusedError("registry.username", "401", url="http://r", status=401),
        ConfigError("x", "bad"),
        BrokerError("not an outage"),
    ],
)
def test_what_is_not_an_outage_is_tried_once(exc: Exception) -> None:
    fake, tries = FakeTime(), list[int]()
    with pytest.raises(type(exc)):
        retrying(60.0, "x", sleep=fake.sleep, clock=fake.clock)(_raiser(exc, tries))
    assert len(tries) == 1 and fake.waits == []


def test_a_configuration_error_is_never_retried_whatever_the_predicate() -> None:
    fake, tries = FakeTime(), list[int]()
    refused = RefusedError("registry.username", "403", url="http://r", status=403)
    attempts = retrying(60.0, "x", sleep=fake.sleep, clock=fake.clock, outage=lambda e: True)
    with pytest.raises(RefusedError):
        attempts(_raiser(refused, tries))
    assert len(tries) == 1 and fake.waits == []


def _raiser(exc: Exception, tries: list[int]) -> Any:
    def call() -> None:
        tries.append(1)
        raise exc

    return call


def test_the_outage_predicate_says_what_else_is_retried() -> None:
    fake = FakeTime()
    answers: list[Exception | str] = [KafkaException(KafkaError(KafkaError.NOT_COORDINATOR)), "ok"]

    def ask() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert retrying(5.0, "x", outage=kafka_busy, sleep=fake.sleep, clock=fake.clock)(ask) == "ok"
    assert len(fake.waits) == 1
    refused = KafkaException(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))
    with pytest.raises(KafkaException):
        retrying(5.0, "x", outage=kafka_busy, sleep=fake.sleep, clock=fake.clock)(
            _raiser(refused, [])
        )
    assert len(fake.waits) == 1  # not retried


def test_a_stop_or_a_zero_deadline_tries_once() -> None:
    fake, tries = FakeTime(), list[int]()
    down = _raiser(UnavailableError("down"), tries)
    with pytest.raises(UnavailableError):
        retrying(600.0, "x", stopping=lambda: True, sleep=fake.sleep, clock=fake.clock)(down)
    with pytest.raises(UnavailableError):
        retrying(0.0, "x", sleep=fake.sleep, clock=fake.clock)(down)
    assert len(tries) == 2 and fake.waits == []


def test_the_decorator_starts_each_call_afresh() -> None:
    fake, tries = FakeTime(), list[float]()
    policy = RetryPolicy(initial_s=1.0, max_s=1.0, jitter=0.0)

    @retried(3.0, sleep=fake.sleep, clock=fake.clock, policy=policy)
    def down() -> None:
        tries.append(fake.now)
        raise UnavailableError("down")

    for _ in range(2):
        with pytest.raises(UnavailableError):
            down()
    assert tries == [0.0, 1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0]  # each call has its whole deadline


# --- real paths: a stdlib HTTP server -------------------------------------------------------
def _flaky(statuses: list[int]) -> Any:
    def answer(method: str, path: str) -> tuple[int, Any]:
        status = statuses.pop(0) if statuses else 200
        if status != 200:
            return status, {"error_code": status, "message": f"answer {status}"}
        return 200, {"schema": SCHEMA, "model_version": {"version": "7"}}

    return answer


def test_the_registry_client_rides_out_a_503(tmp_path: Path) -> None:
    from stream_scorer.worker.schemas import WriterSchemas

    with http_server(_flaky([503, 502])) as (url, seen):
        schemas = WriterSchemas(
            None,  # type: ignore[arg-type]  # fetch needs no columns
            RegistryClient(url),
            unavailable_timeout_s=30.0,
            policy=RetryPolicy(initial_s=0.01, max_s=0.02),
        )
        assert schemas.fetch(("id", 1)) == SCHEMA
    assert [p for _m, p, _a in seen] == ["/schemas/ids/1"] * 3


def test_mlflow_reads_ride_out_a_503_and_writes_are_sent_once() -> None:
    from stream_scorer.model.mlflow import MlflowRegistry

    policy = RetryPolicy(initial_s=0.01, max_s=0.02)
    with http_server(_flaky([503])) as (url, seen):
        model = MlflowRegistry(url, retry_deadline_s=30.0, policy=policy).model("m")
        assert model.get_alias("champion") == "7"
    assert len(seen) == 2
    with http_server(_flaky([503])) as (url, seen):
        model = MlflowRegistry(url, retry_deadline_s=30.0, policy=policy).model("m")
        with pytest.raises(UnavailableError, match="HTTP 503"):
            model.set_alias("champion", "7")
    assert len(seen) == 1  # a write is not repeated
    with http_server(_flaky([503])) as (url, seen), pytest.raises(UnavailableError):
        MlflowRegistry(url).model("m").get_alias("champion")  # default: asked once
    assert len(seen) == 1


# --- config -------------------------------------------------------------------------------
def _config(tmp_path: Path, retry: dict[str, Any]) -> Any:
    return load_raw(tmp_path, ride_config(tmp_path, retry=retry))


def test_the_retry_limits_are_configuration(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"initial_backoff_s": 0.5, "max_backoff_s": 8})
    assert cfg.retry.policy() == RetryPolicy(initial_s=0.5, max_s=8.0)
    assert cfg.retry.model_registry_timeout_s == 0.0
    with pytest.raises(ConfigError, match=r"retry\.max_backoff_s: must be at least"):
        _config(tmp_path, {"initial_backoff_s": 2, "max_backoff_s": 1})
    with pytest.raises(ConfigError, match=r"retry\.backoff"):
        _config(tmp_path, {"backoff": 1})


# --- the bounded produce loop ---------------------------------------------------------------
class FullProducer:
    """A producer whose queue stays full (or frees after ``frees_after`` polls)."""

    def __init__(self, fake: FakeTime, frees_after: int | None = None) -> None:
        self.fake, self.frees_after, self.polls, self.produced = fake, frees_after, 0, 0

    def produce(self, topic: str, value: bytes | None = None, **kwargs: Any) -> None:
        if self.frees_after is None or self.polls < self.frees_after:
            raise BufferError("Local: Queue full")
        self.produced += 1

    def poll(self, timeout: float) -> int:
        self.polls += 1
        if self.polls > 10_000:
            raise AssertionError("the queue-full loop is unbounded")
        self.fake.sleep(timeout)
        return 0


def test_a_queue_that_stays_full_ends_in_a_broker_error() -> None:
    fake = FakeTime()
    producer = FullProducer(fake)
    with pytest.raises(BrokerError, match=r"producer queue stayed full for 3 s \[out\]"):
        produce_retrying(producer, "out", b"v", timeout_s=3.0, clock=fake.clock, key=b"k")
    assert producer.polls == pytest.approx(3.0 / 0.05, abs=2)


def test_a_queue_that_frees_is_produced_to() -> None:
    fake = FakeTime()
    producer = FullProducer(fake, frees_after=4)
    produce_retrying(producer, "out", b"v", timeout_s=3.0, clock=fake.clock)
    assert (producer.polls, producer.produced) == (4, 1)


# --- delivery: the one condition read from librdkafka's log --------------------------------
ADDED = 'Failed to add partition "{}" [0] to transaction: {}'


@pytest.mark.parametrize(
    ("line", "found"),
    [
        (
            ADDED.format("dlq", "Broker: Topic authorization failed"),
            (KafkaError.TOPIC_AUTHORIZATION_FAILED, "dlq"),
        ),
        (
            ADDED.format("out", "Broker: Operation not attempted"),
            (KafkaError.OPERATION_NOT_ATTEMPTED, None),
        ),
        (  # the whole request refused: no topic is to blame
            ADDED.format("out", "Broker: Transactional Id authorization failed"),
            (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, None),
        ),
        ("Connect to ipv4#127.0.0.1:1 failed", None),
        ("SASL authorization failed for some reason", None),  # not the client's error text
    ],
)
def test_the_log_is_read_for_the_refused_topic_only(line: str, found: Any) -> None:
    assert logged_refusal(line) == found


def test_a_whole_request_refused_blames_no_topic() -> None:
    events = ProducerEvents()
    events.log(
        logging.ERROR,
        "%s",
        ADDED.format("out", "Broker: Transactional Id authorization failed"),
    )
    assert events.refused_topic is None
