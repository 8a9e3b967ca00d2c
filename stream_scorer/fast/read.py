"""The compiled v1 prediction reader: a batch of prediction records to columns, then to COPY.

The twin of ``fast.encode``: ``PredictionReader.read`` runs ``fast.kernel.decode_v1`` over a
whole batch of records written with the v1 prediction schema (``contracts/prediction.v1.avsc``)
and returns their columns (ids, predictions, labels, model versions, times) with a decode status
per record, the decode stage's guards enforced (the statuses are ``fast.kernel.REASONS``; a
refused record becomes the fast path's dead letter, ``fast.path.decode_dead_letter``).
``PredictionReader.copy_tuples`` then writes the decoded rows as PostgreSQL binary COPY tuples
(``fast.kernel.copy_v1``) for ``sink postgres``.

``build_prediction_reader`` gives a reader only for the v1 layout, and proves at start-up, on
probe records, that it reads the values and refuses the bytes the generic decoder does
(``stages.decode.Decoder``); any other schema is read by the generic decoder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.errors import SchemaError
from stream_scorer.fast.path import decode_dead_letter
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.records import DeadLetter, Decoded, Message, PlainMessage

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Bytes a COPY tuple takes besides the id, the model version and the topic: the field count
#: (2), nine field lengths (36), the double (8), the label (4), two timestamps (16), the
#: partition (4) and the offset (8).
COPY_FIXED_BYTES = 78


def _kernel() -> Any:
    from stream_scorer.fast import kernel as fastkernel  # numba: imported on first use

    return fastkernel


def _layout(schema: Mapping[str, Any]) -> tuple[Any, ...]:
    """The fields' names and types, logical types kept (what decides the values read)."""

    def kind(t: Any) -> Any:
        if isinstance(t, list):
            return tuple(kind(b) for b in t)
        if isinstance(t, dict):
            return (t.get("type"), t.get("logicalType"))
        return t

    return tuple((f["name"], kind(f["type"])) for f in schema.get("fields", ()))


def is_v1(schema: Mapping[str, Any]) -> bool:
    """Whether ``schema`` lays its records out as the v1 prediction schema does."""
    return _layout(schema) == _layout(load_schema(PREDICTION_SCHEMA_V1))


@dataclass
class PredictionColumns:
    """A batch of prediction records as columns (``fast.kernel.decode_v1``'s outputs).

    Attributes:
        messages: the records, in order.
        status: per record, 0 or the index of its dead-letter reason in ``fast.kernel.REASONS``.
        err_at: where in the record decoding stopped.
        lens: each value's length (-1: null).
        spans: ``(n, 4)``: the id's and the model version's start and length in ``buf``.
        values: the predictions.
        has_label: whether the label is not null.
        longs: ``(n, 3)``: the label, the event time and the scoring time (ms since the epoch).
        buf: the values' bytes, concatenated.
    """

    messages: Sequence[Message]
    status: npt.NDArray[np.int64]
    err_at: npt.NDArray[np.int64]
    lens: npt.NDArray[np.int64]
    spans: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    has_label: npt.NDArray[np.bool_]
    longs: npt.NDArray[np.int64]
    buf: npt.NDArray[np.uint8]

    @property
    def good(self) -> npt.NDArray[np.int64]:
        """The indexes of the records that decoded."""
        return np.flatnonzero(self.status == 0)

    def _text(self, start: int, length: int) -> str:
        return self.buf[start : start + length].tobytes().decode()

    def record(self, i: int) -> dict[str, Any]:
        """Record ``i`` (decoded) as the generic decoder returns it (fastavro's values)."""
        s = self.spans[i].tolist()
        label, event, scored = self.longs[i].tolist()
        return {
            "input_id": self._text(s[0], s[1]),
            "prediction": float(self.values[i]),
            "label": label if self.has_label[i] else None,
            "model_version": self._text(s[2], s[3]),
            "event_time": _EPOCH + timedelta(milliseconds=event),
            "scored_at": _EPOCH + timedelta(milliseconds=scored),
        }


class PredictionReader:
    """Reads batches of v1 prediction records with the compiled kernel (module docstring)."""

    def __init__(self, schema_name: str, max_message_bytes: int, *, hints: bool = True) -> None:
        """Load (or compile) the kernel.

        Args:
            schema_name: the schema's name, for the dead letters' hints.
            max_message_bytes: larger values are dead-lettered (``too_large``) unread.
            hints: schemaless input: dead letters say when a value looks like JSON or a frame.
        """
        self._k = _kernel()
        self._max = max_message_bytes
        self._name = schema_name if hints else None
        started = time.perf_counter()
        self.copy_tuples(
            self.read([PlainMessage(_PROBES[0][1])]), ["t"], np.zeros((1, 3), np.int64)
        )
        self.warmup_s = time.perf_counter() - started

    def read(self, messages: Sequence[Message]) -> PredictionColumns:
        """Decode a batch into columns (a status per record; never raises for bad bytes)."""
        values = [m.value() for m in messages]
        n = len(values)
        try:
            lens = np.fromiter(map(len, values), dtype=np.int64, count=n)  # type: ignore[arg-type]
        except TypeError:  # a null value (tombstone)
            lens = np.array([-1 if v is None else len(v) for v in values], dtype=np.int64)
        lens = lens.reshape(n)
        parts: list[bytes] = values  # type: ignore[assignment]
        if n and (int(lens.min()) < 0 or int(lens.max()) > self._max):
            parts = [b"" if v is None or len(v) > self._max else v for v in values]
        joined = b"".join(parts)
        sizes = np.where((lens < 0) | (lens > self._max), 0, lens)
        starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1], out=starts[1:])
        cols = PredictionColumns(
            messages=messages,
            status=np.empty(n, dtype=np.int64),
            err_at=np.empty(n, dtype=np.int64),
            lens=lens,
            spans=np.zeros((n, 4), dtype=np.int64),
            values=np.zeros(n, dtype=np.float64),
            has_label=np.zeros(n, dtype=np.bool_),
            longs=np.zeros((n, 3), dtype=np.int64),
            buf=np.frombuffer(joined or b"\x00", dtype=np.uint8),
        )
        self._k.decode_v1(
            cols.buf, starts, lens, self._max, cols.status, cols.err_at, cols.spans,
            cols.values, cols.has_label, cols.longs,
        )  # fmt: skip
        return cols

    def dead_letters(self, cols: PredictionColumns) -> list[DeadLetter]:
        """The dead letters of the records that did not decode (in order)."""
        reasons = self._k.REASONS
        return [
            decode_dead_letter(
                cols.messages[i],
                reasons[int(cols.status[i])],
                int(cols.err_at[i]),
                int(cols.lens[i]),
                max_bytes=self._max,
                schema_name=self._name,
            )
            for i in np.flatnonzero(cols.status != 0).tolist()
        ]

    def copy_tuples(
        self,
        cols: PredictionColumns,
        topics: Sequence[str],
        coordinates: npt.NDArray[np.int64],
        rows: npt.NDArray[np.int64] | None = None,
    ) -> tuple[bytes, npt.NDArray[np.int64]]:
        """The decoded ``rows`` (default: every good one) as binary COPY tuples, and their ends.

        The columns of ``postgres.table_columns`` for the v1 schema, the Kafka coordinates last:
        ``coordinates`` holds, per record, its topic's index in ``topics``, its partition and
        its offset.
        """
        rows = cols.good if rows is None else rows
        raw = [t.encode() for t in topics]
        topic_lens = np.array([len(t) for t in raw], dtype=np.int64)
        topic_spans = np.zeros((len(raw), 2), dtype=np.int64)
        topic_spans[1:, 0] = np.cumsum(topic_lens)[:-1]
        topic_spans[:, 1] = topic_lens
        text = cols.spans[rows][:, [1, 3]].sum() + topic_lens[coordinates[rows, 0]].sum()
        out = np.empty(int(text) + COPY_FIXED_BYTES * len(rows), dtype=np.uint8)
        ends = np.empty(len(rows), dtype=np.int64)
        used = self._k.copy_v1(
            cols.buf, rows, cols.spans, cols.values, cols.has_label, cols.longs,
            np.frombuffer(b"".join(raw) or b"\x00", dtype=np.uint8), topic_spans,
            coordinates, out, ends,
        )  # fmt: skip
        return out[:used].tobytes(), ends


def _probes() -> list[tuple[str, bytes]]:
    """Records the start-up check reads: every shape of value, and bytes the guards refuse."""
    enc = PredictionEncoder(load_schema(PREDICTION_SCHEMA_V1))
    good = enc.encode("probe-é", 0.1, 1, "v1", 1_763_900_000_000, 1_763_900_100_000)
    after_id = 1 + len("probe-é".encode())  # the id's length (one byte), then its bytes
    union = after_id + 8  # the label's branch, after the double
    return [
        ("good", good),
        ("no label", enc.encode("", -1e308, None, "", -62_135_596_800_000, 0)),
        ("truncated", good[:-3]),
        ("trailing", good + b"\x00"),
        ("bad utf-8", b"\x02\xff" + good[after_id:]),
        ("bad union", good[:union] + b"\x04" + good[union + 1 :]),
        ("long time", enc.encode("x", 0.0, 0, "v", 2**62, 0)),
    ]


_PROBES = _probes()


def build_prediction_reader(
    schema: Mapping[str, Any], max_message_bytes: int, *, hints: bool = True
) -> PredictionReader | None:
    """A compiled reader for ``schema`` when it is the v1 layout, else None (logged).

    Raises:
        SchemaError: the compiled reader disagrees with the generic decoder on a probe record
            (a broken build stops start-up).
    """
    if not is_v1(schema):
        log.info("prediction reader: the generic decoder (the schema is not the v1 layout)")
        return None
    reader = PredictionReader(str(schema.get("name", "?")), max_message_bytes, hints=hints)
    generic = Decoder(dict(schema), max_message_bytes, hints=hints)
    messages = [PlainMessage(v) for _, v in _PROBES]
    cols = reader.read(messages)
    dead = {id(d.message): d.reason for d in reader.dead_letters(cols)}
    for i, (what, msg) in enumerate(zip([w for w, _ in _PROBES], messages, strict=True)):
        want = generic.decode(msg)
        got: Any = cols.record(i) if cols.status[i] == 0 else dead[id(msg)]
        expected = want.record if isinstance(want, Decoded) else want.reason
        if got != expected:
            raise SchemaError(
                f"the compiled prediction reader disagrees with the decoder on the {what} "
                f"probe: {got!r} != {expected!r}"
            )
    log.info("prediction reader: compiled (kernel ready in %.2f s)", reader.warmup_s)
    return reader
