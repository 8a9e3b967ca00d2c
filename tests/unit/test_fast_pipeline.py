"""The pipeline with the fast path gives what it gives with the fastavro path."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import fastavro
import pytest
from support import (
    PAYMENT_SCHEMA,
    Msg,
    avro,
    parse_record_schema,
    payments,
    train_payment_classifier,
)

from stream_scorer.fast.encode import write_v1_batch
from stream_scorer.fast.path import build_fast_path
from stream_scorer.stages.columns import AvroColumns
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.pipeline import Pipeline
from stream_scorer.stages.score import Scorer

PREDICTION_SCHEMA = Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payments-fast")
    train_payment_classifier(path, threshold=0.4)
    return path


def _pipeline(model_dir: Path, *, fast: bool, timings: list[str]) -> Pipeline:
    scorer = Scorer(model_dir)
    schema = parse_record_schema(PAYMENT_SCHEMA)
    fast_path = build_fast_path(
        schema,
        scorer.manifest.features,
        id_field="txn_id",
        event_time_field="at",
        max_message_bytes=4096,
        enabled=fast,
    )
    assert (fast_path is not None) == fast
    return Pipeline(
        fast_path
        or AvroColumns(
            Decoder(schema, 4096),
            FeatureBuilder(scorer.manifest.features),
            id_field="txn_id",
            event_time_field="at",
        ),
        scorer,
        PredictionEncoder(load_schema(PREDICTION_SCHEMA), batch_writer=write_v1_batch),
        clock=lambda: 1_800_000_000.0,
        timer=lambda stage, _seconds: timings.append(stage),
    )


def _read(value: bytes) -> Any:
    schema = load_schema(PREDICTION_SCHEMA)
    return fastavro.schemaless_reader(io.BytesIO(value), schema, None)


def test_fast_and_fastavro_paths_publish_the_same_outputs(model_dir: Path) -> None:
    recs = payments(300, seed=5)
    msgs = [Msg(avro(PAYMENT_SCHEMA, r), o=i) for i, r in enumerate(recs)]
    msgs[3] = Msg(avro(PAYMENT_SCHEMA, dict(recs[3], amount=math.inf)), o=3)
    msgs[8] = Msg(b"\x00\x01", o=8)
    msgs[9] = Msg(None, o=9)
    msgs[11] = Msg(avro(PAYMENT_SCHEMA, recs[11]) + b"\x00", o=11)
    timings: list[str] = []
    fast = _pipeline(model_dir, fast=True, timings=timings).process(msgs)
    slow = _pipeline(model_dir, fast=False, timings=[]).process(msgs)
    assert [
        (m.offset(), _read(v))
        for m, v in zip(fast.scored.messages, fast.scored.encoded, strict=True)
    ] == [
        (m.offset(), _read(v))
        for m, v in zip(slow.scored.messages, slow.scored.encoded, strict=True)
    ]
    assert fast.scored.event_ms == slow.scored.event_ms
    assert len(fast.scored) == 296
    assert [(d.message.offset(), d.stage, d.reason) for d in fast.dead] == [
        (d.message.offset(), d.stage, d.reason) for d in slow.dead
    ]
    assert timings == ["decode", "features", "predict", "encode"]


@pytest.mark.parametrize("fast", [True, False])
def test_the_batch_result_counts_unseen_categories_per_feature(model_dir: Path, fast: bool) -> None:
    recs = payments(20, seed=6)
    for i in (2, 5, 7):
        recs[i]["country"] = "XX"  # not in the model's categories: scored with NaN
    recs[7]["amount"] = math.inf  # dead-lettered for another feature: still counted
    msgs = [Msg(avro(PAYMENT_SCHEMA, r), o=i) for i, r in enumerate(recs)]
    msgs[9] = Msg(b"\x00", o=9)  # not decoded: nothing to count
    result = _pipeline(model_dir, fast=fast, timings=[]).process(msgs)
    assert dict(result.unseen) == {"country": 3}
    assert [(d.message.offset(), d.reason) for d in result.dead] == [
        (9, "truncated"),
        (7, "non_finite"),
    ]
    assert len(result.scored) == 18
    clean = _pipeline(model_dir, fast=fast, timings=[]).process(msgs[:2])
    assert dict(clean.unseen) == {}
