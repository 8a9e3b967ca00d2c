"""The exceptions stream-scorer raises.

Every error the service raises on purpose derives from one root, so callers can catch
``StreamScorerError`` and nothing else. Bad *records* are not exceptions: they travel as
``DeadLetter`` values (see ``stages/decode.py``) and end on the dead-letter topic.

::

    StreamScorerError
    ├── ConfigError          bad configuration; names the offending field
    ├── ModelError           model file or manifest missing, corrupt or inconsistent
    ├── SchemaError          an Avro schema that cannot be parsed or does not fit
    ├── BrokerError          Kafka unreachable or a request refused (topic/partition/offset)
    │   ├── DeliveryError    the broker did not acknowledge a prediction or dead letter
    │   └── FencedError      exactly-once: another producer took this transactional id
    ├── ScoringError         the model failed on a batch
    ├── PoisonLimitError     dead letters above the configured tolerance (ratio or run)
    └── LocalKafkaError      the local development broker could not be fetched, started or stopped
"""

from __future__ import annotations


class StreamScorerError(Exception):
    """Root of every exception stream-scorer raises on purpose."""


class ConfigError(StreamScorerError):
    """The configuration is invalid.

    Attributes:
        field: dotted name of the offending key, e.g. ``batch.max_records``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"config: {field}: {message}")
        self.field = field


class ModelError(StreamScorerError):
    """The model or its manifest cannot be loaded or is inconsistent."""


class SchemaError(StreamScorerError):
    """An Avro schema cannot be parsed or does not fit its use."""


class BrokerError(StreamScorerError):
    """Kafka could not be reached or refused a request.

    Attributes:
        topic: topic involved, if any.
        partition: partition involved, if any.
        offset: offset involved, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        where = ""
        if topic is not None:
            where = f" [{topic}"
            if partition is not None:
                where += f"[{partition}]"
            if offset is not None:
                where += f"@{offset}"
            where += "]"
        super().__init__(message + where)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class DeliveryError(BrokerError):
    """The broker did not acknowledge a produced prediction or dead letter."""


class FencedError(BrokerError):
    """A newer producer with the same transactional id (or group generation) fenced this one."""


class PoisonLimitError(StreamScorerError):
    """Too many records were dead-lettered (``dead_letter.max_ratio`` / ``max_consecutive``)."""


class ScoringError(StreamScorerError):
    """The model failed to score a batch."""


class LocalKafkaError(StreamScorerError):
    """The local development broker could not be fetched, started or stopped."""
