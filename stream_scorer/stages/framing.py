"""The Confluent wire format on input: frames parsed, each record read with its writer schema.

``input.format: confluent``. A value is framed in one of two ways (the stock
``AvroDeserializer`` reads both, the header first):

- the ``__value_schema_id`` header: magic byte 1 and a 16-byte schema GUID, or magic byte 0 and
  a 4-byte big-endian schema id (``SchemaId.from_bytes`` reads both); the value is the bare
  Avro body (confluent-kafka-python 2.10+ producers in header mode);
- the classic prefix: magic byte 0, a 4-byte big-endian schema id, then the Avro body.

``FramedColumns`` is a ``ColumnBuilder`` and stays a pure batch function: ``schema_keys``
parses the frames and names the writer schemas a batch needs that are not known yet; the
worker fetches those (I/O, ``worker.schemas.WriterSchemas``) and hands them over with
``learn``; then ``run`` decodes. Per writer schema it keeps one *plan*, built on first sight and
resolved once against the reader schema (``stages.resolution``): the compiled fast path reading
the writer's bytes straight into the reader's features (``fast.framed`` builds the factory), the
guarded fastavro path resolving each record, or ``schema_mismatch`` dead letters when no record
of that writer can be read. Plans are kept for the ``max_schemas`` writer schemas seen last.

Reason codes of the framing itself (``records.Reason``): ``bad_magic_byte``, ``short_frame``,
``unknown_schema_id``, ``schema_mismatch``; ``null_value``, ``empty`` and ``too_large`` as in
``stages.decode``.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import fastavro
import numpy as np

from stream_scorer.headers import VALUE_SCHEMA_ID
from stream_scorer.registry import SchemaKey, describe_key
from stream_scorer.stages.records import Columns, DeadLetter, Message, Reason, Stage
from stream_scorer.stages.resolution import Kind, resolve_pair

#: Magic byte of the classic prefix (then a 4-byte schema id).
MAGIC_ID = 0
#: Magic byte of the ``__value_schema_id`` header (then a 16-byte GUID).
MAGIC_GUID = 1
#: Bytes of the classic prefix before the Avro body.
PREFIX_BYTES = 5
_GUID_BYTES = 17
_GUARD = "stream_scorer"
log = logging.getLogger(__name__)

#: A frame: the writer schema's key and the bytes of frame before the Avro body in the value.
Frame = tuple[SchemaKey, int]


class SchemaSource(Protocol):
    """Where writer schemas come from (the registry), seen from the pure stage."""

    def writer_schema(self, key: SchemaKey) -> str | None:
        """The writer schema's JSON text, or None when the registry has no such schema.

        Raises:
            RegistryError: the registry cannot be reached (retry; never a dead letter).
        """
        ...


def frame_of(msg: Message) -> Frame | Reason:
    """One record's frame (writer schema key, bytes before the body), or why it has none.

    As the stock deserializer (``dual_schema_id_deserializer``): a ``__value_schema_id`` header
    first (magic 1 + 16-byte GUID, or magic 0 + 4-byte id; the value is the bare body), else the
    value's prefix (magic 0 + 4-byte id).
    """
    headers = msg.headers()
    if headers:
        for name, raw in headers:
            if name == VALUE_SCHEMA_ID and raw is not None:  # None: absent, as the stock one reads
                if not raw:
                    return Reason.SHORT_FRAME
                if raw[0] == MAGIC_ID:
                    if len(raw) < PREFIX_BYTES:
                        return Reason.SHORT_FRAME
                    return ("id", int.from_bytes(raw[1:PREFIX_BYTES], "big")), 0
                if raw[0] != MAGIC_GUID:
                    return Reason.BAD_MAGIC_BYTE
                if len(raw) < _GUID_BYTES:
                    return Reason.SHORT_FRAME
                hexed = raw[1:_GUID_BYTES].hex()
                guid = f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-{hexed[20:]}"
                return ("guid", guid), 0
    value = msg.value()
    if value is None:
        return Reason.NULL_VALUE
    if not value:
        return Reason.EMPTY
    if value[0] != MAGIC_ID:
        return Reason.BAD_MAGIC_BYTE
    if len(value) < PREFIX_BYTES:
        return Reason.SHORT_FRAME
    return ("id", int.from_bytes(value[1:PREFIX_BYTES], "big")), PREFIX_BYTES


def frame_key(msg: Message) -> SchemaKey | Reason:
    """The writer schema key of one record's frame, or the reason it has none."""
    frame = frame_of(msg)
    return frame if isinstance(frame, Reason) else frame[0]


_EXPLAIN = {
    Reason.NULL_VALUE: "record value is null (tombstone)",
    Reason.EMPTY: "record value is empty",
    Reason.BAD_MAGIC_BYTE: (
        "the value does not start with the Confluent magic byte 0 (nor does a "
        "__value_schema_id header name its schema): not written by a Schema Registry serializer"
    ),
    Reason.SHORT_FRAME: "the value (or the schema id header) is shorter than its frame",
}


class ColumnsFactory(Protocol):
    """Builds the decode + features step of one writer schema (see ``FramedColumns``)."""

    def __call__(
        self, writer: dict[str, Any], kind: Kind, skip: int
    ) -> tuple[Callable[[Sequence[Message]], Columns], str]:
        """``run`` for ``writer``'s records (``kind``: FAST or FASTAVRO), and its path's name."""
        ...


@dataclass
class _Plan:
    """How one writer schema's records are read: a reason to dead-letter them, or a writer."""

    reason: Reason | None
    why: str
    writer: dict[str, Any] | None = None
    kind: Kind | None = None
    path: str = ""
    made: float = 0.0  # time.monotonic() when built (an unknown id is asked again later)
    #: the decode step per frame length before the body (prefix 5, header 0), built on first use
    runs: dict[int, Callable[[Sequence[Message]], Columns]] = field(default_factory=dict)


class FramedColumns:
    """Decode + features of framed records, each read with its own writer schema."""

    def __init__(
        self,
        reader: Mapping[str, Any],
        paths: Sequence[str],
        factory: ColumnsFactory,
        n_features: int,
        *,
        max_message_bytes: int,
        max_schemas: int = 1000,
        unknown_ttl_s: float = 30.0,
    ) -> None:
        """Create the stage.

        Args:
            reader: the parsed reader schema (the one the model's manifest was checked with).
            paths: the dotted field paths the model reads (features, id, event time).
            factory: builds a writer schema's decode + features (fast path or fastavro).
            n_features: the feature matrix's columns.
            max_message_bytes: larger values are dead-lettered (``too_large``) unread.
            max_schemas: how many writer schemas' plans are kept (least recently seen go).
            unknown_ttl_s: an id the registry answered 404 for is asked again after this long
                (a registry replica that lagged behind must not dead-letter an id for good).
        """
        self._reader = dict(reader)
        self._paths = tuple(paths)
        self._factory = factory
        self._n = n_features
        self._max = max_message_bytes
        self._max_schemas = max_schemas
        self._unknown_ttl_s = unknown_ttl_s
        self._plans: OrderedDict[SchemaKey, _Plan] = OrderedDict()
        #: writer schemas learned but not planned yet (JSON text, None = unknown to the registry)
        self._learned: dict[SchemaKey, str | None] = {}

    def schema_keys(self, messages: Sequence[Message]) -> set[SchemaKey]:
        """The writer schemas ``messages`` need that have neither a plan nor a learned text."""
        one = self._one_key(messages)
        if one is not None:
            keys = {one}
        else:
            keys = {f[0] for f in map(frame_of, messages) if isinstance(f, tuple)}
        now = time.monotonic()
        for k in keys:  # an id the registry did not know is asked again after a while
            plan = self._plans.get(k)
            unknown = plan is not None and plan.reason is Reason.UNKNOWN_SCHEMA_ID
            if unknown and plan is not None and now - plan.made > self._unknown_ttl_s:
                del self._plans[k]
        return {k for k in keys if k not in self._plans and k not in self._learned}

    def learn(self, key: SchemaKey, text: str | None) -> None:
        """Hand over a writer schema's JSON text (None: the registry does not have it)."""
        self._learned[key] = text

    def _plan(self, key: SchemaKey) -> _Plan:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        if key not in self._learned:
            raise LookupError(f"{describe_key(key)} was not learned before run()")
        text = self._learned.pop(key)
        if text is None:
            why = f"the registry has no {describe_key(key)}"
            plan = _Plan(Reason.UNKNOWN_SCHEMA_ID, why, made=time.monotonic())
        else:
            plan = self._build(key, text)
        self._plans[key] = plan
        while len(self._plans) > self._max_schemas:
            self._plans.popitem(last=False)
        return plan

    def _build(self, key: SchemaKey, text: str) -> _Plan:
        import json

        try:
            writer = fastavro.parse_schema(json.loads(text))
        except Exception as exc:  # a schema the registry accepted but fastavro refuses
            return _Plan(Reason.SCHEMA_MISMATCH, f"{describe_key(key)} does not parse: {exc}")
        if not isinstance(writer, dict) or writer.get("type") != "record":
            return _Plan(Reason.SCHEMA_MISMATCH, f"{describe_key(key)} is not a record")
        verdict = resolve_pair(writer, self._reader, self._paths)
        if verdict.kind is Kind.MISMATCH:
            why = f"{describe_key(key)} cannot be read with the reader schema: {verdict.why}"
            return _Plan(Reason.SCHEMA_MISMATCH, why)
        plan = _Plan(None, verdict.why, writer, verdict.kind)
        self._runner(key, plan, PREFIX_BYTES if key[0] == "id" else 0)  # names the path
        return plan

    def _runner(
        self, key: SchemaKey, plan: _Plan, skip: int
    ) -> Callable[[Sequence[Message]], Columns]:
        """The decode step of ``plan``'s records framed with ``skip`` bytes before the body."""
        run = plan.runs.get(skip)
        if run is None:
            assert plan.writer is not None and plan.kind is not None
            run, plan.path = self._factory(plan.writer, plan.kind, skip)
            plan.runs[skip] = run
            if len(plan.runs) == 1:
                why = f" ({plan.why})" if plan.why else ""
                log.info("%s: %s path%s", describe_key(key), plan.path, why)
        return run

    def plan_kind(self, key: SchemaKey) -> str:
        """How records of ``key`` are read: ``fast``, ``fastavro`` or a dead-letter reason."""
        plan = self._plan(key)
        return plan.reason.value if plan.reason is not None else plan.path

    def run(self, messages: Sequence[Message]) -> Columns:
        """Decode a batch of framed records; every writer schema must have been learned."""
        key = self._one_key(messages)
        if key is not None:  # the common case, checked in two passes: one writer, no header
            return self._run_group((key, PREFIX_BYTES), list(messages))
        frames = [frame_of(m) for m in messages]
        groups: dict[Frame, list[int]] = {}
        dead: list[DeadLetter] = []
        for i, f in enumerate(frames):
            if isinstance(f, tuple):
                groups.setdefault(f, []).append(i)
            else:
                dead.append(DeadLetter(messages[i], Stage.DECODE, f, _GUARD, _EXPLAIN[f]))
        if len(groups) == 1 and not dead:  # the common case: one writer schema, no bad frame
            ((frame, _),) = groups.items()
            return self._run_group(frame, list(messages))
        parts = [self._run_group(k, [messages[i] for i in rows]) for k, rows in groups.items()]
        return self._merge(messages, parts, dead)

    @staticmethod
    def _one_key(messages: Sequence[Message]) -> SchemaKey | None:
        """The schema key when every value has the same valid prefix and no header; else None."""
        if not messages:
            return None
        try:
            heads = {m.value()[:PREFIX_BYTES] for m in messages}  # type: ignore[index]
        except TypeError:  # a null value
            return None
        if len(heads) != 1 or any([m.headers() for m in messages]):
            return None
        (head,) = heads
        if len(head) != PREFIX_BYTES or head[0] != MAGIC_ID:
            return None
        return ("id", int.from_bytes(head[1:], "big"))

    def _run_group(self, frame: Frame, messages: list[Message]) -> Columns:
        key, skip = frame
        plan = self._plan(key)
        if plan.reason is None:
            return self._runner(key, plan, skip)(messages)
        reason = plan.reason or Reason.SCHEMA_MISMATCH
        dead = [DeadLetter(m, Stage.DECODE, reason, _GUARD, plan.why) for m in messages]
        empty = np.empty((0, self._n), dtype=np.float32)
        return Columns([], [], [], empty, dead, time.perf_counter(), {})

    def _merge(
        self, messages: Sequence[Message], parts: list[Columns], dead: list[DeadLetter]
    ) -> Columns:
        """One ``Columns`` from per-schema parts, the records back in input order."""
        row_of = {id(m): i for i, m in enumerate(messages)}
        order: list[tuple[int, int, int]] = []  # (input row, part, row in part)
        for p, cols in enumerate(parts):
            dead.extend(cols.dead)
            order.extend((row_of[id(m)], p, j) for j, m in enumerate(cols.messages))
        order.sort()
        dead.sort(key=lambda d: row_of[id(d.message)])
        kept = [parts[p].messages[j] for _, p, j in order]
        ids = [parts[p].ids[j] for _, p, j in order]
        event_ms = [parts[p].event_ms[j] for _, p, j in order]
        matrix = np.empty((len(order), self._n), dtype=np.float32)
        for row, (_, p, j) in enumerate(order):
            matrix[row] = parts[p].matrix[j]
        unseen: dict[str, int] = {}
        for cols in parts:
            for name, n in cols.unseen.items():
                unseen[name] = unseen.get(name, 0) + n
        done = max((c.decode_done for c in parts), default=time.perf_counter())
        return Columns(kept, ids, event_ms, matrix, dead, done, unseen)
