"""The load generator: example ride events, optionally with malformed records mixed in.

Malformed kinds. Each of the first seven fails a strict decode of the ride schema (fastavro's
``schemaless_reader``, every byte consumed, valid UTF-8) whatever the ride, deterministically:

- ``truncated``: a valid payload cut in half (the reader runs out of bytes).
- ``trailing_bytes``: a valid payload followed by 1-8 extra bytes (random when an rng is given,
  else ``00 02``); the record ends before the payload does.
- ``empty``: no bytes at all.
- ``bad_enum_index``: ``vehicle_type`` written as index 50 of a 4-symbol enum.
- ``invalid_utf8``: ``ride_id``'s bytes (the first field) replaced by as many 0xFF bytes.
- ``negative_length``: the first byte, ``ride_id``'s length varint, set to 0x01 (zigzag -1): a
  string of negative length.
- ``wrong_schema``: a record of another schema (a click event: two short strings) that runs
  out of bytes three fields into a ride.

And one that decodes but cannot be scored:

- ``infinite_distance``: ``distance_km`` is +infinity; the worker's feature stage rejects
  non-finite numbers (NaN would be a legal "missing", infinity is not).
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np
from confluent_kafka import Producer

from stream_scorer.errors import BrokerError
from stream_scorer.example.rides import generate_columns, load_ride_schema, to_records

MALFORMED_KINDS = (
    "truncated",
    "trailing_bytes",
    "empty",
    "bad_enum_index",
    "invalid_utf8",
    "negative_length",
    "wrong_schema",
    "infinite_distance",
)
#: The kinds that fail decoding; the others decode and fail at the feature stage.
UNDECODABLE_KINDS = MALFORMED_KINDS[:-1]
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


def _enum_as_int(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The ride schema with ``vehicle_type`` as a plain int, to write any enum index."""
    fields = [{**f, "type": "int"} if f["name"] == "vehicle_type" else f for f in schema["fields"]]
    raw = {k: v for k, v in schema.items() if not k.startswith("__")}
    parsed = fastavro.parse_schema({**raw, "fields": fields})
    assert isinstance(parsed, dict)
    return parsed


def _varint_size(n: int) -> int:
    """Bytes in the Avro (zigzag varint) encoding of the non-negative ``n``."""
    zigzag = n << 1
    return max(1, (zigzag.bit_length() + 6) // 7)


class RideEncoder:
    """Encodes rides, and malformed variants of them, reusing one buffer."""

    def __init__(self, schema: dict[str, Any] | None = None) -> None:
        """Create an encoder for the parsed ride ``schema`` (default: ``load_ride_schema()``)."""
        self.schema = load_ride_schema() if schema is None else schema
        self._enum_int: dict[str, Any] | None = None
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

    def malformed(
        self, kind: str, ride: Mapping[str, Any], rng: np.random.Generator | None = None
    ) -> bytes:
        """Return the payload of malformed ``kind`` built from ``ride`` (see the module doc).

        Raises:
            ValueError: ``kind`` is not one of ``MALFORMED_KINDS``.
        """
        if kind == "empty":
            return b""
        if kind == "wrong_schema":
            return self._write(_CLICK, {"user": "u-1", "page": "/"})
        if kind == "infinite_distance":
            return self.encode({**ride, "distance_km": float("inf")})
        if kind == "bad_enum_index":
            if self._enum_int is None:
                self._enum_int = _enum_as_int(self.schema)
            return self._write(self._enum_int, {**ride, "vehicle_type": _BAD_ENUM_INDEX})
        good = self.encode(ride)
        if kind == "truncated":
            return good[: len(good) // 2]
        if kind == "trailing_bytes":
            extra = b"\x00\x02" if rng is None else rng.bytes(int(rng.integers(1, 9)))
            return good + extra
        if kind == "invalid_utf8":
            n = len(ride["ride_id"].encode())
            head = _varint_size(n)
            return good[:head] + b"\xff" * n + good[head + n :]
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
) -> bytes:
    """Return a malformed payload of ``kind`` derived from ``ride``.

    Args:
        kind: one of ``MALFORMED_KINDS`` (described in this module's docstring).
        ride: the ride the record would have been.
        parsed_schema: the ride schema, parsed (``load_ride_schema()``).
        rng: randomises the extra bytes of ``trailing_bytes``; other kinds ignore it.

    Returns:
        The bytes to send as the record value.

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
        if kind is None:
            value = encoder.encode(ride)
        else:
            value = encoder.malformed(kind, ride, rng)
            counts[kind] += 1
            keys.append(key)
        while True:
            try:
                producer.produce(
                    topic, value=value, key=key, headers=HEADERS, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.1)
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
