"""Encode: predictions to Avro bytes of the prediction schema, plus their headers.

The prediction schema (``schemas/prediction.v1.avsc``) is the product's output contract, the
same whatever the input: ``input_id``, ``prediction``, ``label``, ``model_version``,
``event_time`` and ``scored_at``. A deployment may point ``output.schema`` at a compatible
evolution of it (extra fields need defaults); start-up checks that it can be written.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import fastavro

from stream_scorer.errors import SchemaError

REQUIRED_FIELDS = ("input_id", "prediction", "label", "model_version", "event_time", "scored_at")

#: Headers on every prediction (values are UTF-8 text).
HEADER_MODEL_VERSION = "stream_scorer.model.version"
HEADER_SOURCE_TOPIC = "stream_scorer.source.topic"
HEADER_SOURCE_PARTITION = "stream_scorer.source.partition"
HEADER_SOURCE_OFFSET = "stream_scorer.source.offset"


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


class PredictionEncoder:
    """Writes prediction records with one parsed schema.

    For the v1 layout (``schemas/prediction.v1.avsc``) a small writer specialised to it builds
    the bytes directly (the model version's bytes are cached), about three times faster than
    fastavro's generic writer, byte for byte the same (tested against fastavro); any other
    compatible schema is written by fastavro.
    """

    def __init__(self, schema: dict[str, Any]) -> None:
        """Create an encoder and prove the schema can be written.

        Raises:
            SchemaError: the schema lacks a required field or rejects a sample prediction.
        """
        names = {f["name"] for f in schema.get("fields", ())}
        missing = [f for f in REQUIRED_FIELDS if f not in names]
        if missing:
            raise SchemaError(f"prediction schema lacks field(s) {', '.join(missing)}")
        self._schema = schema
        self._buf = io.BytesIO()
        layout = tuple((f["name"], _type_key(f["type"])) for f in schema.get("fields", ()))
        self.specialised = layout == _V1_LAYOUT
        self._version: tuple[str, bytes] = ("", b"\x00")
        try:
            self.encode("probe", 0.5, 1, "v", 0, 0)
        except (ValueError, TypeError, KeyError) as exc:
            raise SchemaError(f"prediction schema cannot hold a prediction: {exc}") from exc

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
        return buf.getvalue()
