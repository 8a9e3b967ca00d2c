"""Dead letters as records (``stream_scorer.letters``, ``worker/sink.py``): size, stripping,
signatures, and the words for a refused produce."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from support import Msg
from test_pipeline_sink import FakeProducer

from stream_scorer import headers as hdr
from stream_scorer.config import producer_settings
from stream_scorer.envelope import Protector
from stream_scorer.errors import AccessDeniedError, BrokerError, ConfigError
from stream_scorer.letters import SignatureError, Signer, canonical, framed_size
from stream_scorer.stages.records import DeadLetter, Reason, Scored, Stage
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.sink import Sink, SinkContext

LIMIT = 20_000
SECRET = b"s" * 32


def _publish(ctx: SinkContext, *letters: DeadLetter) -> tuple[FakeProducer, Metrics, list[Any]]:
    producer, tracker, metrics = FakeProducer(), OffsetTracker(), Metrics()
    Sink(producer, ctx, tracker, metrics).publish(
        Scored([], [], []), list(letters), tracker.track([d.message for d in letters])
    )
    return producer, metrics, tracker.take_committable()


def _too_large(value: bytes, hdrs: list[tuple[str, bytes | None]] | None = None) -> DeadLetter:
    msg = Msg(value, k=b"k1", t="in", p=1, o=41, hdrs=hdrs or [("trace", b"abc")])
    return DeadLetter(msg, Stage.DECODE, Reason.TOO_LARGE, "stream_scorer", "too large")


def _stripped(metrics: Metrics) -> float | None:
    labels = {"stage": "decode", "reason": "too_large"}
    return metrics.prometheus.get_sample_value("stream_scorer_dead_letters_stripped_total", labels)


@pytest.mark.parametrize("mode", ["keep", "encrypt"])
def test_a_record_too_large_for_the_dead_letter_topic_is_written_stripped_and_counted(
    mode: str,
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    public = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    protector = None if mode == "keep" else Protector("encrypt", public)
    ctx = SinkContext(
        "out", "dlq", "g", "w1", "v1", protector=protector, dead_letter_max_bytes=LIMIT
    )
    value = bytes(range(256)) * 100  # 25,600 bytes: more than the topic takes
    producer, metrics, committable = _publish(ctx, _too_large(value))
    [sent] = producer.sent
    h = sent["headers"]
    assert (sent["key"], sent["value"]) == (None, None)
    assert framed_size(None, None, list(h.items())) <= LIMIT
    assert h[hdr.PAYLOAD] == b"stripped"
    assert h[hdr.ORIGINAL_VALUE_SIZE] == b"25600"
    assert h[hdr.ORIGINAL_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert (h[hdr.CONNECT_TOPIC], h[hdr.CONNECT_PARTITION], h[hdr.CONNECT_OFFSET]) == (
        b"in",
        b"1",
        b"41",
    )
    assert (h[hdr.REASON], h["trace"], h[hdr.HEADERS_DROPPED]) == (b"too_large", b"abc", b"0")
    assert hdr.ENCRYPTION_WRAPPED_KEY not in h
    assert _stripped(metrics) == 1
    assert committable == [("in", 1, 42)]  # the partition goes on


def test_a_dead_letter_that_fits_keeps_its_payload_and_is_not_counted_as_stripped() -> None:
    ctx = SinkContext("out", "dlq", "g", "w1", "v1", dead_letter_max_bytes=LIMIT)
    value = b"v" * (LIMIT - 2000)
    producer, metrics, _ = _publish(ctx, _too_large(value))
    [sent] = producer.sent
    assert (sent["key"], sent["value"]) == (b"k1", value)
    assert hdr.PAYLOAD not in sent["headers"]
    assert _stripped(metrics) is None


def test_original_headers_are_kept_as_far_as_they_fit() -> None:
    ctx = SinkContext("out", "dlq", "g", "w1", "v1", dead_letter_max_bytes=LIMIT)
    big: list[tuple[str, bytes | None]] = [
        ("a", b"1"),
        ("huge", b"x" * LIMIT),
        ("b", b"2"),
        ("bigger", b"y" * 30_000),
    ]
    producer, _, _ = _publish(ctx, _too_large(b"small", big))
    [sent] = producer.sent
    h = sent["headers"]
    assert (h["a"], h["b"], h[hdr.HEADERS_DROPPED]) == (b"1", b"2", b"2")
    assert "huge" not in h and "bigger" not in h
    assert h[hdr.ORIGINAL_VALUE_SIZE] == b"5"
    assert framed_size(None, None, list(h.items())) <= LIMIT


def test_a_stripped_letter_of_payload_drop_reveals_nothing_of_the_value() -> None:
    ctx = SinkContext(
        "out", "dlq", "g", "w1", "v1", protector=Protector("drop"), dead_letter_max_bytes=LIMIT
    )
    producer, _, _ = _publish(ctx, _too_large(b"v", [("huge", b"x" * LIMIT)]))
    h = producer.sent[0]["headers"]
    assert h[hdr.PAYLOAD] == b"stripped" and hdr.ORIGINAL_VALUE_SHA256 not in h


def test_the_producer_takes_dead_letters_as_large_as_the_topic_and_batches_no_more(
    tmp_path: Path,
) -> None:
    from test_security_config import _config

    from stream_scorer.config import load_config

    cfg = load_config(_config(tmp_path), environ={})
    assert producer_settings(cfg, "w")["message.max.bytes"] == str(1_048_576 + 65_536)
    assert "batch.size" not in producer_settings(cfg, "w")
    assert producer_settings(cfg, "w", 5_000_000)["message.max.bytes"] == "5000000"
    assert producer_settings(cfg, "w", 2**31 - 1)["message.max.bytes"] == "1000000000"
    small = producer_settings(cfg, "w", 300_000)
    assert (small["message.max.bytes"], small["batch.size"]) == (str(1_048_576 + 65_536), "300000")


# --- signatures --------------------------------------------------------------------------------


def test_signed_dead_letters_verify_and_any_change_or_other_key_is_refused() -> None:
    signer = Signer(SECRET)
    ctx = SinkContext("out", "dlq", "g", "w1", "v1", signer=signer)
    msg = Msg(b"\x00\x01", k=b"k", t="in", p=0, o=7, hdrs=[("trace", b"abc")])
    dl = DeadLetter(msg, Stage.DECODE, Reason.TRUNCATED, "stream_scorer", "short")
    producer, _, _ = _publish(ctx, dl)
    [sent] = producer.sent
    headers = list(sent["headers"].items())
    assert sent["headers"][hdr.SIGNATURE].startswith(f"hmac-sha256/v1:{signer.key_id}:".encode())
    signer.verify(sent["key"], sent["value"], headers)  # as written: verifies

    def changed(name: str, value: bytes) -> list[tuple[str, bytes | None]]:
        return [(k, value if k == name else v) for k, v in headers]

    with pytest.raises(SignatureError, match="does not match"):
        signer.verify(sent["key"], b"\x00\x02", headers)  # another payload
    with pytest.raises(SignatureError, match="does not match"):
        signer.verify(b"other", sent["value"], headers)
    with pytest.raises(SignatureError, match="does not match"):
        signer.verify(sent["key"], sent["value"], changed(hdr.CONNECT_OFFSET, b"8"))
    with pytest.raises(SignatureError, match="does not match"):
        signer.verify(sent["key"], sent["value"], [*headers[:1], ("added", b"x"), *headers[1:]])
    with pytest.raises(SignatureError, match="not signed"):
        signer.verify(sent["key"], sent["value"], headers[:-1])
    with pytest.raises(SignatureError, match="signed with key id"):
        Signer(b"t" * 32).verify(sent["key"], sent["value"], headers)


def test_the_signed_bytes_tell_apart_what_concatenation_would_not() -> None:
    assert canonical(b"ab", b"c", []) != canonical(b"a", b"bc", [])
    assert canonical(None, b"", []) != canonical(b"", b"", [])
    assert canonical(None, None, [("ab", b"c")]) != canonical(None, None, [("a", b"bc")])


def test_a_signed_stripped_letter_still_fits() -> None:
    ctx = SinkContext(
        "out", "dlq", "g", "w1", "v1", signer=Signer(SECRET), dead_letter_max_bytes=LIMIT
    )
    producer, _, _ = _publish(ctx, _too_large(b"v" * LIMIT, [("huge", b"x" * (LIMIT - 3000))]))
    headers = list(producer.sent[0]["headers"].items())
    assert framed_size(None, None, headers) <= LIMIT
    Signer(SECRET).verify(None, None, headers)


def test_a_short_or_missing_signing_key_stops_start_up_naming_the_field(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 31 + b"\n")
    with pytest.raises(ConfigError, match=r"dead_letter\.signing_key: .* at least 32 bytes"):
        Signer.from_file(short, "dead_letter.signing_key")
    with pytest.raises(ConfigError, match="--signing-key: cannot read"):
        Signer.from_file(tmp_path / "absent.key", "--signing-key")
    good = tmp_path / "good.key"
    good.write_bytes(SECRET + b"\n")
    assert Signer.from_file(good, "x").key_id == Signer(SECRET).key_id


# --- a refused produce -------------------------------------------------------------------------


class RefusingProducer(FakeProducer):
    """The client already knows the principal may not write the dead-letter topic."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def produce(self, topic: str, value: Any = None, key: Any = None, **kw: Any) -> None:
        if topic == "dlq":
            raise KafkaException(KafkaError(self.code))
        super().produce(topic, value, key, **kw)


def test_a_produce_refused_for_want_of_an_acl_names_the_grant() -> None:
    ctx = SinkContext("out", "dlq", "g", "w1", "v1", principal="User:worker")
    tracker = OffsetTracker()
    sink = Sink(RefusingProducer(KafkaError.TOPIC_AUTHORIZATION_FAILED), ctx, tracker, Metrics())
    msg = Msg(b"\x00", t="in", p=0, o=3)
    dl = DeadLetter(msg, Stage.DECODE, Reason.TRUNCATED, "stream_scorer", "short")
    with pytest.raises(AccessDeniedError) as caught:
        sink.publish(Scored([], [], []), [dl], tracker.track([msg]))
    assert str(caught.value) == (
        "not authorized to write topic 'dlq' (TOPIC_AUTHORIZATION_FAILED): grant WRITE and "
        "DESCRIBE on topic 'dlq' to User:worker (stream-scorer acl grant --role worker)"
    )
    other = Sink(RefusingProducer(KafkaError._UNKNOWN_TOPIC), ctx, tracker, Metrics())
    with pytest.raises(BrokerError, match="cannot produce to dlq") as caught_other:
        other.publish(Scored([], [], []), [dl], tracker.track([msg]))
    assert not isinstance(caught_other.value, AccessDeniedError)
    assert tracker.take_committable() == []  # nothing committed past the refused record
