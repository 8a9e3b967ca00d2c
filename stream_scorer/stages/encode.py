"""Encode: predictions to Avro bytes of the prediction schema, plus their headers.

The prediction schema (``schemas/prediction.v1.avsc``) is the product's output contract, the
same whatever the input: ``input_id``, ``prediction``, ``label``, ``model_version``,
``event_time`` and ``scored_at``. A deployment may point ``output.schema`` at a compatible
evolution of it (extra fields need defaults); start-up checks that it can be written.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Sequence
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt

from stream_scorer.errors import SchemaError

REQUIRED_FIELDS = ("input_id", "prediction", "label", "model_version", "event_time", "scored_at")


#: The v1 layout (field name and Avro type, in order) that the hand-written writer handles.
_V1_LAYOUT = (
    ("input_id", "string"),
    ("prediction", "double"),
    ("label", ("null", "int")),
    ("model_version", "string"),
    ("event_time", "long"),
    ("scored_at", "long"),
)
_DOUBLE = struct.Struct("<d").pack


def _type_key(avro_type: Any) -> Any:
    """A field type reduced to what decides its encoding (logical types write their base)."""
    if isinstance(avro_type, list):
        return tuple(_type_key(t) for t in avro_type)
    if isinstance(avro_type, dict):
        return avro_type.get("type")
    return avro_type


def _long(n: int) -> bytes:
    """Avro's zigzag varint encoding of a 64-bit integer."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _long(len(raw)) + raw


#: The compiled batch writer of the v1 layout (``fast.encode.write_v1_batch``), given by the
#: layer that owns both the stages and the fast path: ``(ids, predictions, labels or None,
#: model version as an Avro string, event times in ms, scoring time in ms)`` -> one record per row.
BatchWriter = Callable[
    [
        Sequence[str],
        npt.NDArray[np.float64],
        npt.NDArray[np.int64] | None,
        bytes,
        Sequence[int],
        int,
    ],
    list[bytes],
]


class PredictionEncoder:
    """Writes prediction records with one parsed schema.

    For the v1 layout (``schemas/prediction.v1.avsc``) a writer specialised to it builds the
    bytes directly, byte for byte what fastavro writes (tested against fastavro): ``encode``
    one record; ``encode_batch`` a whole batch in one call of ``batch_writer`` when one was
    given (the worker gives the compiled ``fast.encode.write_v1_batch``), else record by record;
    any other compatible schema is written by fastavro, one record at a time.
    """

    def __init__(
        self,
        schema: dict[str, Any],
        *,
        prefix: bytes = b"",
        batch_writer: BatchWriter | None = None,
    ) -> None:
        """Create an encoder and prove the schema can be written.

        Args:
            schema: the parsed prediction schema.
            prefix: bytes written before every record (``output.format: confluent``: the
                magic byte 0 and the schema id, see ``stages.framing``).
            batch_writer: writes a batch of the v1 layout in one call (``BatchWriter``);
                proved against ``encode`` here, so a broken build stops start-up.

        Raises:
            SchemaError: the schema lacks a required field or rejects a sample prediction,
                or ``batch_writer`` writes other bytes than the reference writer.
        """
        names = {f["name"] for f in schema.get("fields", ())}
        missing = [f for f in REQUIRED_FIELDS if f not in names]
        if missing:
            raise SchemaError(f"prediction schema lacks field(s) {', '.join(missing)}")
        self._schema = schema
        self._prefix = prefix
        self._buf = io.BytesIO()
        layout = tuple((f["name"], _type_key(f["type"])) for f in schema.get("fields", ()))
        self.specialised = layout == _V1_LAYOUT
        self._batch_writer = batch_writer
        self._version: tuple[str, bytes] = ("", b"\x00")
        try:
            probe = self.encode("probe", 0.5, 1, "v", 0, 0)
        except (ValueError, TypeError, KeyError) as exc:
            raise SchemaError(f"prediction schema cannot hold a prediction: {exc}") from exc
        if self.specialised and batch_writer is not None:  # load (or compile) it now
            batch = self.encode_batch(["probe"], np.array([0.5]), np.array([1]), "v", [0], 0)
            if batch != [probe]:
                raise SchemaError("the batch prediction writer disagrees with the reference")

    def encode(
        self,
        input_id: str,
        prediction: float,
        label: int | None,
        model_version: str,
        event_time_ms: int,
        scored_at_ms: int,
    ) -> bytes:
        """Return one prediction record as schemaless Avro bytes."""
        if self.specialised:
            if model_version != self._version[0]:
                self._version = (model_version, _string(model_version))
            return b"".join(
                (
                    self._prefix,
                    _string(input_id),
                    _DOUBLE(prediction),
                    b"\x00" if label is None else b"\x02" + _long(label),
                    self._version[1],
                    _long(event_time_ms),
                    _long(scored_at_ms),
                )
            )
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        fastavro.schemaless_writer(
            buf,
            self._schema,
            {
                "input_id": input_id,
                "prediction": prediction,
                "label": label,
                "model_version": model_version,
                "event_time": event_time_ms,
                "scored_at": scored_at_ms,
            },
        )
        return self._prefix + buf.getvalue()

    def encode_batch(
        self,
        ids: Sequence[str],
        predictions: npt.NDArray[np.float64],
        labels: npt.NDArray[np.int64] | None,
        model_version: str,
        event_ms: Sequence[int],
        scored_at_ms: int,
    ) -> list[bytes]:
        """Return one prediction record per row, as ``encode`` would, in one pass.

        Raises:
            Exception: a row cannot be written (``encode`` on each row tells which).
        """
        if self.specialised and self._batch_writer is not None and ids:
            if model_version != self._version[0]:
                self._version = (model_version, _string(model_version))
            out = self._batch_writer(
                ids, predictions, labels, self._version[1], event_ms, scored_at_ms
            )
            if self._prefix:
                prefix = self._prefix
                return [prefix + v for v in out]
            return out
        values = predictions.tolist()
        marks = [None] * len(ids) if labels is None else labels.tolist()
        return [
            self.encode(i, v, m, model_version, t, scored_at_ms)
            for i, v, m, t in zip(ids, values, marks, event_ms, strict=True)
        ]
