"""Flow control (batch size, poison tolerance), split-and-retry scoring, delivery helpers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from confluent_kafka import KafkaError, KafkaException
from support import (
    PAYMENT_SCHEMA,
    Msg,
    avro,
    offset_of,
    parse_record_schema,
    payment_matrix,
    payments,
    read_record,
    train_payment_classifier,
)

from stream_scorer.errors import BrokerError, PoisonLimitError
from stream_scorer.stages.columns import AvroColumns
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.pipeline import Pipeline
from stream_scorer.stages.records import Stage
from stream_scorer.stages.score import Predictions, Scorer
from stream_scorer.worker.delivery import kafka_error
from stream_scorer.worker.flow import BatchSizer, PoisonGuard

PREDICTION_SCHEMA = Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc"


# --- BatchSizer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        # (records, seconds) per batch with max 1000 records and a 10 s bound (5 s budget)
        ([(1000, 0.5)], 1000),  # fast: stays at the maximum
        ([(1000, 20.0)], 250),  # 20 ms per record: 5 s allows 250
        ([(1000, 100.0)], 50),
        ([(1000, 20_000.0)], 1),  # never below one record
        ([(1000, 20.0), (250, 1.0)], 375),  # fast again: grows by half
        ([(1000, 20.0), (250, 1.0), (375, 1.0), (562, 1.0)], 843),
        ([(1000, 20.0), (100, 0.1)], 250),  # a short (partial) batch does not grow the size
        ([(1000, 20.0)] + [(1000, 0.1)] * 8, 1000),  # back to the maximum, never above
        ([(0, 50.0)], 1000),  # an empty batch tells nothing
    ],
)
def test_batch_size_adapts_to_processing_time(
    steps: list[tuple[int, float]], expected: int
) -> None:
    sizer = BatchSizer(1000, 10.0)
    for records, seconds in steps:
        sizer.observe(records, seconds)
    assert sizer.size == expected


# --- PoisonGuard --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ratio", "window", "consecutive", "outcomes", "raises"),
    [
        (0.0, 10, 0, [True] * 100, None),  # off by default
        (0.0, 10, 3, [True, True, False, True, True], None),
        (0.0, 10, 3, [True, True, True], "3 dead letters in a row"),
        (0.0, 10, 3, [False, True, True, True], "3 dead letters in a row"),
        (0.2, 10, 0, [True, True] + [False] * 8, None),  # 2 of 10 is not more than 20%
        (0.2, 10, 0, [True, True, True] + [False] * 7, "3 of the last 10"),
        (0.2, 10, 0, [True, True, True] + [False] * 6, None),  # window not full yet
        (0.2, 10, 0, [True] * 2 + [False] * 10 + [True] * 2, None),  # old ones slid out
        (0.2, 10, 0, [True] * 2 + [False] * 8 + [True] * 3, "3 of the last 10"),  # sliding
    ],
)
def test_poison_tolerance(
    ratio: float, window: int, consecutive: int, outcomes: list[bool], raises: str | None
) -> None:
    guard = PoisonGuard(ratio, window, consecutive)
    if raises is None:
        guard.observe(outcomes)
    else:
        with pytest.raises(PoisonLimitError, match=raises):
            guard.observe(outcomes)


def test_poison_tolerance_counts_across_batches() -> None:
    guard = PoisonGuard(0.0, 10, 4)
    guard.observe([False, True, True])
    with pytest.raises(PoisonLimitError):
        guard.observe([True, True])


# --- split and retry ----------------------------------------------------------------------
class FlakyModel:
    """Wraps a scorer; fails any batch holding a row whose amount is negative."""

    def __init__(self, scorer: Scorer, column: int) -> None:
        self._scorer = scorer
        self._column = column
        self.calls = 0

    @property
    def model_version(self) -> str:
        return self._scorer.model_version

    def predict(self, matrix: npt.NDArray[np.float32]) -> Predictions:
        self.calls += 1
        if (matrix[:, self._column] < 0).any():
            raise RuntimeError("model crashed on this batch")
        return self._scorer.predict(matrix)


class NaNModel(FlakyModel):
    """Returns NaN for rows whose amount is negative."""

    def predict(self, matrix: npt.NDArray[np.float32]) -> Predictions:
        out = self._scorer.predict(matrix)
        values = out.values.copy()
        values[matrix[:, self._column] < 0] = math.nan
        return Predictions(values, out.labels)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> Scorer:
    path = tmp_path_factory.mktemp("payments")
    train_payment_classifier(path)
    return Scorer(path)


def _pipeline(model: Any, scorer: Scorer) -> Pipeline:
    return Pipeline(
        AvroColumns(
            Decoder(parse_record_schema(PAYMENT_SCHEMA), 4096),
            FeatureBuilder(scorer.manifest.features),
            id_field="txn_id",
            event_time_field="at",
        ),
        model,
        PredictionEncoder(load_schema(PREDICTION_SCHEMA)),
    )


@pytest.mark.parametrize(
    ("size", "bad"),
    [(1, [0]), (16, [5]), (16, [0, 15]), (33, [3, 4, 20, 32]), (10, list(range(10))), (8, [])],
)
@pytest.mark.parametrize("model_kind", ["crash", "nan"])
def test_rows_the_model_fails_on_are_isolated_and_the_rest_scored(
    scorer: Scorer, size: int, bad: list[int], model_kind: str
) -> None:
    recs = payments(size, seed=size)
    for i in bad:
        recs[i] = dict(recs[i], amount=-5.0)
    column = scorer.manifest.feature_names.index("amount")
    model = (FlakyModel if model_kind == "crash" else NaNModel)(scorer, column)
    msgs = [Msg(avro(PAYMENT_SCHEMA, r), o=i) for i, r in enumerate(recs)]

    result = _pipeline(model, scorer).process(msgs)

    assert sorted(offset_of(d.message) for d in result.dead) == bad
    reason = "model_failed" if model_kind == "crash" else "non_finite_prediction"
    assert {(d.stage, d.reason) for d in result.dead} <= {(Stage.SCORE, reason)}
    good = [i for i in range(size) if i not in bad]
    assert [m.offset() for m in result.scored.messages] == good
    # the scored rows carry exactly the model's own values
    schema = load_schema(PREDICTION_SCHEMA)
    got = [read_record(schema, v)["prediction"] for v in result.scored.encoded]
    expected = (
        scorer.predict(payment_matrix([recs[i] for i in good])).values if good else np.empty(0)
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    if model_kind == "crash" and len(bad) == 1 and size > 1:
        # binary search: about 2·log2(n) calls, not one per record
        assert model.calls <= 2 * math.ceil(math.log2(size)) + 1


def test_kafka_error_is_found_behind_our_wrapping() -> None:
    inner = KafkaException(KafkaError(KafkaError._TIMED_OUT))
    try:
        try:
            raise inner
        except KafkaException as exc:
            raise BrokerError("cannot produce") from exc
    except BrokerError as wrapped:
        err = kafka_error(wrapped)
    assert err is not None and err.code() == KafkaError._TIMED_OUT
    assert kafka_error(ValueError("x")) is None


def test_exactly_once_with_no_broker_says_the_address_is_unreachable() -> None:
    """A real transactional producer, nothing listening: not a bare _TIMED_OUT after 60 s."""
    import logging
    import socket

    from confluent_kafka import Producer

    from stream_scorer.worker.delivery import ExactlyOnce
    from stream_scorer.worker.metrics import Metrics
    from stream_scorer.worker.offsets import OffsetTracker
    from stream_scorer.worker.sink import SinkContext

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        bootstrap = f"127.0.0.1:{sock.getsockname()[1]}"
    settings: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "transactional.id": "no-broker",
        "logger": logging.getLogger("librdkafka.producer"),
    }
    with pytest.raises(BrokerError) as info:
        ExactlyOnce(
            lambda: Producer(settings),
            SinkContext("out", "dlq", "g", "w", "v1"),
            None,  # type: ignore[arg-type]  # never reached: no transaction starts
            OffsetTracker(),
            Metrics(),
            timeout_s=60,
            bootstrap=bootstrap,
            unreachable_timeout_s=2,
        )
    message = str(info.value)
    assert message.startswith(f"no broker reachable at {bootstrap} for ")
    assert "(kafka.unreachable_timeout_s = 2)" in message
