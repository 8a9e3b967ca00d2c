import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
from support import (
    PAYMENT_SCHEMA,
    Msg,
    avro,
    parse_record_schema,
    payment_matrix,
    payments,
    read_record,
    train_payment_classifier,
)

from stream_scorer import headers as hdr
from stream_scorer.errors import DeliveryError
from stream_scorer.stages.columns import AvroColumns
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.features import FeatureBuilder
from stream_scorer.stages.pipeline import Pipeline
from stream_scorer.stages.records import DeadLetter, Message, Reason, Scored, Stage
from stream_scorer.stages.score import Scorer
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.sink import Sink, SinkContext

PREDICTION_SCHEMA = Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("payments")
    train_payment_classifier(path, threshold=0.4)
    return path


def _pipeline(model_dir: Path, timer: Any = None) -> Pipeline:
    scorer = Scorer(model_dir)
    kwargs = {"timer": timer} if timer else {}
    return Pipeline(
        AvroColumns(
            Decoder(parse_record_schema(PAYMENT_SCHEMA), 4096),
            FeatureBuilder(scorer.manifest.features),
            id_field="txn_id",
            event_time_field="at",
        ),
        scorer,
        PredictionEncoder(load_schema(PREDICTION_SCHEMA)),
        clock=lambda: 1_800_000_000.0,
        **kwargs,
    )


def test_batch_with_bad_records_scores_the_rest_exactly_like_xgboost(model_dir: Path) -> None:
    recs = payments(20, seed=11)
    inf = dict(recs[4], amount=math.inf)
    msgs = [Msg(avro(PAYMENT_SCHEMA, r), o=i) for i, r in enumerate(recs)]
    msgs[4] = Msg(avro(PAYMENT_SCHEMA, inf), o=4)
    msgs[7] = Msg(b"\x00\x01", o=7)
    stages: list[str] = []
    result = _pipeline(model_dir, lambda s, _t: stages.append(s)).process(msgs)

    assert stages == ["decode", "features", "predict", "encode"]
    assert sorted((d.message.offset(), d.stage, d.reason) for d in result.dead) == [
        (4, Stage.FEATURES, "non_finite"),
        (7, Stage.DECODE, "truncated"),
    ]
    good = [r for i, r in enumerate(recs) if i not in (4, 7)]
    assert [m.offset() for m in result.scored.messages] == [i for i in range(20) if i not in (4, 7)]
    expected = xgb.Booster(model_file=str(model_dir / "model.ubj")).inplace_predict(
        payment_matrix(good)
    )
    schema = load_schema(PREDICTION_SCHEMA)
    decoded = [read_record(schema, v) for v in result.scored.encoded]
    np.testing.assert_allclose([d["prediction"] for d in decoded], expected, rtol=1e-6)
    assert [d["label"] for d in decoded] == [int(p >= 0.4) for p in expected]
    assert [d["input_id"] for d in decoded] == [r["txn_id"] for r in good]
    assert [int(d["event_time"].timestamp() * 1000) for d in decoded] == [r["at"] for r in good]
    assert result.scored.event_ms == [r["at"] for r in good]
    assert {int(d["scored_at"].timestamp()) for d in decoded} == {1_800_000_000}
    assert {d["model_version"] for d in decoded} == {"test-model-1"}


class FakeProducer:
    """A plain producer object: records calls, delivers on poll/flush."""

    def __init__(self, fail_topic: str | None = None, full_times: int = 0) -> None:
        self.sent: list[dict[str, Any]] = []
        self.pending: list[Any] = []
        self.fail_topic = fail_topic
        self.full_times = full_times

    def produce(
        self,
        topic: str,
        value: Any = None,
        key: Any = None,
        *,
        on_delivery: Any = None,
        headers: Any = None,
    ) -> None:
        if self.full_times:
            self.full_times -= 1
            raise BufferError("queue full")
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": dict(headers)})
        err = "boom" if topic == self.fail_topic else None
        self.pending.append((on_delivery, err, Msg(value, t=topic, o=len(self.sent) - 1)))

    def poll(self, timeout: float = 0) -> int:
        done, self.pending = self.pending, []
        for callback, err, msg in done:
            callback(err, msg)
        return len(done)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0


CTX = SinkContext("out", "dlq", "grp", "w1", "v9")


def test_dead_letter_keeps_bytes_and_carries_context_headers() -> None:
    producer, tracker, metrics = FakeProducer(), OffsetTracker(), Metrics()
    msg = Msg(b"\xde\xad", k=b"k1", t="in", p=2, o=17, ts=123, hdrs=[("trace", b"abc")])
    ticket = tracker.track([msg])
    Sink(producer, CTX, tracker, metrics).publish(
        Scored([], [], []),
        [DeadLetter(msg, Stage.DECODE, Reason.TRUNCATED, "EOFError", "short")],
        ticket,
    )
    [sent] = producer.sent
    assert (sent["topic"], sent["value"], sent["key"]) == ("dlq", b"\xde\xad", b"k1")
    h = sent["headers"]
    assert h["trace"] == b"abc"
    assert h[hdr.CONNECT_TOPIC] == b"in"
    assert h[hdr.CONNECT_PARTITION] == b"2"
    assert h[hdr.CONNECT_OFFSET] == b"17"
    assert h[hdr.CONNECT_STAGE] == b"decode"
    assert h[hdr.CONNECT_EXCEPTION_CLASS] == b"EOFError"
    assert h[hdr.CONNECT_EXCEPTION_MESSAGE] == b"short"
    assert h[hdr.REASON] == b"truncated"
    assert h[hdr.ORIGINAL_TIMESTAMP] == b"123"
    assert h[hdr.CONSUMER_GROUP] == b"grp"
    assert h[hdr.WORKER_ID] == b"w1"
    assert tracker.take_committable() == [("in", 2, 18)]  # acked on delivery
    assert (
        metrics.prometheus.get_sample_value(
            "stream_scorer_dead_letters_total", {"stage": "decode", "reason": "truncated"}
        )
        == 1
    )


@pytest.mark.parametrize(
    ("copy", "expected"),
    [
        (frozenset(), {}),
        (frozenset({"traceparent"}), {"traceparent": b"00-abc-01"}),
        (
            frozenset({"traceparent", "tenant", "absent"}),
            {"traceparent": b"00-abc-01", "tenant": None},
        ),
    ],
)
def test_predictions_carry_the_chosen_input_headers(
    copy: frozenset[str], expected: dict[str, bytes | None]
) -> None:
    producer, tracker = FakeProducer(), OffsetTracker()
    original = [("traceparent", b"00-abc-01"), ("tenant", None), ("secret", b"x")]
    msg = Msg(b"v", t="in", p=1, o=5, hdrs=original)
    ctx = SinkContext("out", "dlq", "grp", "w1", "v9", copy_headers=copy)
    Sink(producer, ctx, tracker, Metrics()).publish(
        Scored([msg], [b"pred"], [1]), [], tracker.track([msg])
    )
    [sent] = producer.sent
    own = {hdr.MODEL_VERSION, hdr.SOURCE_TOPIC, hdr.SOURCE_PARTITION, hdr.SOURCE_OFFSET}
    assert set(sent["headers"]) - own == set(expected)
    assert {k: sent["headers"][k] for k in expected} == expected


def test_failed_delivery_is_raised_by_the_loop_not_the_callback_and_blocks_commit() -> None:
    producer, tracker = FakeProducer(fail_topic="out"), OffsetTracker()
    msgs: list[Message] = [Msg(b"x", o=4), Msg(b"x", o=5)]
    ticket = tracker.track(msgs)
    sink = Sink(producer, CTX, tracker, Metrics())
    scored = Scored(msgs, [b"pred-4", b"pred-5"], [0, 0])
    sink.publish(scored, [], ticket)  # callbacks run inside poll: no raise
    assert tracker.take_committable() == []
    with pytest.raises(DeliveryError, match=r"prediction to topic 'out'.*\[in\[0\]@4\]") as info:
        sink.raise_errors()
    assert "1 more deliveries failed" in str(info.value.__notes__)


def test_a_refused_dead_letter_holds_back_only_its_own_partition() -> None:
    producer, tracker = FakeProducer(fail_topic="dlq"), OffsetTracker()
    good: list[Message] = [Msg(b"x", p=0, o=0), Msg(b"x", p=1, o=0), Msg(b"x", p=0, o=1)]
    bad = Msg(b"y", p=1, o=1)
    ticket = tracker.track([*good, bad])
    sink = Sink(producer, CTX, tracker, Metrics())
    dead = [DeadLetter(bad, Stage.DECODE, Reason.TRUNCATED, "EOFError", "short")]
    sink.publish(Scored(good, [b"a", b"b", b"c"], [0, 0, 0]), dead, ticket)
    assert tracker.take_committable() == [("in", 0, 2)]
    assert tracker.pending == 2  # partition 1's two records
    with pytest.raises(DeliveryError, match=r"dead letter to topic 'dlq'.*\[in\[1\]@1\]"):
        sink.raise_errors()
    headers = [sent["headers"] for sent in producer.sent if sent["topic"] == "out"]
    assert [h[hdr.SOURCE_PARTITION] for h in headers] == [b"0", b"1", b"0"]
    assert [h[hdr.SOURCE_OFFSET] for h in headers] == [b"0", b"0", b"1"]


def test_full_queue_is_retried() -> None:
    producer, tracker = FakeProducer(full_times=3), OffsetTracker()
    msg = Msg(b"x")
    ticket = tracker.track([msg])
    Sink(producer, CTX, tracker, Metrics()).publish(Scored([msg], [b"pred"], [0]), [], ticket)
    assert len(producer.sent) == 1
    assert producer.sent[0]["headers"][hdr.MODEL_VERSION] == b"v9"
    assert tracker.take_committable() == [("in", 0, 1)]


class HeldProducer(FakeProducer):
    """Acknowledges nothing until ``release`` (a backed-up broker)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = True

    def poll(self, timeout: float = 0) -> int:
        return 0 if self.held else super().poll(timeout)


class RecordingSource:
    """The parts of ``Source`` the at-least-once delivery uses, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.stored: list[tuple[str, int, int]] = []
        self.committed: list[Any] = []

    def store(self, offsets: list[tuple[str, int, int]]) -> None:
        self.stored.extend(offsets)

    def commit(self, offsets: Any = None) -> None:
        self.committed.append(offsets)

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def test_backed_up_producer_pauses_the_input_until_half_is_acknowledged() -> None:
    from stream_scorer.stages.pipeline import BatchResult
    from stream_scorer.worker.delivery import AtLeastOnce

    producer, tracker, source = HeldProducer(), OffsetTracker(), RecordingSource()
    delivery = AtLeastOnce(
        Sink(producer, CTX, tracker, Metrics()),
        source,  # type: ignore[arg-type]
        tracker,
        max_in_flight=10,
        flush_timeout_s=1,
    )
    first: list[Message] = [Msg(b"x", o=o) for o in range(9)]
    delivery.deliver(tracker.track(first), BatchResult(Scored(first, [b"p"] * 9, [0] * 9), []))
    delivery.service()
    assert source.calls == []  # 9 in flight: below the limit
    second: list[Message] = [Msg(b"x", o=9)]
    delivery.deliver(tracker.track(second), BatchResult(Scored(second, [b"p"], [0]), []))
    delivery.service()
    assert (source.calls, delivery.paused) == (["pause"], True)
    delivery.service()
    assert source.calls == ["pause"]  # still backed up: no flapping
    producer.held = False
    delivery.service()  # everything acknowledged
    assert (source.calls, delivery.paused) == (["pause", "resume"], False)
    assert source.stored == [("in", 0, 10)]


def test_revoke_commits_what_is_delivered_and_lost_commits_nothing() -> None:
    from stream_scorer.stages.pipeline import BatchResult
    from stream_scorer.worker.delivery import AtLeastOnce

    producer, tracker, source = FakeProducer(), OffsetTracker(), RecordingSource()
    delivery = AtLeastOnce(
        Sink(producer, CTX, tracker, Metrics()),
        source,  # type: ignore[arg-type]
        tracker,
        max_in_flight=100,
        flush_timeout_s=1,
    )
    msgs: list[Message] = [Msg(b"x", p=p, o=o) for p in (0, 1) for o in range(3)]
    ticket = tracker.track(msgs)
    delivery.deliver(ticket, BatchResult(Scored(msgs, [b"p"] * 6, [0] * 6), []))
    delivery.on_lost([("in", 1)])
    delivery.on_revoke([("in", 0)])  # flushes, then commits partition 0's watermark
    assert source.committed == [[("in", 0, 3)]]
    assert tracker.committable([("in", 1)]) == []  # forgotten, never committed


def test_revoke_after_drain_commits_nothing_more() -> None:
    from stream_scorer.stages.pipeline import BatchResult
    from stream_scorer.worker.delivery import AtLeastOnce

    producer, tracker, source = HeldProducer(), OffsetTracker(), RecordingSource()
    delivery = AtLeastOnce(
        Sink(producer, CTX, tracker, Metrics()),
        source,  # type: ignore[arg-type]
        tracker,
        max_in_flight=100,
        flush_timeout_s=0,
    )
    msgs: list[Message] = [Msg(b"x", o=o) for o in range(3)]
    delivery.deliver(tracker.track(msgs), BatchResult(Scored(msgs, [b"p"] * 3, [0] * 3), []))
    assert delivery.drain() == 0  # HeldProducer.flush reports nothing left, but acked nothing
    assert source.committed == [None]  # drain's commit of every stored offset
    producer.held = False  # the outputs are acknowledged while the consumer closes
    delivery.on_revoke([("in", 0)])  # close() revokes: no second flush, no second commit
    assert source.committed == [None]
    assert tracker.pending == 0  # the partition is forgotten


@pytest.mark.parametrize("mode", ["drop", "encrypt"])
def test_protected_dead_letters_carry_neither_the_payload_nor_the_error_details(
    mode: str,
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from stream_scorer.envelope import Protector

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    protector = Protector("drop") if mode == "drop" else Protector("encrypt", public)
    ctx = SinkContext("out", "dlq", "grp", "w1", "v9", protector=protector)
    producer, tracker = FakeProducer(), OffsetTracker()
    msg = Msg(b"SECRET-VALUE", k=b"SECRET-KEY", t="in", p=0, o=3, hdrs=[("trace", b"abc")])
    detail = "country: unseen category 'SECRET-FIELD'"
    Sink(producer, ctx, tracker, Metrics()).publish(
        Scored([], [], []),
        [DeadLetter(msg, Stage.FEATURES, Reason.UNSEEN_CATEGORY, "FeatureError", detail)],
        tracker.track([msg]),
    )
    [sent] = producer.sent
    h = sent["headers"]
    assert sent["key"] is None
    assert b"SECRET" not in (sent["value"] or b"")
    assert all(b"SECRET" not in (v or b"") for v in h.values())
    assert h[hdr.CONNECT_EXCEPTION_MESSAGE] == f"withheld (dead_letter.payload = {mode})".encode()
    assert (h["trace"], h[hdr.CONNECT_OFFSET], h[hdr.REASON]) == (b"abc", b"3", b"unseen_category")
    assert h[hdr.PAYLOAD] == (b"dropped" if mode == "drop" else b"encrypted")
    assert tracker.take_committable() == [("in", 0, 4)]
