"""Decode: Avro bytes to records, or dead letters that say why not.

fastavro reads without the guards hostile input needs (see the project's notes on Avro input):
this stage adds a size limit, refuses null and empty values and bytes left over after the
record, and turns every exception, whatever its type, into a ``DeadLetter`` with a reason code.

Reason codes: ``null_value``, ``empty``, ``too_large``, ``truncated``, ``trailing_bytes``,
``invalid_utf8``, ``malformed_avro``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import fastavro

from stream_scorer.errors import SchemaError
from stream_scorer.records import DeadLetter, Decoded, Message, Stage

_GUARD = "stream_scorer"


def load_schema(path: Path) -> dict[str, Any]:
    """Read and parse an Avro schema file (``.avsc``) into fastavro's parsed form."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        parsed = fastavro.parse_schema(raw)
    except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"cannot load Avro schema {path}: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise SchemaError(f"{path}: the top-level type must be an Avro record")
    return dict(parsed)


def record_fields(schema: Mapping[str, Any]) -> dict[str, Any]:
    """Map each top-level field name of a parsed record schema to its type."""
    return {f["name"]: f["type"] for f in schema["fields"]}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "invalid_utf8"
    if isinstance(exc, EOFError):
        return "truncated"
    return "malformed_avro"


class Decoder:
    """Decodes Avro record values written with one schema (schemaless encoding)."""

    def __init__(self, schema: dict[str, Any], max_message_bytes: int) -> None:
        """Create a decoder.

        Args:
            schema: the parsed writer schema (see ``load_schema``).
            max_message_bytes: larger values are dead-lettered without being read.
        """
        self._schema = schema
        self._max = max_message_bytes

    def _dead(self, msg: Message, reason: str, kind: str, text: str) -> DeadLetter:
        return DeadLetter(msg, Stage.DECODE, reason, kind, text)

    def decode(self, msg: Message) -> Decoded | DeadLetter:
        """Decode one record's value; never raises for bad bytes."""
        value = msg.value()
        if value is None:
            return self._dead(msg, "null_value", _GUARD, "record value is null (tombstone)")
        size = len(value)
        if size == 0:
            return self._dead(msg, "empty", _GUARD, "record value is empty")
        if size > self._max:
            return self._dead(
                msg, "too_large", _GUARD, f"value has {size} bytes, limit is {self._max}"
            )
        buf = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(buf, self._schema, None)
        except Exception as exc:  # any failure of any type is a dead letter, by design
            return self._dead(msg, _reason(exc), type(exc).__name__, str(exc) or repr(exc))
        used = buf.tell()
        if used != size:
            return self._dead(
                msg, "trailing_bytes", _GUARD, f"record ends at byte {used} of {size}"
            )
        if not isinstance(record, dict):
            return self._dead(msg, "malformed_avro", _GUARD, "value is not a record")
        return Decoded(msg, record)

    def decode_batch(self, messages: Iterable[Message]) -> tuple[list[Decoded], list[DeadLetter]]:
        """Decode a batch, splitting it into decoded records and dead letters (order kept)."""
        good: list[Decoded] = []
        dead: list[DeadLetter] = []
        for msg in messages:
            out = self.decode(msg)
            if isinstance(out, Decoded):
                good.append(out)
            else:
                dead.append(out)
        return good, dead
