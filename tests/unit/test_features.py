import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from support import parse_record_schema

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.errors import SchemaError
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


NESTED = parse_record_schema(
    {
        "type": "record",
        "name": "Event",
        "namespace": "t",
        "fields": [
            {"name": "id", "type": "string"},
            {"name": "amount", "type": ["null", "double"]},
            {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B"]}},
            {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {
                "name": "device",
                "type": {
                    "type": "record",
                    "name": "Device",
                    "fields": [
                        {"name": "model", "type": "string"},
                        {"name": "battery", "type": "float"},
                    ],
                },
            },
            {"name": "previous", "type": ["null", "Device"]},
        ],
    }
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (FeatureSpec("d", "distance"), "no field 'distance' .*fields there: amount, at"),
        (FeatureSpec("m", "device.modell", "category", ("x",)), "did you mean 'device.model'"),
        (FeatureSpec("m", "previous.batery"), "in 'previous'.*did you mean 'previous.battery'"),
        (FeatureSpec("m", "amount.value"), "'amount' is a double, not a record"),
        (FeatureSpec("m", "device.model"), "is string; the 'number' transform reads"),
        (FeatureSpec("k", "id", "hour_of_day"), "'id' is string; the 'hour_of_day'"),
        (FeatureSpec("k", "amount", "category", ("x",)), "'amount' is double; the 'category'"),
    ],
)
def test_check_schema_names_the_feature_the_path_and_the_nearest_field(
    spec: FeatureSpec, message: str
) -> None:
    with pytest.raises(SchemaError, match=f"feature '{spec.name}': .*{message}"):
        check_schema([spec], NESTED)


def test_check_schema_accepts_every_path_and_type_a_transform_reads() -> None:
    check_schema(
        [
            FeatureSpec("a", "amount"),
            FeatureSpec("k", "kind", "category", ("A",)),
            FeatureSpec("m", "device.model", "category", ("x",)),
            FeatureSpec("b", "previous.battery"),
            FeatureSpec("h", "at", "hour_of_day"),
            FeatureSpec("w", "at", "day_of_week"),
        ],
        NESTED,
    )
