import fastavro
import pytest
from support import PAYMENT_SCHEMA, Msg, avro, payments

from stream_scorer.decode import Decoder
from stream_scorer.records import DeadLetter, Decoded, Stage

SCHEMA = fastavro.parse_schema(PAYMENT_SCHEMA)
GOOD = payments(1)[0]
GOOD_BYTES = avro(PAYMENT_SCHEMA, GOOD)


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
        (b"\x7f" + GOOD_BYTES[1:], "truncated"),  # string length -64: fastavro cannot read it
    ],
)
def test_bad_values_become_dead_letters(value: bytes | None, reason: str) -> None:
    out = Decoder(SCHEMA, max_message_bytes=2048).decode(Msg(value, p=3, o=42))
    assert isinstance(out, DeadLetter)
    assert out.stage is Stage.DECODE
    assert out.reason == reason
    assert out.message.value() == value  # original bytes kept
    assert out.error_message


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
