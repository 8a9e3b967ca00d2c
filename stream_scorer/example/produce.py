"""The load generator: example ride events, optionally with malformed records mixed in.

Malformed kinds (``MALFORMED_KINDS``), each built from a real ride, deterministically, and each
landing on a known dead letter (``EXPECTED_DEAD_LETTERS``: kind to stage and reason code):

Refused by the decoder (stage ``decode``):

- ``truncated``: a valid payload cut in half (the reader runs out of bytes): ``truncated``.
- ``trailing_bytes``: a valid payload followed by 1-8 extra bytes (random when an rng is given,
  else ``00 02``): ``trailing_bytes``.
- ``empty``: no bytes at all: ``empty``.
- ``bad_enum_index``: ``vehicle_type`` written as index 50 of a 4-symbol enum: ``bad_enum_index``.
- ``invalid_utf8``: ``ride_id``'s bytes (the first field) replaced by as many 0xFF bytes:
  ``invalid_utf8``.
- ``negative_length``: the first byte, ``ride_id``'s length varint, set to 0x01 (zigzag -1):
  ``negative_length``.
- ``wrong_schema``: a record of another schema (a click event: two short strings) that runs
  out of bytes three fields into a ride: ``truncated`` (the one kind sharing a reason).
- ``varint_too_long``: ``requested_at``'s varint padded to 11 bytes: ``varint_too_long``.
- ``int_out_of_range``: ``pickup_zone`` (an Avro ``int``) written as 2**40:
  ``int_out_of_range``.
- ``bad_union_index``: ``surge_multiplier``'s union branch index 2 of 2: ``bad_union_index``.
- ``tombstone``: a null value (a Kafka tombstone): ``null_value``.
- ``timestamp_in_micros``: ``requested_at`` in microseconds instead of milliseconds; valid
  Avro, but past year 9999 so no datetime holds it: ``malformed_avro``.

Decoded, then refused by the example model's value policy (stage ``features``; see
``rides.FEATURES``):

- ``infinite_distance``: ``distance_km`` is +infinity: ``non_finite``.
- ``nan_distance``: ``distance_km`` is NaN (its policy dead-letters NaN): ``nan_value``.
- ``too_many_passengers``: ``passenger_count`` 12, above the feature's max of 6:
  ``out_of_range``.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np
from confluent_kafka import Producer

from stream_scorer.clients import produce_retrying
from stream_scorer.errors import BrokerError
from stream_scorer.example.rides import (
    RIDE_SCHEMA_PATH,
    generate_columns,
    load_ride_schema,
    to_records,
)
from stream_scorer.stages.records import Reason, Stage

#: Each malformed kind and the dead letter it becomes: (stage, reason code).
EXPECTED_DEAD_LETTERS: dict[str, tuple[Stage, Reason]] = {
    kind: (reason.stage, reason)
    for kind, reason in {
        "truncated": Reason.TRUNCATED,
        "trailing_bytes": Reason.TRAILING_BYTES,
        "empty": Reason.EMPTY,
        "bad_enum_index": Reason.BAD_ENUM_INDEX,
        "invalid_utf8": Reason.INVALID_UTF8,
        "negative_length": Reason.NEGATIVE_LENGTH,
        "wrong_schema": Reason.TRUNCATED,
        "varint_too_long": Reason.VARINT_TOO_LONG,
        "int_out_of_range": Reason.INT_OUT_OF_RANGE,
        "bad_union_index": Reason.BAD_UNION_INDEX,
        "tombstone": Reason.NULL_VALUE,
        "timestamp_in_micros": Reason.MALFORMED_AVRO,
        "infinite_distance": Reason.NON_FINITE,
        "nan_distance": Reason.NAN_VALUE,
        "too_many_passengers": Reason.OUT_OF_RANGE,
    }.items()
}
MALFORMED_KINDS = tuple(EXPECTED_DEAD_LETTERS)
#: The kinds that fail decoding; the others decode and fail at the feature stage.
UNDECODABLE_KINDS = tuple(
    k for k, (stage, _) in EXPECTED_DEAD_LETTERS.items() if stage is Stage.DECODE
)


def expected_reasons(malformed_by_kind: Mapping[str, int]) -> Counter[tuple[Stage, Reason]]:
    """How many dead letters of each (stage, reason) the given malformed kinds must produce.

    Args:
        malformed_by_kind: count per malformed kind (e.g. ``ProduceReport.malformed_by_kind``).

    Returns:
        The expected count per (stage, reason code).
    """
    out: Counter[tuple[Stage, Reason]] = Counter()
    for kind, count in malformed_by_kind.items():
        out[EXPECTED_DEAD_LETTERS[kind]] += count
    return out


HEADERS: list[tuple[str, str | bytes | None]] = [
    ("content-type", b"application/avro"),
    ("schema", b"ride_request.v1"),
]
_CLICK: dict[str, Any] = fastavro.parse_schema(  # type: ignore[assignment]
    {
        "type": "record",
        "name": "Click",
        "fields": [{"name": "user", "type": "string"}, {"name": "page", "type": "string"}],
    }
)
_BAD_ENUM_INDEX = 50
_INT_OUT_OF_RANGE = 2**40
_BAD_UNION_INDEX = 2  # surge_multiplier is ["null", "double"]
_TOO_MANY_PASSENGERS = 12
# fields written as a plain long, to put any value where the schema has an int, enum or union
_AS_LONG = {
    "bad_enum_index": "vehicle_type",
    "int_out_of_range": "pickup_zone",
    "bad_union_index": "surge_multiplier",
}


def _as_long(schema: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The ride schema with field ``name`` as a plain long, to write any value there."""
    fields = [
        {k: v for k, v in f.items() if k != "default"} | {"type": "long"}
        if f["name"] == name
        else f
        for f in schema["fields"]
    ]
    raw = {k: v for k, v in schema.items() if not k.startswith("__")}
    parsed = fastavro.parse_schema({**raw, "fields": fields})
    assert isinstance(parsed, dict)
    return parsed


def _padded_varint(payload: bytes, at: int) -> bytes:
    """``payload`` with the varint at ``at`` padded to 11 bytes (same value, too long)."""
    end = at
    while payload[end] & 0x80:
        end += 1
    groups = [b | 0x80 for b in payload[at : end + 1]]
    padding = [0x80] * (10 - len(groups))
    return payload[:at] + bytes(groups + padding + [0x00]) + payload[end + 1 :]


def _varint_size(n: int) -> int:
    """Bytes in the Avro (zigzag varint) encoding of the non-negative ``n``."""
    zigzag = n << 1
    return max(1, (zigzag.bit_length() + 6) // 7)


class RideEncoder:
    """Encodes rides, and malformed variants of them, reusing one buffer."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        """Create an encoder for the parsed ride ``schema`` (default: ``load_ride_schema()``)."""
        self.schema = load_ride_schema() if schema is None else schema
        self._as_long: dict[str, dict[str, Any]] = {}
        self._buf = io.BytesIO()

    def _write(self, schema: dict[str, Any], record: Mapping[str, Any]) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def encode(self, ride: Mapping[str, Any]) -> bytes:
        """Return a valid ride as schemaless Avro."""
        return self._write(self.schema, ride)

    def _long_field(self, kind: str, ride: Mapping[str, Any], value: int) -> bytes:
        name = _AS_LONG[kind]
        if name not in self._as_long:
            self._as_long[name] = _as_long(self.schema, name)
        return self._write(self._as_long[name], {**ride, name: value})

    def malformed(
        self, kind: str, ride: Mapping[str, Any], rng: np.random.Generator | None = None
    ) -> bytes | None:
        """Return the value of malformed ``kind`` built from ``ride`` (see the module doc).

        Returns:
            The record value: bytes, or None for ``tombstone``.

        Raises:
            ValueError: ``kind`` is not one of ``MALFORMED_KINDS``.
        """
        if kind == "tombstone":
            return None
        if kind == "empty":
            return b""
        if kind == "wrong_schema":
            return self._write(_CLICK, {"user": "u-1", "page": "/"})
        if kind == "infinite_distance":
            return self.encode({**ride, "distance_km": float("inf")})
        if kind == "nan_distance":
            return self.encode({**ride, "distance_km": float("nan")})
        if kind == "too_many_passengers":
            return self.encode({**ride, "passenger_count": _TOO_MANY_PASSENGERS})
        if kind == "timestamp_in_micros":
            return self.encode({**ride, "requested_at": int(ride["requested_at"]) * 1000})
        if kind == "bad_enum_index":
            return self._long_field(kind, ride, _BAD_ENUM_INDEX)
        if kind == "int_out_of_range":
            return self._long_field(kind, ride, _INT_OUT_OF_RANGE)
        if kind == "bad_union_index":
            return self._long_field(kind, ride, _BAD_UNION_INDEX)
        good = self.encode(ride)
        id_size = len(ride["ride_id"].encode())
        if kind == "varint_too_long":  # requested_at follows ride_id
            return _padded_varint(good, _varint_size(id_size) + id_size)
        if kind == "truncated":
            return good[: len(good) // 2]
        if kind == "trailing_bytes":
            extra = b"\x00\x02" if rng is None else rng.bytes(int(rng.integers(1, 9)))
            return good + extra
        if kind == "invalid_utf8":
            head = _varint_size(id_size)
            return good[:head] + b"\xff" * id_size + good[head + id_size :]
        if kind == "negative_length":
            return b"\x01" + good[1:]
        raise ValueError(f"unknown malformed kind {kind!r} (known: {', '.join(MALFORMED_KINDS)})")


def encode_ride(ride: Mapping[str, Any], parsed_schema: dict[str, Any]) -> bytes:
    """Encode one ride as schemaless Avro.

    Args:
        ride: a ride dict that fits the schema (e.g. from ``generate_rides``).
        parsed_schema: the ride schema, parsed (``load_ride_schema()``).

    Returns:
        The Avro body, without any framing.
    """
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema, ride)
    return buf.getvalue()


def malformed_payload(
    kind: str,
    ride: Mapping[str, Any],
    parsed_schema: dict[str, Any],
    rng: np.random.Generator | None = None,
) -> bytes | None:
    """Return a malformed payload of ``kind`` derived from ``ride``.

    Args:
        kind: one of ``MALFORMED_KINDS`` (described in this module's docstring).
        ride: the ride the record would have been.
        parsed_schema: the ride schema, parsed (``load_ride_schema()``).
        rng: randomises the extra bytes of ``trailing_bytes``; other kinds ignore it.

    Returns:
        The record value to send (None for ``tombstone``).

    Raises:
        ValueError: ``kind`` is unknown.
    """
    return RideEncoder(parsed_schema).malformed(kind, ride, rng)


@dataclass(frozen=True)
class ProduceReport:
    """What the load generator produced (all acknowledged by the broker).

    Attributes:
        produced: events produced, valid and malformed.
        valid: events that decode and can be scored.
        malformed_by_kind: how many of each malformed kind (kinds that occurred).
        malformed_keys: the keys (ride ids) of the malformed events, in production order.
        elapsed_s: seconds from the first event to the last acknowledgement.
    """

    produced: int
    valid: int
    malformed_by_kind: dict[str, int]
    malformed_keys: list[bytes] = field(repr=False)
    elapsed_s: float


def produce_events(
    bootstrap: str,
    topic: str,
    n: int,
    *,
    malformed_fraction: float = 0.0,
    rate: float | None = None,
    seed: int = 1,
    progress: Callable[[int], None] | None = None,
    producer_config: Mapping[str, str] | None = None,
    frame: bytes = b"",
) -> ProduceReport:
    """Produce ``n`` ride events keyed by ride id; ``requested_at`` is the time of production.

    Args:
        bootstrap: Kafka bootstrap servers.
        topic: the input topic.
        n: how many events.
        malformed_fraction: share of malformed records (kinds taken in turn, positions random).
        rate: events per second; None for as fast as possible.
        seed: random seed (ride ids are ``ride-<seed>-<i>``).
        progress: called with the count produced so far, every 1,000 events and at the end.
        producer_config: extra librdkafka settings.
        frame: written before every value but tombstones (``confluent_frame``: the Confluent
            wire format's magic byte and schema id); malformed bodies are framed too.

    Raises:
        BrokerError: the broker did not acknowledge every event.
    """
    if not 0.0 <= malformed_fraction <= 1.0:
        raise ValueError("malformed_fraction must be between 0 and 1")
    rng = np.random.default_rng(seed)
    rides = to_records(generate_columns(n, seed))
    n_bad = round(n * malformed_fraction)
    bad_at = {
        int(i): MALFORMED_KINDS[j % len(MALFORMED_KINDS)]
        for j, i in enumerate(rng.choice(n, n_bad, replace=False))
    }
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": "20",
            "acks": "all",
            "enable.idempotence": "true",
            "batch.size": "1000000",
            **(producer_config or {}),
        }
    )
    failures: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(str(err))

    encoder = RideEncoder()
    pace = threading.Event()
    counts = dict.fromkeys(MALFORMED_KINDS, 0)
    keys: list[bytes] = []
    started = time.monotonic()
    for i, ride in enumerate(rides):
        ride["requested_at"] = int(time.time() * 1000)
        key = ride["ride_id"].encode()
        kind = bad_at.get(i)
        value: bytes | None
        if kind is None:
            value = encoder.encode(ride)
        else:
            value = encoder.malformed(kind, ride, rng)
            counts[kind] += 1
            keys.append(key)
        if frame and value is not None:
            value = frame + value
        produce_retrying(
            producer, topic, value, key=key, headers=HEADERS, on_delivery=delivered, wait_s=0.1
        )
        producer.poll(0)
        if rate and i % max(1, int(rate) // 100) == 0:
            pace.wait(max(0.0, started + (i + 1) / rate - time.monotonic()))
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1)
    remaining = producer.flush(60)
    if remaining or failures:
        raise BrokerError(
            f"{remaining + len(failures)} of {n} events were not acknowledged"
            + (f" (first error: {failures[0]})" if failures else ""),
            topic=topic,
        )
    if progress is not None and n % 1000:
        progress(n)
    return ProduceReport(
        produced=n,
        valid=n - n_bad,
        malformed_by_kind={k: v for k, v in counts.items() if v},
        malformed_keys=keys,
        elapsed_s=time.monotonic() - started,
    )


def confluent_frame(registry_url: str, topic: str) -> bytes:
    """Register the ride schema under ``<topic>-value``; return the frame: magic 0 and its id."""
    from stream_scorer.registry import RegistryClient

    schema_id = RegistryClient(registry_url).register(
        f"{topic}-value", json.dumps(json.loads(RIDE_SCHEMA_PATH.read_text(encoding="utf-8")))
    )
    return b"\x00" + schema_id.to_bytes(4, "big")
