"""The Arrow path: a batch of columns (Parquet, a table) to the model's float32 matrix.

The same step as ``FastColumns`` (Avro bytes) and ``columns.AvroColumns`` (fastavro), for
records that arrive as columns instead of Avro bytes: each feature's column is turned into its
cells' values and *states* (``fast.plan``: value, missing, NaN, infinite, out of range, unseen,
not a timestamp), vectorised, and the features' policies are applied by the same
``fast.path.Policies`` as the compiled path's, so a row is scored, or dead-lettered with the same
reason and text, as the stream would for the same record.

Columns are found by the feature's ``field`` (a dotted path walks struct columns; a null parent
makes its children missing, as ``features.field_getter`` does). What each transform reads:

- ``number``: integer, unsigned, floating point and boolean columns (an integer is compared with
  ``min``/``max`` exactly, and narrowed to float32 through a double, as the stream does);
- ``category``: string columns, plain or dictionary-encoded (an Avro enum lands in Parquet as
  its symbol);
- ``hour_of_day``/``day_of_week``: timestamp columns (any unit; UTC), or integers of epoch
  milliseconds (microseconds when the input schema's field is ``timestamp-micros``);
- the id: any column (``input_id`` is its text, "" when null); the event time: as the time
  transforms (null: 0, unknown).

A column the input lacks is the input schema field's default when it has one (a null default:
every value missing), otherwise ``ArrowColumns.check`` refuses the input naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.errors import SchemaError
from stream_scorer.fast import plan as fp
from stream_scorer.fast.path import STATE_REASONS, Policies
from stream_scorer.stages.fields import resolve, type_name
from stream_scorer.stages.records import DeadLetter, Stage

Matrix = npt.NDArray[np.float32]
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: The epoch milliseconds a datetime can hold (years 1 to 9999): others are not timestamps.
_MIN_MS, _MAX_MS = -62_135_596_800_000, 253_402_300_799_999
_HOUR_MS, _DAY_MS = 3_600_000, 86_400_000
_PER_MS = {"s": (1000, 1), "ms": (1, 1), "us": (1, 1000), "ns": (1, 1_000_000)}


@dataclass(frozen=True, slots=True)
class RowMessage:
    """A row of a columnar input, standing where the stream has a Kafka record.

    ``topic()`` is the input's name (a file path, a query), ``offset()`` the row's number in
    it; ``index`` is its position in its batch (the dead-letter writer copies the row from it).
    """

    source: str
    row: int
    index: int

    def topic(self) -> str:
        """The input's name."""
        return self.source

    def partition(self) -> int:
        """Always 0."""
        return 0

    def offset(self) -> int:
        """The row's number in its input."""
        return self.row

    def key(self) -> None:
        """No key."""

    def value(self) -> None:
        """No bytes: the record is the row."""

    def headers(self) -> list[tuple[str, bytes | None]]:
        """No headers."""
        return []

    def timestamp(self) -> tuple[int, int]:
        """No timestamp (0: unknown)."""
        return (0, 0)


@dataclass
class ArrowBatch:
    """A columnar batch after features: the rows to score, their matrix, the dead letters.

    Attributes:
        keep: the scorable rows' positions in the batch.
        messages: one ``RowMessage`` per kept row, made only when asked (``message``).
        matrix: their features, one float32 row each, in the manifest's order.
        ids: their ``input_id`` texts.
        event_ms: their event times in epoch milliseconds (0: unknown).
        dead: the rows the feature policies refused.
        unseen: per ``category`` feature with any, how many rows held an unseen value.
    """

    keep: npt.NDArray[np.int64]
    matrix: Matrix
    ids: pa.Array
    event_ms: npt.NDArray[np.int64]
    dead: list[DeadLetter]
    unseen: dict[str, int]
    source: str
    first_row: int

    def message(self, i: int) -> RowMessage:
        """The ``RowMessage`` of kept row ``i``."""
        index = int(self.keep[i])
        return RowMessage(self.source, self.first_row + index, index)


class _KeptRows(Sequence[RowMessage]):
    """The kept rows as messages, each made when read (the pipeline reads only failed ones)."""

    def __init__(self, batch: ArrowBatch) -> None:
        self._batch = batch

    def __len__(self) -> int:
        return len(self._batch.keep)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self._batch.message(j) for j in range(len(self))[i]]
        return self._batch.message(int(i))


def kept_rows(batch: ArrowBatch) -> Sequence[RowMessage]:
    """``batch``'s kept rows as a sequence of messages, made lazily (``Pipeline.predict``)."""
    return _KeptRows(batch)


def column_at(batch: pa.RecordBatch | pa.Table, path: str) -> pa.Array | None:
    """The column at dotted ``path`` (through struct columns), or None when there is none.

    A null struct makes its children null.
    """
    parts = path.split(".")
    index = batch.schema.get_field_index(parts[0])
    if index < 0:
        return None
    column = batch.column(index)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    for part in parts[1:]:
        if not pa.types.is_struct(column.type) or column.type.get_field_index(part) < 0:
            return None
        column = pc.struct_field(column, [column.type.get_field_index(part)])
    return column


def _nulls(column: pa.Array) -> npt.NDArray[np.bool_]:
    return np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _is_number(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
        or pa.types.is_null(t)
    )


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t))


def _is_time(t: pa.DataType) -> bool:
    return bool(pa.types.is_timestamp(t) or pa.types.is_integer(t) or pa.types.is_null(t))


_READS = {
    "number": (_is_number, "integer, floating point or boolean"),
    "category": (_is_text, "string (plain or dictionary-encoded)"),
    "hour_of_day": (_is_time, "timestamp or integer (epoch milliseconds)"),
    "day_of_week": (_is_time, "timestamp or integer (epoch milliseconds)"),
}


class ArrowColumns:
    """Builds a columnar batch's matrix and dead letters; see the module docstring."""

    def __init__(
        self,
        schema: Mapping[str, Any],
        features: Sequence[FeatureSpec],
        *,
        id_field: str,
        event_time_field: str = "",
    ) -> None:
        """Specialise to the input schema (for defaults and time units) and the features.

        Args:
            schema: the parsed input schema (``input.schema``), checked against the features
                by the pipeline's own ``check_schema``.
            features: the model's features, in column order.
            id_field: the field copied into ``input_id``.
            event_time_field: the field with the event time; empty: none.
        """
        self.features = tuple(features)
        self.policies = Policies(self.features)
        self._schema = schema
        self._id_field = id_field
        self._event_time_field = event_time_field
        self._categories = [
            pa.array(list(f.categories), pa.string()) if f.transform == "category" else None
            for f in self.features
        ]

    def _micros(self, path: str) -> bool:
        """Whether the input schema's field at ``path`` holds microseconds."""
        try:
            types = resolve(self._schema, path)
        except SchemaError:
            return False
        return any(type_name(t) == "long/timestamp-micros" for t in types)

    def _default(self, path: str) -> tuple[bool, Any]:
        """The input schema's default of the top-level field ``path``: (whether any, value)."""
        for f in self._schema.get("fields", ()):
            if f.get("name") == path and "default" in f:
                return True, f["default"]
        return False, None

    def check(self, schema: pa.Schema, source: str) -> None:
        """Refuse an input whose columns cannot feed the features (naming the field).

        Raises:
            SchemaError: a field with no column and no default, or a column of a type its
                transform cannot read.
        """
        wanted = [(f"feature {f.name!r}", f.field, f.transform) for f in self.features]
        wanted.append(("input.id_field", self._id_field, ""))
        if self._event_time_field:
            wanted.append(("input.event_time_field", self._event_time_field, "hour_of_day"))
        empty = schema.empty_table()
        for what, path, transform in wanted:
            column = column_at(empty, path)
            if column is None:
                if self._default(path)[0]:
                    continue
                raise SchemaError(
                    f"{what}: field {path!r} is not a column of {source} (columns: "
                    f"{', '.join(schema.names)}) and the input schema gives it no default"
                )
            if transform:
                accepts, kinds = _READS[transform]
                if not accepts(column.type):
                    raise SchemaError(
                        f"{what}: column {path!r} of {source} is {column.type}; the "
                        f"{transform!r} transform reads {kinds}"
                    )

    def _column(self, batch: pa.RecordBatch, path: str) -> pa.Array:
        column = column_at(batch, path)
        if column is not None:
            return column
        _, value = self._default(path)
        return pa.nulls(batch.num_rows) if value is None else pa.array([value] * batch.num_rows)

    def _millis(
        self, column: pa.Array, path: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """A time column in epoch milliseconds (floored), and its null mask."""
        nulls = _nulls(column)
        if pa.types.is_null(column.type):
            return np.zeros(len(column), dtype=np.int64), nulls
        mul, div = 1, 1000 if self._micros(path) else 1
        if pa.types.is_timestamp(column.type):
            mul, div = _PER_MS[column.type.unit]
        raw = column.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        values = np.asarray(raw, dtype=np.int64)
        if div != 1:
            values = values // div
        elif mul != 1:
            values = values * mul
        return values, nulls

    def _number(
        self, column: pa.Array, j: int, cells: Matrix, state: npt.NDArray[np.uint8]
    ) -> None:
        nulls = _nulls(column)
        lo_f, hi_f, lo_i, hi_i = (b[j] for b in self.policies.bounds)
        t = column.type
        if pa.types.is_null(t):
            cells[:] = np.nan
            state[:] = fp.MISSING
            return
        if pa.types.is_floating(t):
            values = np.asarray(
                column.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False),
                dtype=np.float64,
            )
            with np.errstate(invalid="ignore", over="ignore"):
                nan = np.isnan(values)
                inf = ~nan & ~((values >= -_FLOAT32_MAX) & (values <= _FLOAT32_MAX))
                outside = ~nan & ~inf & ~((values >= lo_f) & (values <= hi_f))
                cells[:] = values.astype(np.float32)
            state[:] = fp.VALUE
            state[outside] = fp.OUT_OF_RANGE
            state[inf] = fp.INF
            state[nan] = fp.NAN
            cells[nan] = np.nan
        else:  # integers and booleans: compared exactly, narrowed through a double
            boolean = pa.types.is_boolean(t)
            ints = np.asarray(
                column.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False),
                dtype=np.int64,
            )
            cells[:] = ints.astype(np.float64).astype(np.float32)
            state[:] = fp.VALUE
            state[(ints < lo_i) | (ints > hi_i)] = (
                fp.OUT_OF_RANGE_BOOL if boolean else fp.OUT_OF_RANGE_INT
            )
        state[nulls] = fp.MISSING
        cells[nulls] = np.nan

    def _category(
        self, column: pa.Array, j: int, cells: Matrix, state: npt.NDArray[np.uint8]
    ) -> None:
        nulls = _nulls(column)
        categories = self._categories[j]
        if pa.types.is_null(column.type):
            index = pa.nulls(len(column), pa.int32())
        elif pa.types.is_dictionary(column.type):
            positions = pc.index_in(column.dictionary.cast(pa.string()), value_set=categories)
            index = positions.take(column.indices)
        else:
            index = pc.index_in(column.cast(pa.string()), value_set=categories)
        unseen = _nulls(index) & ~nulls
        cells[:] = np.asarray(
            index.cast(pa.float32()).fill_null(np.nan).to_numpy(zero_copy_only=False),
            dtype=np.float32,
        )
        state[:] = fp.VALUE
        state[unseen] = fp.UNSEEN
        state[nulls] = fp.MISSING

    def _time(self, column: pa.Array, j: int, cells: Matrix, state: npt.NDArray[np.uint8]) -> None:
        ms, nulls = self._millis(column, self.features[j].field)
        if self.features[j].transform == "hour_of_day":
            values = (ms // _HOUR_MS) % 24
        else:  # 1970-01-01 was a Thursday (Monday = 0)
            values = (ms // _DAY_MS + 3) % 7
        cells[:] = values.astype(np.float32)
        state[:] = fp.VALUE
        state[(ms < _MIN_MS) | (ms > _MAX_MS)] = fp.NOT_TIMESTAMP
        state[nulls] = fp.MISSING
        cells[nulls] = np.nan

    def ids(self, batch: pa.RecordBatch, keep: npt.NDArray[np.int64]) -> pa.Array:
        """``input_id`` of rows ``keep``: the id's text, "" when null (as the stream)."""
        column = self._column(batch, self._id_field).take(pa.array(keep, pa.int64()))
        t = column.type
        if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t):
            return column.cast(pa.string()).fill_null("")
        if pa.types.is_dictionary(t) and _is_text(t):
            return column.cast(pa.string()).fill_null("")
        texts = [v if type(v) is str else ("" if v is None else str(v)) for v in column.to_pylist()]
        return pa.array(texts, pa.string())

    def _raw(self, column: pa.Array, i: int, code: int, cell: float) -> Any:
        """The value as sent of an unusual cell, for its dead letter's text."""
        if code in (fp.INF, fp.OUT_OF_RANGE, fp.UNSEEN):
            value = column[i].as_py()
            return float(value) if code == fp.INF else value
        return cell

    def run(self, batch: pa.RecordBatch, source: str = "", first_row: int = 0) -> ArrowBatch:
        """Build the batch's features and apply the policies; refused rows become dead letters.

        Args:
            batch: the records, as columns (``check`` accepted its schema).
            source: the input's name, for the dead letters.
            first_row: the number of the batch's first row in its input.
        """
        n = batch.num_rows
        k = len(self.features)
        matrix = np.empty((n, k), dtype=np.float32)
        state = np.empty((n, k), dtype=np.uint8)
        columns: list[pa.Array] = []
        for j, spec in enumerate(self.features):
            column = self._column(batch, spec.field)
            columns.append(column)
            if spec.transform == "number":
                self._number(column, j, matrix[:, j], state[:, j])
            elif spec.transform == "category":
                self._category(column, j, matrix[:, j], state[:, j])
            else:
                self._time(column, j, matrix[:, j], state[:, j])
        unseen = {
            spec.name: count
            for j, spec in enumerate(self.features)
            if spec.transform == "category"
            and (count := int(np.count_nonzero(state[:, j] == fp.UNSEEN)))
        }
        verdict, first = self.policies.verdicts(matrix, state)
        dead: list[DeadLetter] = []
        for i in np.flatnonzero(verdict).tolist():
            code, j = int(verdict[i]), int(first[i])
            raw = self._raw(columns[j], i, code, float(matrix[i, j]))
            dead.append(
                DeadLetter(
                    RowMessage(source, first_row + i, i),
                    Stage.FEATURES,
                    STATE_REASONS[code],
                    "FeatureError",
                    self.policies.describe(code, j, raw),
                )
            )
        keep = np.flatnonzero(verdict == 0).astype(np.int64)
        if keep.size != n:
            matrix = matrix[keep]
        if self._event_time_field:
            column = self._column(batch, self._event_time_field)
            ms, nulls = self._millis(column, self._event_time_field)
            event_ms = np.where(nulls, 0, ms)[keep]
        else:
            event_ms = np.zeros(keep.size, dtype=np.int64)
        return ArrowBatch(
            keep, matrix, self.ids(batch, keep), event_ms, dead, unseen, source, first_row
        )
