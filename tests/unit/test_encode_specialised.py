"""The v1 prediction writer against fastavro's, byte for byte, on generated predictions."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_scorer.errors import SchemaError
from stream_scorer.fast.encode import write_v1_batch
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.encode import PredictionEncoder

SCHEMA = load_schema(Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc")
LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _pair() -> tuple[PredictionEncoder, PredictionEncoder]:
    fast = PredictionEncoder(SCHEMA, batch_writer=write_v1_batch)
    generic = PredictionEncoder(SCHEMA)
    generic.specialised = False  # fastavro's writer
    return fast, generic


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    input_id=st.text(max_size=80),
    prediction=st.floats(allow_nan=True, allow_infinity=True),
    label=st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
    version=st.text(max_size=40),
    event_time=LONGS,
    scored_at=LONGS,
)
def test_specialised_writer_matches_fastavro(
    input_id: str,
    prediction: float,
    label: int | None,
    version: str,
    event_time: int,
    scored_at: int,
) -> None:
    fast, generic = _pair()
    assert fast.specialised
    args = (input_id, prediction, label, version, event_time, scored_at)
    assert fast.encode(*args) == generic.encode(*args)


def test_model_version_change_is_not_served_from_the_cache() -> None:
    fast, generic = _pair()
    for version in ("v1", "v1", "version-two", "v1"):
        args = ("id", 1.5, 1, version, 10, 20)
        assert fast.encode(*args) == generic.encode(*args)


def test_an_evolved_schema_is_written_by_fastavro() -> None:
    evolved = copy.deepcopy(SCHEMA)
    evolved["fields"].append({"name": "note", "type": "string", "default": ""})
    enc = PredictionEncoder(evolved)
    assert not enc.specialised
    assert enc.encode("id", 1.0, None, "v", 1, 2).endswith(b"\x00")  # the default "" written


ROWS = st.lists(
    st.tuples(
        st.text(max_size=40) | st.text(min_size=120, max_size=300),
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(min_value=-(2**31), max_value=2**31 - 1),
        LONGS,
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rows=ROWS, with_labels=st.booleans(), version=st.text(max_size=40), scored_at=LONGS)
def test_batch_writer_matches_fastavro_row_by_row(
    rows: list[tuple[str, float, int, int]], with_labels: bool, version: str, scored_at: int
) -> None:
    fast, generic = _pair()
    ids = [r[0] for r in rows]
    values = np.array([r[1] for r in rows], dtype=np.float64)
    labels = np.array([r[2] for r in rows], dtype=np.int64) if with_labels else None
    times = [r[3] for r in rows]
    got = fast.encode_batch(ids, values, labels, version, times, scored_at)
    want = [
        generic.encode(i, v, (r[2] if with_labels else None), version, t, scored_at)
        for i, v, t, r in zip(ids, values.tolist(), times, rows, strict=True)
    ]
    assert got == want


@pytest.mark.parametrize(
    "ids",
    [
        ["a", "bb", ""],
        ["é", "日本語", "x"],  # UTF-8 byte lengths, not character counts
        ["x" * 100_000, "y"],  # a long id: its length takes three varint bytes
        [""],
    ],
)
def test_batch_writer_edge_ids(ids: list[str]) -> None:
    fast, generic = _pair()
    values = np.linspace(0, 1, len(ids))
    times = list(range(len(ids)))
    want = [
        generic.encode(i, v, None, "v", t, 5) for i, v, t in zip(ids, values, times, strict=True)
    ]
    assert fast.encode_batch(ids, values, None, "v", times, 5) == want
    assert fast.encode_batch([], np.array([]), None, "v", [], 5) == []


def test_batch_writer_refuses_an_event_time_beyond_64_bits() -> None:
    fast, _ = _pair()
    with pytest.raises(OverflowError):
        fast.encode_batch(["a"], np.array([0.5]), None, "v", [2**63], 1)


def test_batch_writer_refuses_a_scoring_time_beyond_64_bits() -> None:
    fast, _ = _pair()
    with pytest.raises(OverflowError):
        fast.encode_batch(["a"], np.array([0.5]), None, "v", [1], 2**64)


def test_without_a_batch_writer_a_batch_is_written_record_by_record() -> None:
    fast, _ = _pair()
    plain = PredictionEncoder(SCHEMA)  # the stage alone: no compiled writer handed in
    assert plain.specialised
    ids, values, labels, times = ["a", "é"], np.array([0.25, 1.0]), np.array([0, 1]), [1, 2]
    want = fast.encode_batch(ids, values, labels, "v", times, 9)
    assert plain.encode_batch(ids, values, labels, "v", times, 9) == want


def test_a_batch_writer_that_disagrees_with_the_reference_stops_start_up() -> None:
    def wrong(*args: object) -> list[bytes]:
        return [b"\x00"]

    with pytest.raises(SchemaError, match="batch prediction writer disagrees"):
        PredictionEncoder(SCHEMA, batch_writer=wrong)
