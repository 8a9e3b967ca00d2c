"""``describe_group``: None while the group cannot be had, however the broker fails to answer."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from stream_scorer.kafka.topics import describe_group

pytestmark = pytest.mark.unit


class _Future:
    def __init__(self, outcome: BaseException | str) -> None:
        self.outcome = outcome

    def result(self, timeout: float | None = None) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Admin:
    def __init__(self, outcome: BaseException | str) -> None:
        self.outcome = outcome

    def describe_consumer_groups(self, groups: list[str], **kwargs: Any) -> dict[str, _Future]:
        return {g: _Future(self.outcome) for g in groups}


@pytest.mark.parametrize(
    "outcome",
    [
        KafkaException(KafkaError(KafkaError.COORDINATOR_LOAD_IN_PROGRESS)),
        TimeoutError(),  # the future's own timeout (a demo run failed on it under load)
    ],
)
def test_no_answer_is_none(outcome: BaseException) -> None:
    assert describe_group(_Admin(outcome), "g", timeout_s=0.1) is None  # type: ignore[arg-type]


def test_an_answer_is_returned() -> None:
    assert describe_group(_Admin("described"), "g") == "described"  # type: ignore[arg-type]
