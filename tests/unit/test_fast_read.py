"""The compiled v1 prediction reader against the decode stage, on generated and broken records.

Values read must be bit for bit the decode stage's (fastavro's), every refused record must be
refused with the decode stage's reason, and the COPY tuples must be what psycopg writes for the
decoded values.
"""

from __future__ import annotations

import copy
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import adapt, pq
from support import Msg

from stream_scorer import postgres as pg
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.fast import kernel
from stream_scorer.fast.read import PredictionReader, build_prediction_reader, is_v1
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.records import DeadLetter, Decoded, Reason

SCHEMA = load_schema(PREDICTION_SCHEMA_V1)
MAX = 4096
MS_MIN, MS_MAX = -62_135_596_800_000, 253_402_300_799_999
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENCODER = PredictionEncoder(SCHEMA)
GENERIC = Decoder(SCHEMA, MAX)


@pytest.fixture(scope="module")
def reader() -> PredictionReader:
    built = build_prediction_reader(SCHEMA, MAX)
    assert built is not None
    return built


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


PREDICTIONS = st.builds(
    lambda *a: ENCODER.encode(*a),
    st.text(max_size=40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none() | st.integers(min_value=-(2**31), max_value=2**31 - 1),
    st.text(max_size=20),
    st.integers(MS_MIN - 2, MS_MAX + 2),
    st.integers(MS_MIN - 2, MS_MAX + 2),
)


def _broken(data: st.DataObject, value: bytes) -> bytes:
    """``value`` cut, extended, or with bytes overwritten (the shapes hostile input takes)."""
    how = data.draw(st.sampled_from(["cut", "append", "overwrite", "random"]))
    if how == "cut":
        return value[: data.draw(st.integers(0, max(0, len(value) - 1)))]
    if how == "append":
        return value + data.draw(st.binary(min_size=1, max_size=12))
    if how == "random":
        return data.draw(st.binary(max_size=40))
    out = bytearray(value)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(out) - 1))
        out[at] = data.draw(st.sampled_from([0x00, 0x01, 0x02, 0x04, 0x7F, 0x80, 0xC3, 0xFF]))
    return bytes(out)


def _same(reader: PredictionReader, values: list[bytes | None]) -> None:
    """The reader and the decode stage agree on every value: the record, or the reason."""
    messages = [Msg(v, o=i) for i, v in enumerate(values)]
    cols = reader.read(messages)
    dead = {d.message.offset(): d for d in reader.dead_letters(cols)}
    for i, msg in enumerate(messages):
        want = GENERIC.decode(msg)
        if isinstance(want, Decoded):
            assert cols.status[i] == 0, (values[i], kernel.REASONS[int(cols.status[i])])
            got = cols.record(i)
            assert _bits(got.pop("prediction")) == _bits(want.record["prediction"])
            assert got == {k: v for k, v in want.record.items() if k != "prediction"}
        else:
            assert isinstance(want, DeadLetter)
            assert i in dead, (values[i], want.reason)
            assert dead[i].reason == want.reason, values[i]
            assert dead[i].message is msg and dead[i].stage == want.stage


@SETTINGS
@given(values=st.lists(PREDICTIONS, max_size=6))
def test_the_reader_reads_what_the_decoder_reads(
    reader: PredictionReader, values: list[bytes]
) -> None:
    _same(reader, list(values))


@SETTINGS
@given(data=st.data(), value=PREDICTIONS)
def test_the_reader_refuses_what_the_decoder_refuses_with_its_reason(
    reader: PredictionReader, data: st.DataObject, value: bytes
) -> None:
    _same(reader, [value, _broken(data, value), value])


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, Reason.NULL_VALUE),
        (b"", Reason.EMPTY),
        (b"\x00" * (MAX + 1), Reason.TOO_LARGE),
        (b"\x03", Reason.NEGATIVE_LENGTH),
        (b"\x02", Reason.TRUNCATED),
        (b"\x02\xff", Reason.INVALID_UTF8),
        (b"\xff" * 11, Reason.VARINT_TOO_LONG),
        (b"\x00" + bytes(8) + b"\x06", Reason.BAD_UNION_INDEX),
        (b"\x00" + bytes(8) + b"\x02\x80\x80\x80\x80\x10", Reason.INT_OUT_OF_RANGE),
        (b"\x00" + bytes(8) + b"\x00\x00\x00\x00\x00", Reason.TRAILING_BYTES),
        (ENCODER.encode("a", 1.0, 1, "v", MS_MAX + 1, 0), Reason.MALFORMED_AVRO),
        (ENCODER.encode("a", 1.0, 1, "v", 0, MS_MIN - 1), Reason.MALFORMED_AVRO),
        (b'{"input_id": "a"}', None),  # whatever the reason, the decoder's, hint included
    ],
)
def test_each_guard_gives_the_decoders_reason(
    reader: PredictionReader, value: bytes | None, reason: Reason | None
) -> None:
    msg = Msg(value)
    cols = reader.read([msg])
    [dead] = reader.dead_letters(cols)
    want = GENERIC.decode(msg)
    assert isinstance(want, DeadLetter)
    assert dead.reason == want.reason == (reason or want.reason)
    assert dead.message is msg  # the original bytes go with it
    if reason is None:
        assert "JSON" in dead.error_message and "JSON" in want.error_message


def _dumped(row: tuple[Any, ...]) -> bytes:
    """``row`` as psycopg's own binary COPY writes it (its binary dumpers)."""
    columns = pg.table_columns(SCHEMA)
    tx = adapt.Transformer()
    tx.set_dumper_types([_oid(c.binary_type) for c in columns], pq.Format.BINARY)
    fields = tx.dump_sequence(row, [adapt.PyFormat.BINARY] * len(row))
    out = struct.pack(">h", len(row))
    for f in fields:
        out += b"\xff\xff\xff\xff" if f is None else struct.pack(">i", len(f)) + bytes(f)
    return out


def _oid(name: str) -> int:
    from psycopg.postgres import types

    info = types.get(name)
    assert info is not None
    return info.oid


@SETTINGS
@given(values=st.lists(PREDICTIONS, min_size=1, max_size=5), partition=st.integers(0, 2**31 - 1))
def test_copy_tuples_are_what_psycopg_writes_for_the_decoded_rows(
    reader: PredictionReader, values: list[bytes], partition: int
) -> None:
    messages = [Msg(v, o=i) for i, v in enumerate(values)]
    cols = reader.read(messages)
    good = cols.good.tolist()
    topics = ["predictions", "predictions-é"]
    coordinates = np.array([[i % 2, partition, 2**40 + i] for i in range(len(values))])
    data, ends = reader.copy_tuples(cols, topics, coordinates)
    assert len(ends) == len(good)
    want = b""
    for i in good:
        record = cols.record(i)
        fields = [record[c.name] for c in pg.table_columns(SCHEMA)[: -len(pg.COORDINATES)]]
        want += _dumped((*fields, topics[i % 2], partition, 2**40 + i))
        assert len(want) == ends[good.index(i)]
    assert data == want


def test_only_the_v1_layout_gets_the_compiled_reader() -> None:
    evolved = copy.deepcopy(SCHEMA)
    evolved["fields"].append({"name": "extra", "type": ["null", "string"], "default": None})
    plain_times = copy.deepcopy(SCHEMA)
    plain_times["fields"][4]["type"] = "long"
    assert is_v1(SCHEMA)
    assert not is_v1(evolved)
    assert not is_v1(plain_times)  # the same bytes, but the decoder reads integers, not times
    assert build_prediction_reader(evolved, MAX) is None


def test_nan_payloads_are_kept_bit_for_bit(reader: PredictionReader) -> None:
    quiet = struct.unpack("<d", bytes.fromhex("0100000000f8ff7f"))[0]
    value = ENCODER.encode("a", quiet, None, "v", 0, 0)
    cols = reader.read([Msg(value)])
    assert math.isnan(cols.values[0])
    assert _bits(float(cols.values[0])) == bytes.fromhex("0100000000f8ff7f")
