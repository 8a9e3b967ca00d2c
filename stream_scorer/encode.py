"""Encode: predictions to Avro bytes of the prediction schema, plus their headers.

The prediction schema (``schemas/prediction.v1.avsc``) is the product's output contract, the
same whatever the input: ``input_id``, ``prediction``, ``label``, ``model_version``,
``event_time`` and ``scored_at``. A deployment may point ``output.schema`` at a compatible
evolution of it (extra fields need defaults); start-up checks that it can be written.
"""

from __future__ import annotations

import io
from typing import Any

import fastavro

from stream_scorer.errors import SchemaError

REQUIRED_FIELDS = ("input_id", "prediction", "label", "model_version", "event_time", "scored_at")

#: Headers on every prediction (values are UTF-8 text).
HEADER_MODEL_VERSION = "stream_scorer.model.version"
HEADER_SOURCE_TOPIC = "stream_scorer.source.topic"
HEADER_SOURCE_PARTITION = "stream_scorer.source.partition"
HEADER_SOURCE_OFFSET = "stream_scorer.source.offset"


class PredictionEncoder:
    """Writes prediction records with one parsed schema."""

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
