"""The pure part of the worker: a batch of records in, encoded predictions and dead letters out.

decode → features → score → encode, with no Kafka client in sight: the worker feeds it
consumed messages; unit tests feed it plain objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.records import Columns, DeadLetter, Message, Reason, Scored, Stage
from stream_scorer.stages.score import Predictions

Matrix = npt.NDArray[np.float32]
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
    """What became of a batch: each input record is either scored or a dead letter.

    Attributes:
        scored: the predictions.
        dead: the dead letters.
        unseen: per ``category`` feature with any, how many decoded records held a value that
            is none of its categories, whatever its ``unseen`` policy made of them (the worker
            adds them to ``stream_scorer_unseen_categories_total``).
        model_version: the version of the model that scored the whole batch (every prediction
            and dead letter carries it; empty: the sink's default).
        features: the feature matrix of the rows the model scored (drift; None: not kept).
        values: the prediction of each record of ``scored`` (row for row with ``features``:
            drift; a shadow compared with its champion).
        labels: their labels, for a binary classifier.
    """

    scored: Scored
    dead: list[DeadLetter]
    unseen: Mapping[str, int] = field(default_factory=dict)
    model_version: str = ""
    features: Matrix | None = None
    values: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty(0))
    labels: npt.NDArray[np.int64] | None = None


class ColumnBuilder(Protocol):
    """Decode + features of a batch: ``columns.AvroColumns`` or ``fast.path.FastColumns``."""

    def run(self, messages: Sequence[Message]) -> Columns:
        """The batch's scorable records as columns, and its dead letters."""
        ...


class Pipeline:
    """Scores batches of consumed records."""

    def __init__(
        self,
        columns: ColumnBuilder,
        scorer: Model,
        encoder: PredictionEncoder,
        *,
        clock: Callable[[], float] = time.time,
        timer: StageTimer = _no_timer,
    ) -> None:
        """Assemble the stages.

        Args:
            columns: decodes and builds features (the fast path or the fastavro path).
            scorer: the model.
            encoder: writes prediction records.
            clock: wall clock in seconds (``scored_at``).
            timer: receives each stage's duration for the batch.
        """
        self._columns = columns
        self._scorer = scorer
        self._encoder = encoder
        self._clock = clock
        self._timer = timer

    @property
    def model(self) -> Model:
        """The model every batch of this pipeline is scored with."""
        return self._scorer

    @property
    def columns(self) -> ColumnBuilder:
        """The decode + features step this pipeline runs."""
        return self._columns

    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Score a batch. Bad records come back as dead letters; nothing is dropped.

        When the model fails on the batch, the batch is split in halves and each half retried,
        until the records it fails on are isolated and dead-lettered; the others are scored.
        """
        t0 = time.perf_counter()
        cols = self._columns.run(messages)
        self._timer("decode", cols.decode_done - t0)
        self._timer("features", time.perf_counter() - cols.decode_done)
        return self.score(cols)

    def score(self, cols: Columns, *, isolate: bool = True) -> BatchResult:
        """Predict and encode a batch's columns (``columns.run``); ``cols`` is left unchanged.

        Several models with the same features score the same ``cols``, each getting its own
        dead letters (those of ``cols`` first). ``isolate``: a model failing on the batch is
        split in halves down to the records it fails on (dead-lettered); False: its exception
        propagates (a shadow model, whose failure is not its records').
        """
        kept, ids, times, matrix = cols.messages, cols.ids, cols.event_ms, cols.matrix
        dead = list(cols.dead)
        t2 = time.perf_counter()
        if isolate:
            rows, values, labels = self.predict(kept, matrix, dead)
        else:
            rows, values, labels = self._predict_all(kept, matrix, dead)
        t3 = time.perf_counter()
        if len(rows) != len(kept):
            matrix = matrix[rows]
            picked = rows.tolist()
            kept = [kept[i] for i in picked]
            ids = [ids[i] for i in picked]
            times = [times[i] for i in picked]
        if None in times:  # no event time in the record: the Kafka timestamp
            times = [m.timestamp()[1] if t is None else t for m, t in zip(kept, times, strict=True)]
        event_ms: list[int] = times  # type: ignore[assignment]
        texts = [i if type(i) is str else ("" if i is None else str(i)) for i in ids]
        scored, good = self._encode(kept, texts, values, labels, event_ms, dead)
        if good is not None:  # rows the encoder refused: the others' features and values
            matrix, values = matrix[good], values[good]
            labels = None if labels is None else labels[good]
        t4 = time.perf_counter()
        self._timer("predict", t3 - t2)
        self._timer("encode", t4 - t3)
        return BatchResult(
            scored, dead, cols.unseen, self._scorer.model_version, matrix, values, labels
        )

    def _predict_all(
        self, kept: list[Message], matrix: Matrix, dead: list[DeadLetter]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64] | None]:
        """Predict the whole batch at once; the model's exception propagates."""
        predictions = self._scorer.predict(matrix)
        values = np.asarray(predictions.values, dtype=np.float64)
        labels = None if predictions.labels is None else predictions.labels.astype(np.int64)
        finite = np.isfinite(values)
        rows = np.arange(len(kept))
        if finite.all():
            return rows, values, labels
        return rows[finite], values[finite], None if labels is None else labels[finite]

    def _encode(
        self,
        kept: list[Message],
        ids: list[str],
        values: npt.NDArray[np.float64],
        labels: npt.NDArray[np.int64] | None,
        event_ms: list[int],
        dead: list[DeadLetter],
    ) -> tuple[Scored, list[int] | None]:
        """Encode the predictions; when the batch cannot be, row by row, dead-lettering failures.

        Returns the predictions encoded and the rows they are of (None: every row).
        """
        version = self._scorer.model_version
        now_ms = int(self._clock() * 1000)
        try:
            encoded = self._encoder.encode_batch(ids, values, labels, version, event_ms, now_ms)
            return Scored(kept, encoded, event_ms), None
        except Exception:  # find the rows the encoder refuses
            pass
        out = Scored([], [], [])
        marks = [None] * len(kept) if labels is None else labels.tolist()
        good: list[int] = []
        for row, (msg, rid, value, label, event) in enumerate(
            zip(kept, ids, values.tolist(), marks, event_ms, strict=True)
        ):
            try:
                encoded_one = self._encoder.encode(rid, value, label, version, event, now_ms)
            except Exception as exc:  # a row the encoder refuses is a dead letter, not a crash
                dead.append(
                    DeadLetter(
                        msg, Stage.ENCODE, Reason.ENCODE_FAILED, type(exc).__name__, str(exc)
                    )
                )
                continue
            out.messages.append(msg)
            out.encoded.append(encoded_one)
            out.event_ms.append(event)
            good.append(row)
        return out, good

    def predict(
        self, kept: Sequence[Message], matrix: Matrix, dead: list[DeadLetter]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64] | None]:
        """Score ``matrix`` (one row per record of ``kept``): the rows scored, values, labels.

        The rows the model fails on, or gets no finite value for, are appended to ``dead``
        (``model_failed``, ``non_finite_prediction``); the batch commands (``stream_scorer.batch``)
        score their columns with it too.
        """
        return self._predict(kept, np.arange(len(kept)), matrix, dead)

    def _predict(
        self,
        kept: Sequence[Message],
        rows: npt.NDArray[np.int64],
        matrix: Matrix,
        dead: list[DeadLetter],
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64] | None]:
        """Predict ``matrix`` (the features of ``rows``): the rows scored, their values, labels.

        The rows the model fails on are isolated by splitting in halves and dead-lettered.
        """
        try:
            predictions = self._scorer.predict(matrix)
        except Exception as exc:
            if len(rows) == 1:
                dead.append(
                    DeadLetter(
                        kept[int(rows[0])],
                        Stage.SCORE,
                        Reason.MODEL_FAILED,
                        type(exc).__name__,
                        str(exc) or repr(exc),
                    )
                )
                return rows[:0], np.empty(0), None
            mid = len(rows) // 2
            left = self._predict(kept, rows[:mid], matrix[:mid], dead)
            right = self._predict(kept, rows[mid:], matrix[mid:], dead)
            halves = [h for h in (left, right) if len(h[0])]
            if len(halves) < 2:
                return halves[0] if halves else left
            labels = None
            if left[2] is not None and right[2] is not None:
                labels = np.concatenate([left[2], right[2]])
            return np.concatenate([left[0], right[0]]), np.concatenate([left[1], right[1]]), labels
        values = np.asarray(predictions.values, dtype=np.float64)
        labels = None if predictions.labels is None else predictions.labels.astype(np.int64)
        finite = np.isfinite(values)
        if finite.all():
            return rows, values, labels
        dead.extend(
            DeadLetter(
                kept[int(rows[i])],
                Stage.SCORE,
                Reason.NON_FINITE_PREDICTION,
                "stream_scorer",
                f"the model returned {values[i]} for this record",
            )
            for i in np.flatnonzero(~finite).tolist()
        )
        return rows[finite], values[finite], None if labels is None else labels[finite]
