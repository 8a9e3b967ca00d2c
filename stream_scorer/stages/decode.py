"""Decode: Avro bytes to records, or dead letters that say why not.

fastavro reads without the guards hostile input needs (see the project's notes on Avro input):
this stage refuses null, empty and oversized values, runs the schema's compiled ``AvroGuard``
(varint lengths, int ranges, lengths, enum and union indexes, array and map counts, UTF-8, no
trailing bytes), and only then lets fastavro build the record. Every exception, whatever its
type, becomes a ``DeadLetter`` with a reason code.

Reason codes (``DECODE_REASONS``: the decode stage's ``records.Reason`` members): ``null_value``,
``empty``, ``too_large`` here; the others from the guard, or from fastavro's own failures
(``truncated``, ``invalid_utf8``, otherwise ``malformed_avro``, e.g. a timestamp beyond year
9999).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError

from stream_scorer.errors import SchemaError
from stream_scorer.stages.avro_guard import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ZERO_SIZE_ITEMS,
    AvroGuard,
)
from stream_scorer.stages.records import (
    DECODE_REASONS,
    DeadLetter,
    Decoded,
    Message,
    Reason,
    Stage,
    not_avro_hint,
)

__all__ = ["DECODE_REASONS", "Decoder", "load_schema"]

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


def _reason(exc: BaseException) -> Reason:
    if isinstance(exc, SchemaResolutionError):
        return Reason.SCHEMA_MISMATCH
    if isinstance(exc, UnicodeDecodeError):
        return Reason.INVALID_UTF8
    if isinstance(exc, EOFError):
        return Reason.TRUNCATED
    return Reason.MALFORMED_AVRO


class Decoder:
    """Decodes Avro record values written with one schema (schemaless encoding)."""

    def __init__(
        self,
        schema: dict[str, Any],
        max_message_bytes: int,
        *,
        max_zero_size_items: int = DEFAULT_MAX_ZERO_SIZE_ITEMS,
        max_depth: int = DEFAULT_MAX_DEPTH,
        reader: dict[str, Any] | None = None,
        skip: int = 0,
        hints: bool = True,
    ) -> None:
        """Create a decoder.

        Args:
            schema: the parsed writer schema (see ``load_schema``).
            max_message_bytes: larger values are dead-lettered without being read.
            max_zero_size_items: items of zero-byte types (``null``, empty records) allowed in
                one value's arrays together (see ``AvroGuard``).
            max_depth: how deeply recursive types may nest.
            reader: the reader schema the records are resolved against (Avro schema
                resolution, fastavro's); None reads them with the writer schema.
            skip: bytes of wire-format frame before each Avro body (checked by the caller).
            hints: schemaless input: a dead letter whose value looks like JSON or a Confluent
                frame says so (``records.not_avro_hint``); framed input: no.

        Raises:
            SchemaError: the schema cannot be compiled into a guard.
        """
        self._schema = schema
        self._reader = reader
        self._skip = skip
        self._hints = hints
        self._max = max_message_bytes
        try:
            self._guard = AvroGuard(
                schema, max_zero_size_items=max_zero_size_items, max_depth=max_depth
            )
        except (KeyError, TypeError, ValueError, fastavro.schema.SchemaParseException) as exc:
            raise SchemaError(f"cannot compile the Avro guard: {exc}") from exc

    def _dead(self, msg: Message, reason: Reason, kind: str, text: str) -> DeadLetter:
        if self._hints:  # schemaless input: say when the value looks like JSON or a frame
            text += not_avro_hint(msg.value(), str(self._schema.get("name", "?")), reason)
        return DeadLetter(msg, Stage.DECODE, reason, kind, text)

    def decode(self, msg: Message) -> Decoded | DeadLetter:
        """Decode one record's value; never raises for bad bytes."""
        value = msg.value()
        if value is None:
            return self._dead(msg, Reason.NULL_VALUE, _GUARD, "record value is null (tombstone)")
        size = len(value)
        if size == 0:
            return self._dead(msg, Reason.EMPTY, _GUARD, "record value is empty")
        if size > self._max:
            return self._dead(
                msg, Reason.TOO_LARGE, _GUARD, f"value has {size} bytes, limit is {self._max}"
            )
        if self._skip:
            value = value[self._skip :]
            size = len(value)
            if size == 0:  # a frame without a body, as the fast path says
                return self._dead(msg, Reason.EMPTY, _GUARD, "record value is empty")
        try:
            violation = self._guard.check(value)
        except Exception as exc:  # the guard must not raise; if it does, still a dead letter
            return self._dead(msg, Reason.MALFORMED_AVRO, type(exc).__name__, str(exc) or repr(exc))
        if violation is not None:
            return self._dead(msg, violation.reason, _GUARD, violation.message)
        buf = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(buf, self._schema, self._reader)
        except Exception as exc:  # any failure of any type is a dead letter, by design
            return self._dead(msg, _reason(exc), type(exc).__name__, str(exc) or repr(exc))
        used = buf.tell()
        if used != size:
            return self._dead(
                msg, Reason.TRAILING_BYTES, _GUARD, f"record ends at byte {used} of {size}"
            )
        if not isinstance(record, dict):
            return self._dead(msg, Reason.MALFORMED_AVRO, _GUARD, "value is not a record")
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
