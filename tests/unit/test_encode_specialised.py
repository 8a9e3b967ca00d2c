"""The v1 prediction writer against fastavro's, byte for byte, on generated predictions."""

from __future__ import annotations

import copy
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from stream_scorer.decode import load_schema
from stream_scorer.encode import PredictionEncoder

SCHEMA = load_schema(Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc")
LONGS = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _pair() -> tuple[PredictionEncoder, PredictionEncoder]:
    fast, generic = PredictionEncoder(SCHEMA), PredictionEncoder(SCHEMA)
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
