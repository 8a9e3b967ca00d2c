import struct
from typing import Any

import pytest
from support import PAYMENT_SCHEMA, Msg, avro, parse_record_schema, payments

from stream_scorer.stages import decode
from stream_scorer.stages.decode import DECODE_REASONS, Decoder
from stream_scorer.stages.records import DeadLetter, Decoded, Reason, Stage, not_avro_hint

SCHEMA = parse_record_schema(PAYMENT_SCHEMA)
GOOD = payments(1)[0]
GOOD_BYTES = avro(PAYMENT_SCHEMA, GOOD)


def v(n: int) -> bytes:
    """Avro's zigzag varint of ``n``."""
    u = n << 1 if n >= 0 else ((-n) << 1) - 1
    out = bytearray()
    while u >= 0x80:
        out.append((u & 0x7F) | 0x80)
        u >>= 7
    out.append(u)
    return bytes(out)


def payment(**parts: bytes) -> bytes:
    """A payment built field by field; ``parts`` replace a field's encoded bytes."""
    fields: dict[str, bytes] = {
        "txn_id": v(3) + b"t-1",
        "amount": struct.pack("<f", 12.5),
        "card_present": b"\x01",
        "country": v(2) + b"DE",
        "channel": v(1),
        "at": v(1_763_900_000_000),
        "customer": v(1) + v(40) + v(100),  # age: branch 1 (int) 40; tenure_days 100
    }
    unknown = set(parts) - set(fields)
    assert not unknown, unknown
    return b"".join(parts.get(k, b) for k, b in fields.items())


def _invalid_utf8() -> bytes:
    # txn_id is the first field: zigzag length, then its bytes; swap them for invalid UTF-8
    length = len(GOOD["txn_id"].encode())
    return GOOD_BYTES[:1] + b"\xff" * length + GOOD_BYTES[1 + length :]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "null_value"),
        (b"", "empty"),
        (b"x" * 2049, "too_large"),
        (GOOD_BYTES[: len(GOOD_BYTES) // 2], "truncated"),
        (GOOD_BYTES[:1], "truncated"),
        (GOOD_BYTES + b"\x00", "trailing_bytes"),
        (_invalid_utf8(), "invalid_utf8"),
        (b"\x7f" + GOOD_BYTES[1:], "negative_length"),  # txn_id length -64
        (payment(txn_id=v(-1)), "negative_length"),
        (payment(txn_id=v(5000) + b"t-1"), "truncated"),
        (payment(at=b"\x80" * 10 + b"\x01"), "varint_too_long"),
        (payment(channel=v(3)), "bad_enum_index"),
        (payment(channel=v(-1)), "bad_enum_index"),
        (payment(customer=v(2) + v(40) + v(100)), "bad_union_index"),
        (payment(customer=v(-1) + v(40) + v(100)), "bad_union_index"),
        (payment(customer=v(1) + v(2**31) + v(100)), "int_out_of_range"),
        (payment(card_present=b"\x07"), "malformed_avro"),
        # the guard passes these; fastavro cannot build a datetime past year 9999
        (payment(at=v(1_763_900_000_000_000)), "malformed_avro"),
    ],
)
def test_bad_values_become_dead_letters(value: bytes | None, reason: str) -> None:
    out = Decoder(SCHEMA, max_message_bytes=2048).decode(Msg(value, p=3, o=42))
    assert isinstance(out, DeadLetter)
    assert out.stage is Stage.DECODE
    assert out.reason == reason
    assert out.reason in DECODE_REASONS
    assert out.message.value() == value  # original bytes kept
    assert out.error_message


def test_hand_built_payment_decodes() -> None:
    out = Decoder(SCHEMA, 2048).decode(Msg(payment()))
    assert isinstance(out, Decoded)
    assert out.record["txn_id"] == "t-1"
    assert out.record["channel"] == "POS"
    assert out.record["customer"] == {"age": 40, "tenure_days": 100}


def test_a_failure_after_the_guard_names_fastavros_exception() -> None:
    out = Decoder(SCHEMA, 2048).decode(Msg(payment(at=v(1_763_900_000_000_000))))
    assert isinstance(out, DeadLetter)
    assert (out.reason, out.error_type) == ("malformed_avro", "OverflowError")


def test_guard_refusals_are_typed_as_our_own_guard() -> None:
    out = Decoder(SCHEMA, 2048).decode(Msg(payment(channel=v(9))))
    assert isinstance(out, DeadLetter)
    assert out.error_type == "stream_scorer"
    assert "enum index 9" in out.error_message


def test_even_a_failing_guard_gives_a_dead_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = Decoder(SCHEMA, 2048)

    def boom(payload: bytes) -> Any:
        raise RuntimeError("guard bug")

    monkeypatch.setattr(decoder._guard, "check", boom)
    out = decoder.decode(Msg(GOOD_BYTES))
    assert isinstance(out, DeadLetter)
    assert (out.reason, out.error_type, out.error_message) == (
        "malformed_avro",
        "RuntimeError",
        "guard bug",
    )


def test_zero_size_item_cap_reaches_the_guard() -> None:
    schema = parse_record_schema(
        {
            "type": "record",
            "name": "N",
            "fields": [{"name": "n", "type": {"type": "array", "items": "null"}}],
        }
    )
    payload = v(300) + v(0)
    assert isinstance(Decoder(schema, 2048).decode(Msg(payload)), Decoded)
    out = Decoder(schema, 2048, max_zero_size_items=299).decode(Msg(payload))
    assert isinstance(out, DeadLetter) and out.reason == "count_too_large"


def test_reason_codes_are_the_documented_set() -> None:
    assert set(DECODE_REASONS) == {
        "null_value",
        "empty",
        "too_large",
        "truncated",
        "varint_too_long",
        "int_out_of_range",
        "negative_length",
        "bad_enum_index",
        "bad_union_index",
        "count_too_large",
        "invalid_utf8",
        "trailing_bytes",
        "malformed_avro",
        "bad_magic_byte",
        "short_frame",
        "unknown_schema_id",
        "schema_mismatch",
    }
    assert decode.DECODE_REASONS is DECODE_REASONS


def test_valid_record_decodes_to_the_written_values() -> None:
    out = Decoder(SCHEMA, max_message_bytes=2048).decode(Msg(GOOD_BYTES))
    assert isinstance(out, Decoded)
    assert out.record["txn_id"] == GOOD["txn_id"]
    assert out.record["customer"] == GOOD["customer"]
    assert int(out.record["at"].timestamp() * 1000) == GOOD["at"]


def test_batch_splits_good_and_bad_keeping_every_record() -> None:
    msgs = [Msg(GOOD_BYTES, o=0), Msg(b"", o=1), Msg(GOOD_BYTES, o=2), Msg(GOOD_BYTES + b"!", o=3)]
    good, dead = Decoder(SCHEMA, 2048).decode_batch(msgs)
    assert [d.message.offset() for d in good] == [0, 2]
    assert [(d.message.offset(), d.reason) for d in dead] == [(1, "empty"), (3, "trailing_bytes")]


_HINT = "the value does not look like Avro of schema"


@pytest.mark.parametrize(
    ("value", "reason", "says"),
    [
        (b'{"ride_id": "r1", "fare": 3.5}', Reason.NEGATIVE_LENGTH, "it starts like JSON"),
        (b'  [{"a": 1}]', Reason.TRUNCATED, "it starts like JSON"),
        (
            b"\x00\x00\x00\x00\x07\x02ab",
            Reason.TRAILING_BYTES,
            "it starts like a Confluent frame (magic byte 0, schema id 7)",
        ),
        (b"\x9a\x11random bytes", Reason.NEGATIVE_LENGTH, None),  # no guess: no hint
        (b"\x00\x00\x01", Reason.TRUNCATED, None),  # too short for a frame and a body
        (b'{"too": "large"}', Reason.TOO_LARGE, None),
        (None, Reason.NULL_VALUE, None),
    ],
)
def test_a_value_that_looks_like_json_or_a_frame_gets_a_hint(
    value: bytes | None, reason: Reason, says: str | None
) -> None:
    hint = not_avro_hint(value, "RideRequest", reason)
    if says is None:
        assert hint == ""
    else:
        assert hint.startswith(f"; {_HINT} RideRequest: {says}; is the producer writing JSON")


@pytest.mark.parametrize("fast", [True, False])
def test_json_and_framed_values_are_dead_lettered_with_the_hint_on_both_paths(fast: bool) -> None:
    from stream_scorer.example.rides import FEATURES, load_ride_schema
    from stream_scorer.fast.path import build_fast_path
    from stream_scorer.stages.columns import AvroColumns
    from stream_scorer.stages.features import FeatureBuilder

    schema = load_ride_schema()
    kw: dict[str, Any] = {"id_field": "ride_id", "event_time_field": "requested_at"}
    columns = (
        build_fast_path(schema, FEATURES, max_message_bytes=4096, **kw)
        if fast
        else AvroColumns(Decoder(schema, 4096), FeatureBuilder(FEATURES), **kw)
    )
    assert columns is not None
    json_value = b'{"ride_id": "r-1", "distance_km": 3.2}'
    framed = b"\x00\x00\x00\x00\x0c" + bytes(40)
    out = columns.run([Msg(json_value, o=0), Msg(framed, o=1), Msg(b"\x9a\x11xyz", o=2)])
    dead = {d.message.offset(): d for d in out.dead}
    assert set(dead) == {0, 1, 2}
    assert dead[0].reason is Reason.NEGATIVE_LENGTH
    assert f"{_HINT} {schema['name']}: it starts like JSON" in dead[0].error_message
    assert "Confluent frame (magic byte 0, schema id 12)" in dead[1].error_message
    assert _HINT not in dead[2].error_message
