"""Values that flow between the stages, and the small protocols the stages depend on.

Nothing here imports Kafka: a confluent-kafka ``Message`` satisfies ``Message`` structurally,
and unit tests pass plain objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

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
    CONSUME = "consume"


class Reason(StrEnum):
    """Why a record was dead-lettered: the one list of reason codes.

    A reason is the ``stream_scorer.error.reason`` header of its dead letter, the ``reason``
    label of ``stream_scorer_dead_letters_total`` and what ``dlq replay --reason`` selects, so
    its value never changes. ``reason.stage`` is the stage that emits it. Everything else
    derives from this enumeration: ``DECODE_REASONS`` and ``FEATURE_REASONS`` below, the fast
    path's decode statuses (``fast.kernel.REASONS``: the decode reasons in this order) and its
    feature verdicts. The manual's reason table (docs/manual/dead-letters.md) lists the members
    in this order.
    """

    stage: Stage

    def __new__(cls, code: str, stage: Stage) -> Reason:
        """A member whose value is ``code``, emitted by ``stage``."""
        member = str.__new__(cls, code)
        member._value_ = code
        member.stage = stage
        return member

    #: decode: the record value is null (a tombstone).
    NULL_VALUE = "null_value", Stage.DECODE
    #: decode: the value has no bytes.
    EMPTY = "empty", Stage.DECODE
    #: decode: the value is larger than ``input.max_message_bytes``; not read.
    TOO_LARGE = "too_large", Stage.DECODE
    #: decode: the value ends inside a field, or a length or block byte size exceeds the rest.
    TRUNCATED = "truncated", Stage.DECODE
    #: decode: a varint whose first 10 bytes all have the continuation bit set.
    VARINT_TOO_LONG = "varint_too_long", Stage.DECODE
    #: decode: an ``int`` (or enum index) beyond 32 bits, or a ``long`` beyond 64 bits.
    INT_OUT_OF_RANGE = "int_out_of_range", Stage.DECODE
    #: decode: a negative string/bytes length or array/map block byte size.
    NEGATIVE_LENGTH = "negative_length", Stage.DECODE
    #: decode: an enum index outside the symbols.
    BAD_ENUM_INDEX = "bad_enum_index", Stage.DECODE
    #: decode: a union index outside the branches.
    BAD_UNION_INDEX = "bad_union_index", Stage.DECODE
    #: decode: an array/map block announcing more items than the bytes left can hold.
    COUNT_TOO_LARGE = "count_too_large", Stage.DECODE
    #: decode: a string (or map key) that is not valid UTF-8.
    INVALID_UTF8 = "invalid_utf8", Stage.DECODE
    #: decode: the record ends before the value does.
    TRAILING_BYTES = "trailing_bytes", Stage.DECODE
    #: decode: anything else the value's bytes get wrong (see ``avro_guard``).
    MALFORMED_AVRO = "malformed_avro", Stage.DECODE
    #: decode (``input.format: confluent``): the value's first byte is not the magic byte 0
    #: and no ``__value_schema_id`` header names its schema.
    BAD_MAGIC_BYTE = "bad_magic_byte", Stage.DECODE
    #: decode (confluent): the value or the schema id header is shorter than its frame.
    SHORT_FRAME = "short_frame", Stage.DECODE
    #: decode (confluent): the registry has no schema with the frame's id (or GUID).
    UNKNOWN_SCHEMA_ID = "unknown_schema_id", Stage.DECODE
    #: decode (confluent): the writer schema cannot be resolved against the reader schema (a
    #: reader field without a default that the writer lacks, types that do not match, ...).
    SCHEMA_MISMATCH = "schema_mismatch", Stage.DECODE
    #: features: the value is null or absent and the ``missing`` policy is ``dead_letter``.
    MISSING_VALUE = "missing_value", Stage.FEATURES
    #: features: the value is NaN and the ``nan`` policy is ``dead_letter``.
    NAN_VALUE = "nan_value", Stage.FEATURES
    #: features: the value is infinite or beyond float32 and the ``infinite`` policy says so.
    NON_FINITE = "non_finite", Stage.FEATURES
    #: features: the value is outside ``min``/``max`` and the ``out_of_range`` policy says so.
    OUT_OF_RANGE = "out_of_range", Stage.FEATURES
    #: features: a ``category`` feature's value is not one of its categories and the ``unseen``
    #: policy is ``dead_letter``.
    UNSEEN_CATEGORY = "unseen_category", Stage.FEATURES
    #: features: a ``number`` feature's value is not a number.
    NOT_NUMERIC = "not_numeric", Stage.FEATURES
    #: features: an ``hour_of_day``/``day_of_week`` feature's value is not a timestamp.
    NOT_TIMESTAMP = "not_timestamp", Stage.FEATURES
    #: score: the model raised on this record alone.
    MODEL_FAILED = "model_failed", Stage.SCORE
    #: score: the model returned NaN or infinity for this record.
    NON_FINITE_PREDICTION = "non_finite_prediction", Stage.SCORE
    #: encode: the prediction record could not be encoded.
    ENCODE_FAILED = "encode_failed", Stage.ENCODE
    #: consume (share groups): the broker delivered the record ``input.delivery_limit`` times
    #: without it being acknowledged (its workers died or failed on it); not scored again.
    DELIVERY_LIMIT = "delivery_limit", Stage.CONSUME


def reasons_of(stage: Stage) -> tuple[Reason, ...]:
    """The reasons ``stage`` emits, in ``Reason``'s order."""
    return tuple(r for r in Reason if r.stage is stage)


#: Every reason code of the decode stage (the fast path's kernel numbers them in this order).
DECODE_REASONS = reasons_of(Stage.DECODE)
#: Every reason code of the feature stage.
FEATURE_REASONS = reasons_of(Stage.FEATURES)


#: Decode reasons about the value's size, not its bytes: no hint (``not_avro_hint``) for them.
_SIZE_REASONS = frozenset({Reason.NULL_VALUE, Reason.EMPTY, Reason.TOO_LARGE})


def not_avro_hint(value: bytes | None, schema: str, reason: Reason) -> str:
    """A hint for a schemaless value that did not decode, when it starts like something else.

    JSON (``{`` or ``[``, after white space) or a Confluent frame (magic byte 0 and a 4-byte
    schema id): ``"; the value does not look like Avro of schema X: ...; is the producer
    writing JSON or framed Avro (input.format: confluent)?"``; otherwise, and for
    ``null_value``, ``empty`` and ``too_large``, ``""``.
    """
    if not value or reason in _SIZE_REASONS:
        return ""
    if value.lstrip()[:1] in (b"{", b"["):
        looks = "it starts like JSON"
    elif value[0] == 0 and len(value) > 5:
        schema_id = int.from_bytes(value[1:5], "big")
        looks = f"it starts like a Confluent frame (magic byte 0, schema id {schema_id})"
    else:
        return ""
    return (
        f"; the value does not look like Avro of schema {schema}: {looks}; is the producer "
        "writing JSON or framed Avro (input.format: confluent)?"
    )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that cannot be scored, with everything needed to find and replay it.

    Attributes:
        message: the original record (its key, value and headers are published unchanged).
        stage: where it was rejected.
        reason: why (``Reason``), e.g. ``truncated`` or ``non_finite``; a metrics label.
        error_type: the exception class (or ``stream_scorer`` for our own guards).
        error_message: a human-readable explanation.
        model_version: the version the record was routed to (a rollout); empty: the batch's.
    """

    message: Message
    stage: Stage
    reason: Reason
    error_type: str
    error_message: str
    model_version: str = ""


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
        encoded: the encoded prediction record of each (the output message's value).
        event_ms: the event time written into each prediction (0: unknown).
        versions: the model version that made each prediction, when a rollout routed the batch
            over several (``stages.route``); None: one version made them all (the batch's).
    """

    messages: list[Message]
    encoded: list[bytes]
    event_ms: list[int]
    versions: list[str] | None = None

    def __len__(self) -> int:
        """How many predictions."""
        return len(self.messages)


@dataclass(slots=True)
class Columns:
    """One batch after decode and features, as columns: what either decoding path returns.

    Attributes:
        messages: the records that can be scored, in input order.
        ids: their id values, as fastavro returns them (str, int, ...; None where absent).
        event_ms: their event times in epoch milliseconds; None where the record has none.
        matrix: their features, one float32 row each, in the manifest's column order.
        dead: the dead letters of decode and of the feature policies.
        decode_done: ``time.perf_counter()`` when decoding ended and the features began.
        unseen: per ``category`` feature with any, how many decoded records held a value that
            is none of its categories (whatever its ``unseen`` policy made of them).
    """

    messages: list[Message]
    ids: list[Any]
    event_ms: list[int | None]
    matrix: npt.NDArray[np.float32]
    dead: list[DeadLetter]
    decode_done: float
    unseen: dict[str, int]
