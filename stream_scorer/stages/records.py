"""Values that flow between the stages, and the small protocols the stages depend on.

Nothing here imports Kafka: a confluent-kafka ``Message`` satisfies ``Message`` structurally,
and unit tests pass plain objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

Headers = Sequence[tuple[str, bytes | None]]


class Message(Protocol):
    """The parts of a consumed Kafka record the pipeline reads."""

    def topic(self) -> str | None: ...  # noqa: D102
    def partition(self) -> int | None: ...  # noqa: D102
    def offset(self) -> int | None: ...  # noqa: D102
    def key(self) -> bytes | None: ...  # noqa: D102
    def value(self) -> bytes | None: ...  # noqa: D102
    def headers(self) -> Headers | None: ...  # noqa: D102
    def timestamp(self) -> tuple[int, int]: ...  # noqa: D102


@dataclass(slots=True)
class PlainMessage:
    """A consumed record without Kafka: a plain value with the ``Message`` methods.

    For the benchmark's pure-pipeline profile and the tests (records the pipeline reads
    without a broker).
    """

    val: bytes | None
    k: bytes | None = b"key"
    t: str = "in"
    p: int = 0
    o: int = 0
    ts: int = 1_763_900_000_000
    hdrs: list[tuple[str, bytes | None]] = field(default_factory=list)

    def topic(self) -> str:
        """The topic."""
        return self.t

    def partition(self) -> int:
        """The partition."""
        return self.p

    def offset(self) -> int:
        """The offset."""
        return self.o

    def key(self) -> bytes | None:
        """The key."""
        return self.k

    def value(self) -> bytes | None:
        """The value."""
        return self.val

    def headers(self) -> list[tuple[str, bytes | None]]:
        """The headers."""
        return self.hdrs

    def timestamp(self) -> tuple[int, int]:
        """(create time, milliseconds)."""
        return (1, self.ts)


class Stage(StrEnum):
    """The pipeline stage at which a record was rejected."""

    DECODE = "decode"
    FEATURES = "features"
    SCORE = "score"
    ENCODE = "encode"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot be scored, with everything needed to find and replay it.

    Attributes:
        message: the original record (its key, value and headers are published unchanged).
        stage: where it was rejected.
        reason: a short stable code, e.g. ``truncated`` or ``non_finite``; metrics label.
        error_type: the exception class (or ``stream_scorer`` for our own guards).
        error_message: a human-readable explanation.
    """

    message: Message
    stage: Stage
    reason: str
    error_type: str
    error_message: str


@dataclass(frozen=True, slots=True)
class Decoded:
    """A record that decoded cleanly."""

    message: Message
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Scored:
    """A batch's predictions ready to publish, as columns (one entry per scored record).

    Attributes:
        messages: the records scored, in input order.
        values: the encoded prediction of each.
        event_ms: the event time written into each prediction (0: unknown).
    """

    messages: list[Message]
    values: list[bytes]
    event_ms: list[int]

    def __len__(self) -> int:
        """How many predictions."""
        return len(self.messages)
