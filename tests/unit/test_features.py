import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest

from stream_scorer.errors import SchemaError
from stream_scorer.model.manifest import FeatureSpec
from stream_scorer.stages.features import FeatureBuilder, check_schema

NAN = math.nan
TUESDAY_1430 = datetime(2026, 11, 24, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        (FeatureSpec("f", "v"), 3, 3.0),
        (FeatureSpec("f", "v"), 2.5, 2.5),
        (FeatureSpec("f", "v"), True, 1.0),
        (FeatureSpec("f", "v"), False, 0.0),
        (FeatureSpec("f", "v"), None, NAN),
        (FeatureSpec("f", "v"), NAN, NAN),
        (FeatureSpec("f", "v", "category", ("A", "B")), "B", 1.0),
        (FeatureSpec("f", "v", "category", ("A", "B")), "Z", NAN),
        (FeatureSpec("f", "v", "category", ("A", "B")), None, NAN),
        (FeatureSpec("f", "v", "hour_of_day"), TUESDAY_1430, 14.0),
        (FeatureSpec("f", "v", "hour_of_day"), int(TUESDAY_1430.timestamp() * 1000), 14.0),
        (
            FeatureSpec("f", "v", "hour_of_day"),
            TUESDAY_1430.astimezone(timezone(timedelta(hours=5))),
            14.0,
        ),
        (FeatureSpec("f", "v", "day_of_week"), TUESDAY_1430, 1.0),
        (FeatureSpec("f", "v", "day_of_week"), None, NAN),
    ],
)
def test_transform(spec: FeatureSpec, value: Any, expected: float) -> None:
    matrix, rejected = FeatureBuilder([spec]).build([{"v": value}])
    assert rejected == []
    assert matrix.dtype == np.float32
    got = float(matrix[0, 0])
    assert (math.isnan(got) and math.isnan(expected)) or got == expected


@pytest.mark.parametrize(
    ("spec", "value", "reason"),
    [
        (FeatureSpec("f", "v"), math.inf, "non_finite"),
        (FeatureSpec("f", "v"), -math.inf, "non_finite"),
        (FeatureSpec("f", "v"), "12", "not_numeric"),
        (FeatureSpec("f", "v", "hour_of_day"), "noon", "not_timestamp"),
    ],
)
def test_rejected_values(spec: FeatureSpec, value: Any, reason: str) -> None:
    _, rejected = FeatureBuilder([spec]).build([{"v": 1}, {"v": value}])
    assert [(r.index, r.feature, r.reason) for r in rejected] == [(1, "f", reason)]


def test_columns_follow_manifest_order_and_nested_fields() -> None:
    specs = [FeatureSpec("b", "outer.b"), FeatureSpec("a", "a"), FeatureSpec("m", "outer.missing")]
    matrix, _ = FeatureBuilder(specs).build([{"a": 1, "outer": {"b": 2}}, {"a": 3, "outer": None}])
    np.testing.assert_array_equal(matrix, [[2.0, 1.0, NAN], [NAN, 3.0, NAN]])


def test_check_schema_names_the_missing_field() -> None:
    with pytest.raises(SchemaError, match="'distance'"):
        check_schema([FeatureSpec("d", "distance")], {"id": "string"})
