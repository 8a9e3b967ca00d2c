"""Features: decoded records to the model's float32 matrix, in the manifest's column order.

Pure functions of their inputs; nothing here knows Kafka or any particular schema.

Transforms (``FeatureSpec.transform``):

- ``number``: int, long, float, double or boolean to float; any other type is rejected
  (``not_numeric``).
- ``category``: a string or enum symbol to its position in ``categories`` (0, 1, 2, ...); any
  other value (a string or symbol not listed, or a value of another type) is *unseen*: NaN
  (missing to XGBoost) or a dead letter, by the ``unseen`` policy. ``FeatureBuilder.unseen``
  counts them per feature.
- ``hour_of_day`` / ``day_of_week``: a timestamp (a datetime, or epoch milliseconds) to its UTC
  hour (0-23) or weekday (Monday = 0); anything else, or a time no datetime can hold, is
  rejected (``not_timestamp``).

Each feature's value policy (``FeatureSpec.effective_policy``: the manifest's, with the
feature's overrides) decides, per kind of unusual value, between ``pass`` and ``dead_letter``:

=============  ========================================  ===================  ===============
policy key     value                                     ``pass`` sends       reason
=============  ========================================  ===================  ===============
missing        null or absent (any transform)            NaN                  missing_value
nan            NaN (``number``)                          NaN                  nan_value
infinite       +/-inf, or beyond float32 (``number``)    NaN                  non_finite
out_of_range   outside ``min``/``max`` (``number``)      the value            out_of_range
unseen         not in ``categories`` (``category``)      NaN                  unseen_category
=============  ========================================  ===================  ===============

Both checks see the value as decoded, before it is narrowed to float32: a double (a double
beyond float32's largest value is infinite even where float32 would round it to that value),
or an int, compared with ``min``/``max`` exactly (not as the nearest double).

Defaults: missing, nan and unseen pass, infinite and out_of_range dead-letter (XGBoost refuses
infinite input, so ``pass`` turns it into NaN). A rejected row becomes a ``DeadLetter`` at stage
``features``; the other rows go on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_scorer.contracts.manifest import DEAD_LETTER, FeatureSpec, ValuePolicy
from stream_scorer.errors import SchemaError
from stream_scorer.stages.fields import base_type, resolve, type_name
from stream_scorer.stages.records import FEATURE_REASONS as FEATURE_REASONS
from stream_scorer.stages.records import Reason

Matrix = npt.NDArray[np.float32]
_NAN = math.nan
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def non_finite_message(value: Any) -> str:
    """The ``non_finite`` dead letter's text for ``value`` (as sent: a float, or an int)."""
    return f"value {value!r} is not finite as float32"


def unseen_message(value: Any) -> str:
    """The ``unseen_category`` dead letter's text for ``value`` (a string or symbol is quoted)."""
    if isinstance(value, str):
        return f"value {value!r} is not one of the categories"
    return "value is not a string or enum symbol (so none of the categories)"


def out_of_range_message(value: Any, low: float | None, high: float | None) -> str:
    """The ``out_of_range`` dead letter's text for ``value`` (as sent) and the bounds."""
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    return f"value {value!r} is outside [{lo}, {hi}]"


class FeatureError(ValueError):
    """A value cannot become a feature; ``reason`` is the dead-letter reason code."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _number(spec: FeatureSpec, policy: ValuePolicy) -> Callable[[Any], float]:
    reject_nan = policy.nan == DEAD_LETTER
    reject_inf = policy.infinite == DEAD_LETTER
    reject_range = policy.out_of_range == DEAD_LETTER
    low = -math.inf if spec.min is None else spec.min
    high = math.inf if spec.max is None else spec.max
    bounded = spec.min is not None or spec.max is not None

    def convert(value: Any) -> float:
        if not isinstance(value, bool | int | float):
            raise FeatureError(Reason.NOT_NUMERIC, f"value {value!r} is not a number")
        try:
            out = float(value)
        except OverflowError:  # an int beyond any float
            out = math.inf if value > 0 else -math.inf
        if out != out:
            if reject_nan:
                raise FeatureError(Reason.NAN_VALUE, "value is NaN")
            return _NAN
        if not -_FLOAT32_MAX <= out <= _FLOAT32_MAX:
            if reject_inf:
                raise FeatureError(Reason.NON_FINITE, non_finite_message(value))
            return _NAN
        # the value as sent: an int is compared exactly, not as the nearest double
        if bounded and not low <= value <= high and reject_range:
            raise FeatureError(Reason.OUT_OF_RANGE, out_of_range_message(value, spec.min, spec.max))
        return out

    return convert


def _as_utc(value: Any) -> datetime:
    try:
        if isinstance(value, datetime):
            return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
        if isinstance(value, int) and not isinstance(value, bool):
            return datetime.fromtimestamp(value / 1000.0, tz=UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise FeatureError(
            Reason.NOT_TIMESTAMP, f"value {value!r} is no valid time: {exc}"
        ) from None
    raise FeatureError(Reason.NOT_TIMESTAMP, f"value {value!r} is not a timestamp")


def _hour(value: Any) -> float:
    return float(_as_utc(value).hour)


def _weekday(value: Any) -> float:
    return float(_as_utc(value).weekday())


def _category_index(categories: Sequence[str]) -> dict[str, float]:
    """Each category's feature value: its position in ``categories``."""
    return {c: float(i) for i, c in enumerate(categories)}


def _unseen(index: Mapping[str, float], value: Any) -> bool:
    """Whether a (non-null) value is none of the categories."""
    return not isinstance(value, str) or value not in index


def _category(categories: Sequence[str], policy: ValuePolicy) -> Callable[[Any], float]:
    index = _category_index(categories)
    reject = policy.unseen == DEAD_LETTER

    def convert(value: Any) -> float:
        if not _unseen(index, value):
            return index[value]
        if reject:
            raise FeatureError(Reason.UNSEEN_CATEGORY, unseen_message(value))
        return _NAN

    return convert


def _with_missing(convert: Callable[[Any], float], policy: ValuePolicy) -> Callable[[Any], float]:
    """Apply the missing-value policy before ``convert`` sees a value."""
    if policy.missing == DEAD_LETTER:

        def reject_missing(value: Any) -> float:
            if value is None:
                raise FeatureError(Reason.MISSING_VALUE, "value is missing (null or absent)")
            return convert(value)

        return reject_missing

    def pass_missing(value: Any) -> float:
        return _NAN if value is None else convert(value)

    return pass_missing


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
    policy = spec.effective_policy
    convert: Callable[[Any], float]
    if spec.transform == "number":
        convert = _number(spec, policy)
    elif spec.transform == "category":
        convert = _category(spec.categories, policy)
    elif spec.transform == "hour_of_day":
        convert = _hour
    else:
        convert = _weekday
    return _with_missing(convert, policy)


@dataclass(frozen=True)
class RejectedRow:
    """A row that cannot be scored: its index in the batch and why."""

    index: int
    feature: str
    reason: Reason
    message: str


class FeatureBuilder:
    """Builds the model's input matrix from decoded records."""

    def __init__(self, features: Sequence[FeatureSpec]) -> None:
        """Create a builder for ``features``, in the model's column order."""
        self.features = tuple(features)
        self._columns = [(s.name, field_getter(s.field), _converter(s)) for s in self.features]
        self._categories = [
            (s.name, field_getter(s.field), _category_index(s.categories))
            for s in self.features
            if s.transform == "category"
        ]

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

    def unseen(self, records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
        """How many of ``records`` hold an unseen value, per ``category`` feature with any.

        Every record counts, also one rejected for another feature (as ``FastColumns`` counts).
        """
        out: dict[str, int] = {}
        for name, get, index in self._categories:
            count = 0
            for record in records:
                value = get(record)
                if value is not None and _unseen(index, value):
                    count += 1
            if count:
                out[name] = count
        return out


#: The Avro types each transform reads (any one non-null branch of a union must be one).
TRANSFORM_TYPES: dict[str, frozenset[str]] = {
    "number": frozenset({"int", "long", "float", "double", "boolean"}),
    "category": frozenset({"string", "enum"}),
    "hour_of_day": frozenset({"int", "long"}),
    "day_of_week": frozenset({"int", "long"}),
}


def check_schema(features: Sequence[FeatureSpec], schema: Mapping[str, Any]) -> None:
    """Fail start-up when a feature's field is not in the input schema or has the wrong type.

    Every path is resolved (nested ones too) and at least one of its non-null types must be
    one the feature's transform reads (``TRANSFORM_TYPES``).

    Args:
        features: the manifest's features.
        schema: the parsed input record schema.

    Raises:
        SchemaError: naming the first feature whose field the schema lacks (with the nearest
            existing field) or cannot feed its transform.
    """
    for spec in features:
        try:
            types = resolve(schema, spec.field)
        except SchemaError as exc:
            raise SchemaError(f"feature {spec.name!r}: {exc}") from None
        wanted = TRANSFORM_TYPES[spec.transform]
        if not any(base_type(t) in wanted for t in types):
            found = " | ".join(type_name(t) for t in types) or "null"
            raise SchemaError(
                f"feature {spec.name!r}: field {spec.field!r} is {found}; the "
                f"{spec.transform!r} transform reads {', '.join(sorted(wanted))}"
            )
