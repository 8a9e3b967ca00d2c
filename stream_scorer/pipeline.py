"""The pure part of the worker: a batch of records in, encoded predictions and dead letters out.

decode → features → score → encode, with no Kafka client in sight: the worker feeds it
consumed messages; unit tests feed it plain objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from stream_scorer.decode import Decoder
from stream_scorer.encode import PredictionEncoder
from stream_scorer.fastpath import FastDecoder
from stream_scorer.features import FeatureBuilder, RejectedRow, field_getter
from stream_scorer.records import DeadLetter, Decoded, Message, Scored, Stage
from stream_scorer.score import Predictions

#: Called with a stage name and the seconds it took for the batch.
StageTimer = Callable[[str, float], None]


def _no_timer(stage: str, seconds: float) -> None:
    """Discard a stage timing."""


class Model(Protocol):
    """What the pipeline needs of a model (``score.Scorer``)."""

    @property
    def model_version(self) -> str: ...  # noqa: D102
    def predict(self, matrix: npt.NDArray[np.float32]) -> Predictions: ...  # noqa: D102


@dataclass(frozen=True)
class BatchResult:
    """What became of a batch: one entry per input record, in one of the two lists."""

    scored: list[Scored]
    dead: list[DeadLetter]


def _millis(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


class Pipeline:
    """Scores batches of consumed records."""

    def __init__(
        self,
        decoder: Decoder,
        features: FeatureBuilder,
        scorer: Model,
        encoder: PredictionEncoder,
        *,
        id_field: str,
        event_time_field: str = "",
        clock: Callable[[], float] = time.time,
        timer: StageTimer = _no_timer,
        fast: FastDecoder | None = None,
    ) -> None:
        """Assemble the stages.

        Args:
            decoder: turns bytes into records.
            features: turns records into the model's matrix.
            scorer: the model.
            encoder: writes prediction records.
            id_field: input field copied into ``input_id``.
            event_time_field: input field with the event time; empty = Kafka timestamp.
            clock: wall clock in seconds (``scored_at``).
            timer: receives each stage's duration for the batch.
            fast: decodes and builds features in one compiled pass instead of ``decoder`` and
                ``features`` (``fastpath.build_fast_path``); None: the fastavro path.
        """
        self._decoder = decoder
        self._features = features
        self._scorer = scorer
        self._encoder = encoder
        self._get_id = field_getter(id_field)
        self._get_time = field_getter(event_time_field) if event_time_field else None
        self._clock = clock
        self._timer = timer
        self._fast = fast

    def _event_time(self, msg: Message, record: Mapping[str, Any]) -> int:
        if self._get_time is not None:
            millis = _millis(self._get_time(record))
            if millis is not None:
                return millis
        return msg.timestamp()[1]

    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Score a batch. Bad records come back as dead letters; nothing is dropped.

        When the model fails on the batch, the batch is split in halves and each half retried,
        until the records it fails on are isolated and dead-lettered; the others are scored.
        """
        t0 = time.perf_counter()
        rejected: list[RejectedRow] = []
        if self._fast is not None:  # decode and features in one pass; rejected rows are dead
            fast = self._fast.run(messages)
            decoded, dead, matrix, t1 = fast.decoded(), fast.dead, fast.matrix, fast.decode_done
        else:
            decoded, dead = self._decoder.decode_batch(messages)
            t1 = time.perf_counter()
            matrix, rejected = self._features.build([d.record for d in decoded])
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
        t2 = time.perf_counter()
        decoded, values, labels = self._predict(decoded, matrix, dead)
        t3 = time.perf_counter()
        scored: list[Scored] = []
        version = self._scorer.model_version
        now_ms = int(self._clock() * 1000)
        for i, item in enumerate(decoded):
            raw_id = self._get_id(item.record)
            try:
                event_ms = self._event_time(item.message, item.record)
                value = self._encoder.encode(
                    "" if raw_id is None else str(raw_id),
                    float(values[i]),
                    None if labels is None else int(labels[i]),
                    version,
                    event_ms,
                    now_ms,
                )
            except Exception as exc:  # a row the encoder refuses is a dead letter, not a crash
                dead.append(
                    DeadLetter(
                        item.message, Stage.ENCODE, "encode_failed", type(exc).__name__, str(exc)
                    )
                )
                continue
            scored.append(Scored(item.message, value, event_ms))
        t4 = time.perf_counter()
        for stage, seconds in (
            ("decode", t1 - t0),
            ("features", t2 - t1),
            ("predict", t3 - t2),
            ("encode", t4 - t3),
        ):
            self._timer(stage, seconds)
        return BatchResult(scored, dead)

    def _predict(
        self, decoded: list[Decoded], matrix: npt.NDArray[np.float32], dead: list[DeadLetter]
    ) -> tuple[list[Decoded], list[float], list[int] | None]:
        """Predict, isolating the rows the model fails on by splitting the batch in halves."""
        try:
            predictions = self._scorer.predict(matrix)
        except Exception as exc:
            if len(decoded) == 1:
                dead.append(
                    DeadLetter(
                        decoded[0].message,
                        Stage.SCORE,
                        "model_failed",
                        type(exc).__name__,
                        str(exc) or repr(exc),
                    )
                )
                return [], [], None
            mid = len(decoded) // 2
            left = self._predict(decoded[:mid], matrix[:mid], dead)
            right = self._predict(decoded[mid:], matrix[mid:], dead)
            labels = (
                None if left[2] is None and right[2] is None else (left[2] or []) + (right[2] or [])
            )
            return left[0] + right[0], left[1] + right[1], labels
        values = predictions.values.tolist()
        labels = None if predictions.labels is None else predictions.labels.tolist()
        finite = np.isfinite(predictions.values)
        if finite.all():
            return decoded, values, labels
        keep = [i for i in range(len(decoded)) if finite[i]]
        dead.extend(
            DeadLetter(
                decoded[i].message,
                Stage.SCORE,
                "non_finite_prediction",
                "stream_scorer",
                f"the model returned {values[i]} for this record",
            )
            for i in range(len(decoded))
            if not finite[i]
        )
        return (
            [decoded[i] for i in keep],
            [values[i] for i in keep],
            None if labels is None else [labels[i] for i in keep],
        )
