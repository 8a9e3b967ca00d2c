"""Features: decoded records to the model's float32 matrix, in the manifest's column order.

Pure functions of their inputs; nothing here knows Kafka or any particular schema.

Transforms (``FeatureSpec.transform``):

- ``number``: int, long, float, double or boolean to float; null and NaN are *missing* (NaN,
  which XGBoost treats as missing); +/-infinity is rejected (``non_finite``); any other type is
  rejected (``not_numeric``).
- ``category``: a string or enum symbol to its position in ``categories``; null or an unseen
  symbol is missing.
- ``hour_of_day`` / ``day_of_week``: a timestamp (a datetime, or epoch milliseconds) to its UTC
  hour (0-23) or weekday (Monday = 0); null is missing.

A rejected row becomes a ``DeadLetter`` at stage ``features``; the other rows go on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_scorer.errors import SchemaError
from stream_scorer.manifest import FeatureSpec

Matrix = npt.NDArray[np.float32]
_NAN = math.nan


class FeatureError(ValueError):
    """A value cannot become a feature; ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _number(value: Any) -> float:
    if value is None:
        return _NAN
    if isinstance(value, bool | int | float):
        out = float(value)
        if math.isinf(out):
            raise FeatureError("non_finite", f"value {value!r} is not finite")
        return out
    raise FeatureError("not_numeric", f"value {value!r} is not a number")


def _as_datetime(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, int) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000.0, tz=UTC)
    raise FeatureError("not_timestamp", f"value {value!r} is not a timestamp")


def _hour(value: Any) -> float:
    dt = _as_datetime(value)
    return _NAN if dt is None else float(dt.astimezone(UTC).hour)


def _weekday(value: Any) -> float:
    dt = _as_datetime(value)
    return _NAN if dt is None else float(dt.astimezone(UTC).weekday())


def _category(categories: tuple[str, ...]) -> Callable[[Any], float]:
    index = {c: float(i) for i, c in enumerate(categories)}

    def convert(value: Any) -> float:
        return index.get(value, _NAN) if isinstance(value, str) else _NAN

    return convert


def field_getter(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """Return a function reading the dotted ``path`` from a record (None where absent)."""
    parts = path.split(".")
    if len(parts) == 1:
        name = parts[0]
        return lambda record: record.get(name)

    def get(record: Mapping[str, Any]) -> Any:
        node: Any = record
        for part in parts:
            if not isinstance(node, Mapping):
                return None
            node = node.get(part)
        return node

    return get


def _converter(spec: FeatureSpec) -> Callable[[Any], float]:
    if spec.transform == "number":
        return _number
    if spec.transform == "category":
        return _category(spec.categories)
    if spec.transform == "hour_of_day":
        return _hour
    return _weekday


@dataclass(frozen=True)
class RejectedRow:
    """A row that cannot be scored: its index in the batch and why."""

    index: int
    feature: str
    reason: str
    message: str


class FeatureBuilder:
    """Builds the model's input matrix from decoded records."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        """Create a builder for ``features``, in the model's column order."""
        self.features = tuple(features)
        self._columns = [(s.name, field_getter(s.field), _converter(s)) for s in self.features]

    def build(self, records: Sequence[Mapping[str, Any]]) -> tuple[Matrix, list[RejectedRow]]:
        """Return the float32 matrix (one row per record) and the rows that were rejected.

        Rejected rows stay in the matrix (filled with NaN) so indexes keep lining up; the
        caller drops them before scoring.
        """
        n = len(records)
        matrix = np.empty((n, len(self._columns)), dtype=np.float32)
        rejected: dict[int, RejectedRow] = {}
        for j, (name, get, convert) in enumerate(self._columns):
            column = matrix[:, j]
            for i, record in enumerate(records):
                try:
                    column[i] = convert(get(record))
                except FeatureError as exc:
                    column[i] = _NAN
                    rejected.setdefault(i, RejectedRow(i, name, exc.reason, f"{name}: {exc}"))
        return matrix, [rejected[i] for i in sorted(rejected)]


def check_schema(features: Sequence[FeatureSpec], schema_fields: Mapping[str, Any]) -> None:
    """Fail start-up when a feature's field is not in the input schema.

    Args:
        features: the manifest's features.
        schema_fields: top-level field name to Avro type of the input record.

    Raises:
        SchemaError: naming the first feature whose field the schema lacks.
    """
    for spec in features:
        top = spec.field.split(".")[0]
        if top not in schema_fields:
            raise SchemaError(
                f"feature {spec.name!r} reads field {spec.field!r}, which the input schema "
                f"does not have (fields: {', '.join(schema_fields)})"
            )
