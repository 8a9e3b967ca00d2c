"""The load generator: example ride events, optionally with malformed records mixed in.

Malformed kinds (each fails the worker's guarded decode, or its feature check, deterministically):

- ``truncated``: a valid payload cut in half (the reader runs out of bytes).
- ``trailing_bytes``: a valid payload followed by two extra bytes.
- ``empty``: no bytes at all.
- ``bad_enum_index``: ``vehicle_type`` written as index 50 of a 4-symbol enum.
- ``invalid_utf8``: ``ride_id``'s bytes replaced by 0xFF bytes (not UTF-8).
- ``negative_length``: the first string's length varint is negative.
- ``wrong_schema``: a small record of another schema (a click event), shorter than any ride.
- ``infinite_distance``: decodes fine, but ``distance_km`` is +infinity (a feature-stage reject).
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import fastavro
import numpy as np
from confluent_kafka import Producer

from stream_scorer.errors import BrokerError
from stream_scorer.example.rides import (
    RIDE_SCHEMA_PATH,
    generate_columns,
    load_ride_schema,
    to_records,
)

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


def _enum_as_int_schema() -> dict[str, Any]:
    raw = json.loads(RIDE_SCHEMA_PATH.read_text(encoding="utf-8"))
    for f in raw["fields"]:
        if f["name"] == "vehicle_type":
            f["type"] = "int"
    parsed = fastavro.parse_schema(raw)
    assert isinstance(parsed, dict)
    return parsed


class RideEncoder:
    """Encodes rides, and malformed variants of them."""

    def __init__(self) -> None:
        """Parse the schemas once."""
        self.schema = load_ride_schema()
        self._enum_int = _enum_as_int_schema()
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

    def malformed(self, kind: str, ride: Mapping[str, Any]) -> bytes:
        """Return the payload of malformed ``kind`` built from ``ride``."""
        good = self.encode(ride)
        if kind == "truncated":
            return good[: len(good) // 2]
        if kind == "trailing_bytes":
            return good + b"\x00\x02"
        if kind == "empty":
            return b""
        if kind == "bad_enum_index":
            return self._write(self._enum_int, {**ride, "vehicle_type": 50})
        if kind == "invalid_utf8":
            n = len(ride["ride_id"].encode())
            return good[:1] + b"\xff" * n + good[1 + n :]
        if kind == "negative_length":
            return b"\x01" + good[1:]
        if kind == "wrong_schema":
            return self._write(_CLICK, {"user": "u-1", "page": "/"})
        if kind == "infinite_distance":
            return self.encode({**ride, "distance_km": float("inf")})
        raise ValueError(f"unknown malformed kind {kind!r} (known: {', '.join(MALFORMED_KINDS)})")


@dataclass(frozen=True)
class ProduceReport:
    """What the load generator produced (all acknowledged by the broker)."""

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
            value = encoder.malformed(kind, ride)
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
