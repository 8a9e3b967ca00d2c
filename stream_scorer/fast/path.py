"""The fast path: a batch of messages straight to the model's float32 matrix, in one pass.

``FastColumns`` stands in for ``Decoder`` + ``FeatureBuilder`` (``columns.AvroColumns``), a
``ColumnBuilder`` like it: a program specialised to the input schema and the model's features
(``fast.plan``) is run over the whole batch by a compiled interpreter (``fast.kernel``), which
enforces every decode guard and writes each feature cell with a *state* (value, missing, NaN,
infinite, unseen category, not numeric, not a timestamp).
The feature policies are then applied to the states, vectorised, column by column in the
manifest's order (the first failing feature names the dead letter, as in ``stages/features.py``).

Dead-letter reason codes (``records.Reason``): the decode stage's are the kernel's statuses
(``fastkernel.REASONS``); the feature stage's are each verdict's (``STATE_REASONS``). The
policies are the features' own (``FeatureSpec.effective_policy``, the manifest's
``ValuePolicy`` with the feature's overrides, and its ``min``/``max``), as in ``features.py``.
``Columns.unseen`` counts the unseen categories per feature, as ``FeatureBuilder.unseen``.

``build_fast_path`` decides, and logs, whether a schema gets the fast path; when it cannot be
specialised (``fast.plan.Unsupported``) the worker keeps the fastavro path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_scorer.contracts.manifest import DEAD_LETTER, PASS, FeatureSpec, ValuePolicy
from stream_scorer.fast import plan as fp
from stream_scorer.fast.plan import Program, Unsupported, compile_program
from stream_scorer.stages.features import (
    non_finite_message,
    out_of_range_message,
    unseen_message,
)
from stream_scorer.stages.records import (
    Columns,
    DeadLetter,
    Message,
    Reason,
    Stage,
    not_avro_hint,
)

log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float32]
_GUARD = "stream_scorer"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_OUT_OF_RANGE_STATES = (fp.OUT_OF_RANGE, fp.OUT_OF_RANGE_INT, fp.OUT_OF_RANGE_BOOL)

#: The dead-letter reason of each verdict (every out-of-range state's is ``fp.OUT_OF_RANGE``).
STATE_REASONS = {
    fp.MISSING: Reason.MISSING_VALUE,
    fp.NAN: Reason.NAN_VALUE,
    fp.INF: Reason.NON_FINITE,
    fp.OUT_OF_RANGE: Reason.OUT_OF_RANGE,
    fp.UNSEEN: Reason.UNSEEN_CATEGORY,
    fp.NOT_NUMERIC: Reason.NOT_NUMERIC,
    fp.NOT_TIMESTAMP: Reason.NOT_TIMESTAMP,
}
_EXPLAIN = {
    fp.MISSING: "value is missing (null or absent)",
    fp.NAN: "value is NaN",
    fp.NOT_NUMERIC: "value is not a number",
    fp.NOT_TIMESTAMP: "value is not a timestamp",
}
#: The explanation of each decode stage reason in the fast path's dead letters.
DECODE_EXPLAIN = {
    Reason.NULL_VALUE: "record value is null (tombstone)",
    Reason.EMPTY: "record value is empty",
    Reason.TOO_LARGE: "value is larger than input.max_message_bytes",
    Reason.TRUNCATED: "the value ends before the record does",
    Reason.VARINT_TOO_LONG: "a variable-length integer runs past 10 bytes",
    Reason.INT_OUT_OF_RANGE: "an integer does not fit its type (int: 32 bits, long: 64 bits)",
    Reason.NEGATIVE_LENGTH: "a string or bytes length is negative",
    Reason.BAD_ENUM_INDEX: "an enum index is outside the enum's symbols",
    Reason.BAD_UNION_INDEX: "a union index is outside the union's branches",
    Reason.COUNT_TOO_LARGE: "an array or map announces more items than can follow",
    Reason.INVALID_UTF8: "a string is not valid UTF-8",
    Reason.TRAILING_BYTES: "bytes are left over after the record",
    Reason.MALFORMED_AVRO: "a logical-type value cannot be converted",
    Reason.BAD_MAGIC_BYTE: "the value does not start with the magic byte 0",
    Reason.SHORT_FRAME: "the value is shorter than its frame",
    Reason.UNKNOWN_SCHEMA_ID: "the registry has no schema with this id",
    Reason.SCHEMA_MISMATCH: "the writer schema cannot be read with the reader schema",
}


def decode_dead_letter(
    msg: Message,
    reason: Reason,
    err_at: int,
    length: int,
    *,
    max_bytes: int,
    schema_name: str | None,
) -> DeadLetter:
    """The dead letter of a record a compiled reader refused with a decode ``reason``.

    Args:
        msg: the record.
        reason: the kernel's status as a reason (``fast.kernel.REASONS``).
        err_at: where in the Avro body decoding stopped.
        length: the body's length (-1: a null value).
        max_bytes: the size limit (``too_large``'s message).
        schema_name: the schema's name, for the hint of schemaless input that looks like JSON
            or a frame (``records.not_avro_hint``); None: framed input, no hint.
    """
    where = "" if length <= 0 else f" (at byte {err_at} of {length})"
    if reason is Reason.TOO_LARGE:
        where = f" ({length} bytes, limit {max_bytes})"
    hint = "" if schema_name is None else not_avro_hint(msg.value(), schema_name, reason)
    return DeadLetter(msg, Stage.DECODE, reason, _GUARD, DECODE_EXPLAIN[reason] + where + hint)


def _kernel() -> Any:
    from stream_scorer.fast import kernel as fastkernel

    return fastkernel


class Policies:
    """The features' value policies applied to cell states, vectorised (``fast.plan`` states).

    One home for both vectorised column builders: the compiled Avro path (``FastColumns``) and
    the Arrow path (``fast.arrow.ArrowColumns``) write each cell's state and leave the verdicts,
    and which feature names a row's dead letter, to this.
    """

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        """Tables for ``features``, in column order."""
        self.features = tuple(features)
        policies = [f.effective_policy for f in self.features]
        self._reasons = self._reason_table(policies)
        #: per column: (lowest, highest) double, (lowest, highest) integer (``_bound_arrays``)
        self.bounds = self._bound_arrays(self.features)
        self._inf_to_nan = np.array([p.infinite == PASS for p in policies], dtype=bool)

    @staticmethod
    def _reason_table(policies: Sequence[ValuePolicy]) -> npt.NDArray[np.int64]:
        """``(features, states)``: the state that dead-letters a cell, else 0 (pass)."""
        table = np.zeros((len(policies), max(_OUT_OF_RANGE_STATES) + 1), dtype=np.int64)
        for j, p in enumerate(policies):
            table[j, fp.NOT_NUMERIC] = fp.NOT_NUMERIC
            table[j, fp.NOT_TIMESTAMP] = fp.NOT_TIMESTAMP
            for states, rule in (
                ((fp.MISSING,), p.missing),
                ((fp.NAN,), p.nan),
                ((fp.INF,), p.infinite),
                (_OUT_OF_RANGE_STATES, p.out_of_range),
                ((fp.UNSEEN,), p.unseen),
            ):
                for s in states:
                    table[j, s] = states[0] if rule == DEAD_LETTER else 0
        return table

    @staticmethod
    def _bound_arrays(features: Sequence[FeatureSpec]) -> tuple[npt.NDArray[Any], ...]:
        """The kernel's bounds per column: (lowest, highest) double, (lowest, highest) integer.

        An integer is valid from the smallest integer at or above a feature's ``min`` to the
        largest at or below its ``max`` (so it is compared exactly, as Python compares an int
        with a float); when no int64 is in between, the integer bounds cross.
        """
        lo_float = np.full(len(features), -np.inf)
        hi_float = np.full(len(features), np.inf)
        lo_int = np.full(len(features), _INT64_MIN, dtype=np.int64)
        hi_int = np.full(len(features), _INT64_MAX, dtype=np.int64)
        for j, spec in enumerate(features):
            low = -math.inf if spec.min is None else spec.min
            high = math.inf if spec.max is None else spec.max
            lo_float[j], hi_float[j] = low, high
            first = _INT64_MIN if low == -math.inf else math.ceil(low)
            last = _INT64_MAX if high == math.inf else math.floor(high)
            if first > min(last, _INT64_MAX) or last < _INT64_MIN:
                lo_int[j], hi_int[j] = _INT64_MAX, _INT64_MIN
            else:
                lo_int[j], hi_int[j] = max(first, _INT64_MIN), min(last, _INT64_MAX)
        return lo_float, hi_float, lo_int, hi_int

    def verdicts(
        self, matrix: npt.NDArray[np.float32], state: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Apply the policies: per row, the failing state (0: none) and its feature column."""
        n, k = state.shape
        if n == 0 or k == 0:
            return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        infinite = state == fp.INF
        if self._inf_to_nan.any() and infinite.any():  # passed infinities reach XGBoost as NaN
            matrix[infinite & self._inf_to_nan[None, :]] = np.nan
        codes = self._reasons[np.arange(k)[None, :], state]
        first = np.argmax(codes != 0, axis=1)
        return codes[np.arange(n), first], first

    def describe(self, code: int, column: int, raw: Any) -> str:
        """The dead-letter text of a cell whose state ``code`` dead-lettered its row.

        ``raw``: the value as sent for ``INF`` (a float), ``OUT_OF_RANGE`` (a float, an int or
        a bool) and ``UNSEEN`` (the string or symbol; None for a value of another type); the
        matrix cell otherwise.
        """
        spec = self.features[column]
        if code == fp.INF:  # the value as sent, in the fastavro path's words
            text = non_finite_message(raw)
        elif code == fp.OUT_OF_RANGE:
            text = out_of_range_message(raw, spec.min, spec.max)
        elif code == fp.UNSEEN:
            text = unseen_message(raw)
        else:
            text = f"{_EXPLAIN[code]} (field {spec.field!r}, value {raw!r})"
        return f"{spec.name}: {text}"


class FastColumns:
    """Builds a batch's ``Columns`` straight from its bytes; see the module docstring."""

    def __init__(
        self,
        schema: Mapping[str, Any],
        features: Sequence[FeatureSpec],
        *,
        id_field: str,
        event_time_field: str = "",
        max_message_bytes: int,
    ) -> None:
        """Specialise to ``schema`` and ``features`` and load (or compile) the kernel.

        Args:
            schema: the parsed writer schema (``decode.load_schema``).
            features: the model's features, in column order.
            id_field: the input field copied into ``input_id``.
            event_time_field: the input field with the event time; empty: none.
            max_message_bytes: larger values are dead-lettered (``too_large``) unread.

        Raises:
            Unsupported: the schema cannot be specialised (the message says why).
        """
        self.features = tuple(features)
        self._name = str(schema.get("name", "?"))
        self.program: Program = compile_program(
            schema, self.features, id_field=id_field, event_time_field=event_time_field
        )
        self._max = max_message_bytes
        self.policies = Policies(self.features)
        self._bounds = self.policies.bounds
        self._category_columns = np.array(
            [j for j, f in enumerate(self.features) if f.transform == "category"], dtype=np.int64
        )
        self._k = _kernel()
        started = time.perf_counter()
        self.run([])  # compile, or load from numba's cache, before the first real batch
        # and the id gatherer of ``_id_values``, with the argument types of its call there
        self._k.gather(np.frombuffer(b"\x00", dtype=np.uint8), np.zeros((0, 6), np.int64)[:, 2:4])
        self.warmup_s = time.perf_counter() - started
        #: where the kernel's machine code came from (``fast.cache.origin``), for the log
        self.kernel_origin: str = self._k.origin()

    def decode(
        self, messages: Sequence[Message], skip: int = 0
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8], dict[str, Any]]:
        """Run the kernel only: the raw matrix, the cell states and the per-record columns.

        The columns: ``status`` (index into ``fast.kernel.REASONS``), ``err_at``, ``ids``,
        ``id_float``, ``times``, ``raw_float``, ``raw_int`` (see ``fast.kernel.run_batch``) and
        ``buf`` (the bytes).

        Args:
            messages: the records.
            skip: bytes before each record's Avro body (a wire-format frame's prefix, which the
                caller has checked: every non-null value is at least this long).
        """
        values = [m.value() for m in messages]
        n = len(values)
        try:
            lens = np.array(list(map(len, values)), dtype=np.int64)  # type: ignore[arg-type]
        except TypeError:  # a null value (tombstone)
            lens = np.array([-1 if v is None else len(v) for v in values], dtype=np.int64)
        lens = lens.reshape(n)
        parts: list[bytes] = values  # type: ignore[assignment]
        if n and (values.count(None) or int(lens.max()) > self._max):
            parts = [b"" if v is None or len(v) > self._max else v for v in values]
        joined = b"".join(parts)
        sizes = np.where((lens < 0) | (lens > self._max), 0, lens)
        starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1], out=starts[1:])
        if skip:
            body = (lens >= 0) & (lens <= self._max)
            starts = np.where(body, starts + skip, starts)
            lens = np.where(body, lens - skip, lens)
        buf = np.frombuffer(joined or b"\x00", dtype=np.uint8)
        prog = self.program
        matrix = np.empty((n, prog.n_features), dtype=np.float32)
        state = np.empty((n, prog.n_features), dtype=np.uint8)
        cols: dict[str, Any] = {
            "raw_float": np.empty((n, prog.n_features), dtype=np.float64),
            "raw_int": np.empty((n, prog.n_features), dtype=np.int64),
            "status": np.empty(n, dtype=np.int64),
            "err_at": np.empty(n, dtype=np.int64),
            "ids": np.zeros((n, 6), dtype=np.int64),
            "id_float": np.zeros(n, dtype=np.float64),
            "times": np.zeros((n, 2), dtype=np.int64),
            "buf": joined,
            "buf_array": buf,
            "lens": lens,
        }
        self._k.run_batch(
            buf,
            starts,
            lens,
            self._max,
            prog.code,
            prog.branches,
            prog.enum_lut,
            prog.cat_bytes,
            prog.cat_spans,
            prog.depth,
            *self._bounds,
            matrix,
            state,
            cols["raw_float"],
            cols["raw_int"],
            cols["status"],
            cols["err_at"],
            cols["ids"],
            cols["id_float"],
            cols["times"],
        )
        return matrix, state, cols

    def feature_verdicts(
        self, matrix: npt.NDArray[np.float32], state: npt.NDArray[np.uint8]
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Apply the policies: per row, the failing state (0: none) and its feature column."""
        return self.policies.verdicts(matrix, state)

    def _id_values(self, cols: Mapping[str, Any], rows: npt.NDArray[np.int64]) -> list[Any]:
        """The id of each of ``rows`` as fastavro would have returned it."""
        ids = cols["ids"][rows]
        kinds = ids[:, 0]
        buf: bytes = cols["buf"]
        if rows.size and bool(np.all(kinds == fp.ID_STRING)):
            spans = ids[:, 2:4]
            text = self._k.gather(cols["buf_array"], spans).tobytes().decode()
            ends = np.cumsum(ids[:, 4]).tolist()
            begins = [0, *ends[:-1]]
            return [text[a:b] for a, b in zip(begins, ends, strict=True)]
        out: list[Any] = []
        floats = cols["id_float"][rows]
        for i, (kind, ival, s, length, _c, table) in enumerate(ids.tolist()):
            if kind == fp.ID_STRING:
                out.append(buf[s : s + length].decode())
            elif kind == fp.ID_INT:
                out.append(ival)
            elif kind == fp.ID_BOOL:
                out.append(bool(ival))
            elif kind == fp.ID_FLOAT:
                out.append(float(floats[i]))
            elif kind == fp.ID_BYTES:
                out.append(buf[s : s + length])
            elif kind == fp.ID_ENUM:
                out.append(self.program.enum_tables[table][ival])
            else:
                out.append(None)
        return out

    @staticmethod
    def _raw(
        cols: Mapping[str, Any], state: npt.NDArray[np.uint8], i: int, j: int
    ) -> float | int | bool:
        """The value of an out-of-range cell as it was sent (a float, an int or a bool)."""
        if state[i, j] == fp.OUT_OF_RANGE_INT:
            return int(cols["raw_int"][i, j])
        if state[i, j] == fp.OUT_OF_RANGE_BOOL:
            return bool(cols["raw_int"][i, j])
        return float(cols["raw_float"][i, j])

    def _unseen_value(self, cols: Mapping[str, Any], i: int, j: int) -> str | None:
        """The string or enum symbol of an unseen cell; None for a value of another type."""
        kind = float(cols["raw_float"][i, j])
        at = int(cols["raw_int"][i, j])
        if kind >= 0:  # a string: its length, and where it starts
            text: str = cols["buf"][at : at + int(kind)].decode()
            return text
        return self.program.lut_symbols[at] if kind == -1 else None

    def _unseen_counts(
        self, state: npt.NDArray[np.uint8], decoded_ok: npt.NDArray[np.bool_]
    ) -> dict[str, int]:
        """Per category feature with any, how many decoded records hold an unseen value."""
        if not self._category_columns.size or not state.shape[0]:
            return {}
        unseen = state[:, self._category_columns] == fp.UNSEEN
        counts = np.count_nonzero(unseen & decoded_ok[:, None], axis=0).tolist()
        return {
            self.features[j].name: n
            for j, n in zip(self._category_columns.tolist(), counts, strict=True)
            if n
        }

    def run(self, messages: Sequence[Message], skip: int = 0, *, hints: bool = True) -> Columns:
        """Decode a batch and apply the feature policies; bad records become dead letters.

        ``skip``: bytes of frame before each Avro body (see ``decode``). ``hints``: schemaless
        input, whose dead letters say when a value looks like JSON or a frame (``not_avro_hint``).
        """
        matrix, state, cols = self.decode(messages, skip)
        decode_done = time.perf_counter()
        status = cols["status"]
        reasons = self._k.REASONS
        dead: list[DeadLetter] = []
        decoded_ok = status == 0
        if not bool(np.all(decoded_ok)):
            lens = cols["lens"]
            for i in np.flatnonzero(~decoded_ok).tolist():
                dead.append(
                    decode_dead_letter(
                        messages[i],
                        reasons[int(status[i])],
                        int(cols["err_at"][i]),
                        int(lens[i]),
                        max_bytes=self._max,
                        schema_name=self._name if hints else None,
                    )
                )
        verdict, column = self.feature_verdicts(matrix, state)
        verdict[~decoded_ok] = 0
        if bool(verdict.any()):
            for i in np.flatnonzero(verdict).tolist():
                code = int(verdict[i])
                j = int(column[i])
                sent: Any
                if code == fp.INF:
                    sent = float(cols["raw_float"][i, j])
                elif code == fp.OUT_OF_RANGE:
                    sent = self._raw(cols, state, i, j)
                elif code == fp.UNSEEN:
                    sent = self._unseen_value(cols, i, j)
                else:
                    sent = float(matrix[i, j])
                dead.append(
                    DeadLetter(
                        messages[i],
                        Stage.FEATURES,
                        STATE_REASONS[code],
                        "FeatureError",
                        self.policies.describe(code, j, sent),
                    )
                )
        keep = np.flatnonzero(decoded_ok & (verdict == 0))
        if keep.size != len(messages):
            matrix = matrix[keep]
        rids = self._id_values(cols, keep)
        times = cols["times"][keep]
        event: list[Any] = times[:, 1].tolist()
        if not bool(times[:, 0].all()):
            event = [t if ok else None for ok, t in zip(times[:, 0].tolist(), event, strict=True)]
        kept = (
            list(messages) if keep.size == len(messages) else [messages[i] for i in keep.tolist()]
        )
        unseen = self._unseen_counts(state, decoded_ok)
        return Columns(kept, rids, event, matrix, dead, decode_done, unseen)


def build_fast_path(
    schema: Mapping[str, Any],
    features: Sequence[FeatureSpec],
    *,
    id_field: str,
    event_time_field: str,
    max_message_bytes: int,
    enabled: bool = True,
) -> FastColumns | None:
    """Return a ``FastColumns`` for the schema, or None (fastavro path), logging the choice."""
    if not enabled:
        log.info("decoder: fastavro path (the fast path is switched off: input.fast_path)")
        return None
    try:
        fast = FastColumns(
            schema,
            features,
            id_field=id_field,
            event_time_field=event_time_field,
            max_message_bytes=max_message_bytes,
        )
    except Unsupported as exc:
        log.info("decoder: fastavro path (the schema cannot be specialised: %s)", exc)
        return None
    log.info(
        "decoder: fast path for %s (%d operations, %d features; kernel ready in %.2f s, %s)",
        schema.get("name", "the input schema"),
        len(fast.program.code),
        len(fast.features),
        fast.warmup_s,
        fast.kernel_origin,
    )
    return fast
