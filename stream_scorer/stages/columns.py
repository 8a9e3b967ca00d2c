"""The fastavro path of decode + features as one step: a batch of messages to ``Columns``.

The compiled fast path (``stream_scorer.fast.path``) is the other implementation of the same
step; the pipeline takes either (``ColumnBuilder``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from stream_scorer.stages.decode import Decoder
from stream_scorer.stages.features import FeatureBuilder, field_getter
from stream_scorer.stages.records import Columns, DeadLetter, Message, Stage

#: The Avro types an ``input.event_time_field`` may have (``fields.type_name``): epoch
#: milliseconds, plain or with their logical type, or microseconds (both decoders convert).
EVENT_TIME_TYPES = frozenset({"long", "long/timestamp-millis", "long/timestamp-micros"})


def event_millis(value: Any) -> int | None:
    """An event time field's value in epoch milliseconds (None: not a time)."""
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


class AvroColumns:
    """Guarded fastavro decoding, then the feature builder: the path for any schema."""

    def __init__(
        self,
        decoder: Decoder,
        features: FeatureBuilder,
        *,
        id_field: str,
        event_time_field: str = "",
    ) -> None:
        """Decode with ``decoder``, build features with ``features``.

        Args:
            decoder: turns bytes into records (or dead letters).
            features: turns records into the model's matrix (or dead letters).
            id_field: input field copied into ``input_id``.
            event_time_field: input field with the event time; empty = the Kafka timestamp.
        """
        self._decoder = decoder
        self._features = features
        self._get_id = field_getter(id_field)
        self._get_time = field_getter(event_time_field) if event_time_field else None

    def _event_time(self, record: Mapping[str, Any]) -> int | None:
        return None if self._get_time is None else event_millis(self._get_time(record))

    def run(self, messages: Sequence[Message]) -> Columns:
        """Decode a batch and build its features; bad records become dead letters."""
        decoded, dead = self._decoder.decode_batch(messages)
        decode_done = time.perf_counter()
        records = [d.record for d in decoded]
        matrix, rejected = self._features.build(records)
        unseen = self._features.unseen(records)
        if rejected:
            bad = {r.index for r in rejected}
            dead.extend(
                DeadLetter(
                    decoded[r.index].message, Stage.FEATURES, r.reason, "FeatureError", r.message
                )
                for r in rejected
            )
            keep = [i for i in range(len(decoded)) if i not in bad]
            decoded = [decoded[i] for i in keep]
            matrix = matrix[keep]
        return Columns(
            [d.message for d in decoded],
            [self._get_id(d.record) for d in decoded],
            [self._event_time(d.record) for d in decoded],
            matrix,
            dead,
            decode_done,
            unseen,
        )
