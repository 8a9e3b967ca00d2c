"""The Arrow column builder (``fast.arrow``): columns to cells and dead letters, as the stream.

Each case is checked against the table's expectation and against the fastavro path's
``FeatureBuilder`` on the same records as dicts (the stream's reference implementation).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.errors import SchemaError
from stream_scorer.example.rides import FEATURES, generate_columns, load_ride_schema, to_table
from stream_scorer.fast.arrow import ArrowColumns
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.records import Reason

SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "R",
    "fields": [
        {"name": "id", "type": "string"},
        {"name": "x", "type": ["null", "double"], "default": None},
        {"name": "n", "type": ["null", "long"], "default": None},
        {"name": "c", "type": ["null", "string"], "default": None},
        {"name": "t", "type": ["null", "long"], "default": None},
        {"name": "b", "type": ["null", "boolean"], "default": None},
        {
            "name": "s",
            "type": [
                "null",
                {"type": "record", "name": "S", "fields": [{"name": "v", "type": "double"}]},
            ],
            "default": None,
        },
    ],
}
DL = "dead_letter"
NAN = math.nan
T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC, a Tuesday

# (case, feature, Arrow column, expected per row: the cell, or the dead letter's reason)
CASES: list[tuple[str, FeatureSpec, pa.Array, list[float | Reason]]] = [
    (
        "number: values, null passed, NaN passed, inf and beyond float32 dead",
        FeatureSpec("x", "x", min=-1e39, max=1e39),
        pa.array([1.5, None, NAN, math.inf, 1e39], pa.float64()),
        [1.5, NAN, NAN, Reason.NON_FINITE, Reason.NON_FINITE],
    ),
    (
        "number: out of range dead by default, NaN dead by policy, null dead by policy",
        FeatureSpec("x", "x", min=0, max=10, policy={"nan": DL, "missing": DL}),
        pa.array([10.0, 10.5, -0.0, NAN, None], pa.float64()),
        [10.0, Reason.OUT_OF_RANGE, 0.0, Reason.NAN_VALUE, Reason.MISSING_VALUE],
    ),
    (
        "number: integers compared exactly, narrowed through a double",
        FeatureSpec("n", "n", max=2**53, policy={"infinite": "pass"}),
        pa.array([2**53, 2**53 + 1, 16_777_217, None], pa.int64()),
        [float(2**53), Reason.OUT_OF_RANGE, 16_777_216.0, NAN],
    ),
    (
        "number: out of range passed keeps the value; booleans are 0 and 1",
        FeatureSpec("b", "b", max=0, policy={"out_of_range": "pass"}),
        pa.array([True, False, None], pa.bool_()),
        [1.0, 0.0, NAN],
    ),
    (
        "category: positions, unseen passed as NaN, null missing",
        FeatureSpec("c", "c", "category", ("a", "b")),
        pa.array(["b", "a", "zzz", None], pa.string()),
        [1.0, 0.0, NAN, NAN],
    ),
    (
        "category: dictionary-encoded, unseen dead by policy",
        FeatureSpec("c", "c", "category", ("a", "b"), policy={"unseen": DL}),
        pa.array(["a", "q", "b", None]).dictionary_encode(),
        [0.0, Reason.UNSEEN_CATEGORY, 1.0, NAN],
    ),
    (
        "hour of day: timestamps of any unit, and epoch milliseconds",
        FeatureSpec("h", "t", "hour_of_day"),
        pa.array([T0, T0 + 3_600_000, -1, None], pa.int64()),
        [22.0, 23.0, 23.0, NAN],
    ),
    (
        "day of week: a time no datetime holds is not a timestamp",
        FeatureSpec("w", "t", "day_of_week"),
        pa.array([T0, 0, 253_402_300_800_000], pa.int64()),
        [1.0, 3.0, Reason.NOT_TIMESTAMP],
    ),
    (
        "nested field: a null parent makes the value missing",
        FeatureSpec("v", "s.v", policy={"missing": DL}),
        pa.array([{"v": 2.0}, None, {"v": None}], pa.struct([("v", pa.float64())])),
        [2.0, Reason.MISSING_VALUE, Reason.MISSING_VALUE],
    ),
]


def _batch(path: str, column: pa.Array) -> pa.RecordBatch:
    top = path.split(".")[0]
    ids = pa.array([f"r{i}" for i in range(len(column))])
    return pa.RecordBatch.from_arrays([ids, column], names=["id", top])


def _cells(built: Any, n: int) -> list[float | Reason]:
    out: list[float | Reason] = [0.0] * n
    for d in built.dead:
        out[d.message.offset()] = d.reason
    for row, cell in zip(built.keep.tolist(), built.matrix[:, 0].tolist(), strict=True):
        out[row] = cell
    return out


def _same(got: list[float | Reason], want: list[float | Reason]) -> bool:
    return all(
        (isinstance(w, float) and isinstance(g, float) and (g == w or (g != g and w != w)))
        or g == w
        for g, w in zip(got, want, strict=True)
    )


@pytest.mark.parametrize(("case", "spec", "column", "want"), CASES, ids=[c[0] for c in CASES])
def test_arrow_cells_and_dead_letters(
    case: str, spec: FeatureSpec, column: pa.Array, want: list[float | Reason]
) -> None:
    batch = _batch(spec.field, column)
    builder = ArrowColumns(SCHEMA, [spec], id_field="id")
    builder.check(batch.schema, "t.parquet")
    built = builder.run(batch, "t.parquet")
    got = _cells(built, len(column))
    assert _same(got, want), (case, got, want)
    # the fastavro path on the same records agrees, cell for cell and reason for reason
    records = batch.to_pylist()
    matrix, rejected = FeatureBuilder([spec]).build(records)
    reference: list[float | Reason] = [float(v) for v in matrix[:, 0].tolist()]
    for r in rejected:
        reference[r.index] = r.reason
    assert _same(got, reference), (case, got, reference)


def test_timestamp_columns_of_any_unit_give_the_same_hour() -> None:
    spec = FeatureSpec("h", "t", "hour_of_day")
    builder = ArrowColumns(SCHEMA, [spec], id_field="id")
    for unit, scale in (("s", 1000), ("ms", 1), ("us", 1 / 1000), ("ns", 1 / 1_000_000)):
        raw = int((T0 + 3_599_999) / scale) if unit != "s" else (T0 + 3_599_999) // 1000
        column = pa.array([raw], pa.int64()).cast(pa.timestamp(unit, tz="UTC"))
        built = builder.run(_batch("t", column))
        assert built.matrix[0, 0] == 23.0, unit  # 23:13:19.999


def test_unseen_counted_per_category_feature_and_ids_as_text() -> None:
    spec = FeatureSpec("c", "c", "category", ("a",))
    builder = ArrowColumns(SCHEMA, [spec], id_field="n")
    batch = pa.RecordBatch.from_arrays(
        [pa.array([7, None, 9], pa.int64()), pa.array(["a", "b", "c"])], names=["n", "c"]
    )
    built = builder.run(batch)
    assert built.unseen == {"c": 2}
    assert built.ids.to_pylist() == ["7", "", "9"]


def test_a_missing_column_is_its_default_or_refused_naming_the_field() -> None:
    spec = FeatureSpec("x", "x", policy={"missing": DL})
    builder = ArrowColumns(SCHEMA, [spec], id_field="id")
    only_ids = pa.RecordBatch.from_arrays([pa.array(["a", "b"])], names=["id"])
    builder.check(only_ids.schema, "f.parquet")  # x defaults to null: every value missing
    built = builder.run(only_ids, "f.parquet")
    assert [d.reason for d in built.dead] == [Reason.MISSING_VALUE] * 2
    with pytest.raises(SchemaError, match=r"input.id_field: field 'id' is not a column of g"):
        builder.check(pa.schema([("x", pa.float64())]), "g")
    wrong = pa.schema([("id", pa.string()), ("x", pa.string())])
    with pytest.raises(SchemaError, match=r"feature 'x': column 'x' of h is string"):
        builder.check(wrong, "h")


def test_rides_as_columns_match_the_stream_feature_builder() -> None:
    table = to_table(generate_columns(2000, seed=5))
    # unusual values the example's policies dead-letter or pass
    cols = table.to_pydict()
    cols["distance_km"][:4] = [math.inf, NAN, None, 2000.0]
    cols["passenger_count"][4] = 12
    cols["vehicle_type"][5] = "BOAT"
    cols["surge_multiplier"][6] = None
    table = pa.Table.from_pydict(cols, schema=table.schema)
    batch = table.to_batches()[0]
    builder = ArrowColumns(load_ride_schema(), FEATURES, id_field="ride_id")
    builder.check(table.schema, "rides")
    built = builder.run(batch, "rides")
    records = batch.to_pylist()
    matrix, rejected = FeatureBuilder(FEATURES).build(records)
    assert [(d.message.offset(), d.reason) for d in built.dead] == [
        (r.index, r.reason) for r in rejected
    ]
    keep = [i for i in range(len(records)) if i not in {r.index for r in rejected}]
    assert built.keep.tolist() == keep
    np.testing.assert_array_equal(built.matrix, matrix[keep])  # NaN where NaN, bit for bit
    assert built.unseen == {"vehicle_type": 1}
