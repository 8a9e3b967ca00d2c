"""Synthetic taxi ride requests and their trip durations.

Rides are generated as columns (numpy arrays, fast) and turned into dicts that fit
``schemas/ride_request.v1.avsc``. The training target, the trip duration, follows the formula
documented on ``trip_duration_minutes``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import fastavro
import numpy as np
import numpy.typing as npt

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.resources import packaged_file

#: The example input schema, shipped in the package (``schemas/ride_request.v1.avsc`` is its copy).
RIDE_SCHEMA_PATH = packaged_file("stream_scorer.example", "ride_request.v1.avsc")
VEHICLES = ("STANDARD", "XL", "LUX", "GREEN")
PAYMENTS = ("CARD", "CASH", "WALLET")
_VEHICLE_SPEED = np.array([1.0, 0.95, 1.05, 0.97])
_DAY_MS = 86_400_000

#: The model's features. Value policies (the manifest's defaults otherwise): a NaN distance is
#: dead-lettered (``nan_value``); distances, zones and passenger counts outside the schema's
#: documented ranges are dead-lettered (``out_of_range``); a null surge passes as missing.
FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec("distance_km", "distance_km", min=0.0, max=1000.0, policy={"nan": "dead_letter"}),
    FeatureSpec("pickup_zone", "pickup_zone", min=1, max=263),
    FeatureSpec("dropoff_zone", "dropoff_zone", min=1, max=263),
    FeatureSpec("hour", "requested_at", "hour_of_day"),
    FeatureSpec("weekday", "requested_at", "day_of_week"),
    FeatureSpec("passenger_count", "passenger_count", min=1, max=6),
    FeatureSpec("vehicle_type", "vehicle_type", "category", VEHICLES),
    FeatureSpec("is_airport_trip", "is_airport_trip"),
    FeatureSpec("surge_multiplier", "surge_multiplier"),
)

Columns = dict[str, npt.NDArray[Any]]


def load_ride_schema() -> dict[str, Any]:
    """Return the ride request schema (``RIDE_SCHEMA_PATH``) parsed by fastavro."""
    parsed = fastavro.parse_schema(json.loads(RIDE_SCHEMA_PATH.read_text(encoding="utf-8")))
    assert isinstance(parsed, dict)
    return parsed


def generate_columns(
    n: int, seed: int, *, start_ms: int | None = None, span_ms: int = 28 * _DAY_MS
) -> Columns:
    """Generate ``n`` rides as columns (numpy arrays), deterministic for a seed and start.

    Args:
        n: how many rides.
        seed: random seed.
        start_ms: the earliest request time (default: now minus ``span_ms``).
        span_ms: request times spread uniformly over this many milliseconds after ``start_ms``.

    Returns:
        One array per schema field; enums as symbol indexes, null as NaN.
    """
    rng = np.random.default_rng(seed)
    if start_ms is None:
        start_ms = int(time.time() * 1000) - span_ms
    pickup = rng.integers(1, 264, n)
    hop = rng.integers(-60, 61, n)
    far = rng.random(n) < 0.15
    dropoff = np.where(far, rng.integers(1, 264, n), np.clip(pickup + hop, 1, 263))
    airport = rng.random(n) < 0.08
    distance = np.round(rng.gamma(2.0, 2.5, n) + np.where(airport, 15.0, 0.0), 2)
    surge = np.round(1.0 + rng.gamma(1.5, 0.3, n), 2)
    surge_null = rng.random(n) < 0.2
    rating = np.round(rng.uniform(3.0, 5.0, n), 1).astype(np.float32)
    rating_null = rng.random(n) < 0.1
    return {
        "ride_id": np.array([f"ride-{seed}-{i}" for i in range(n)], dtype=object),
        "requested_at": start_ms + np.sort(rng.integers(0, max(1, span_ms), n)),
        "pickup_zone": pickup,
        "dropoff_zone": dropoff,
        "distance_km": distance,
        "passenger_count": rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 6], n),
        "vehicle_type": rng.choice(4, n, p=[0.7, 0.12, 0.08, 0.1]),
        "payment_type": rng.choice(3, n, p=[0.7, 0.1, 0.2]),
        "pickup_lat": np.round(40.60 + rng.random(n) * 0.25, 6),
        "pickup_lon": np.round(-74.05 + rng.random(n) * 0.30, 6),
        "is_airport_trip": airport,
        "surge_multiplier": np.where(surge_null, np.nan, surge),
        "rider_rating": np.where(rating_null, np.nan, rating),
    }


def to_records(cols: Columns) -> list[dict[str, Any]]:
    """Turn columns into ride dicts that fit the schema (null where a nullable value is NaN)."""
    out = []
    lists = {k: v.tolist() for k, v in cols.items()}
    for i in range(len(lists["ride_id"])):
        surge = lists["surge_multiplier"][i]
        rating = lists["rider_rating"][i]
        out.append(
            {
                "ride_id": lists["ride_id"][i],
                "requested_at": lists["requested_at"][i],
                "pickup_zone": lists["pickup_zone"][i],
                "dropoff_zone": lists["dropoff_zone"][i],
                "distance_km": lists["distance_km"][i],
                "passenger_count": lists["passenger_count"][i],
                "vehicle_type": VEHICLES[lists["vehicle_type"][i]],
                "payment_type": PAYMENTS[lists["payment_type"][i]],
                "pickup_lat": lists["pickup_lat"][i],
                "pickup_lon": lists["pickup_lon"][i],
                "is_airport_trip": lists["is_airport_trip"][i],
                "surge_multiplier": None if surge != surge else surge,
                "rider_rating": None if rating != rating else rating,
            }
        )
    return out


def generate_rides(n: int, seed: int, start_ms: int | None = None) -> list[dict[str, Any]]:
    """Generate ``n`` ride request dicts that fit the ride request schema.

    Ids are ``ride-<seed>-<i>`` (unique for a seed); about 20% of ``surge_multiplier`` and 10%
    of ``rider_rating`` are null. Request times spread over 28 days from ``start_ms``.

    Args:
        n: how many rides.
        seed: random seed; the same seed and ``start_ms`` give the same rides.
        start_ms: the earliest request time, epoch milliseconds (default: 28 days ago).

    Returns:
        The rides, ``requested_at`` as epoch milliseconds and enums as their symbols.
    """
    return to_records(generate_columns(n, seed, start_ms=start_ms))


def _hours_weekdays(requested_at: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    ms = requested_at.astype(np.int64)
    hour = (ms // 3_600_000) % 24
    weekday = (ms // _DAY_MS + 3) % 7  # 1970-01-01 was a Thursday (Monday = 0)
    return hour, weekday


def to_columns(rides: Sequence[Mapping[str, Any]]) -> Columns:
    """Turn ride dicts (generated, or decoded by fastavro) back into columns.

    ``requested_at`` may be epoch milliseconds or a datetime; enum symbols become their index;
    null becomes NaN.

    Args:
        rides: ride dicts that fit the ride request schema.

    Returns:
        The columns, as ``generate_columns`` makes them.
    """

    def millis(value: Any) -> int:
        if isinstance(value, datetime):
            return round(value.timestamp() * 1000)
        return int(value)

    def nullable(key: str) -> npt.NDArray[np.float64]:
        return np.array(
            [np.nan if r[key] is None else float(r[key]) for r in rides], dtype=np.float64
        )

    def column(key: str, dtype: Any) -> npt.NDArray[Any]:
        return np.array([r[key] for r in rides], dtype=dtype)

    return {
        "ride_id": column("ride_id", object),
        "requested_at": np.array([millis(r["requested_at"]) for r in rides], dtype=np.int64),
        "pickup_zone": column("pickup_zone", np.int64),
        "dropoff_zone": column("dropoff_zone", np.int64),
        "distance_km": column("distance_km", np.float64),
        "passenger_count": column("passenger_count", np.int64),
        "vehicle_type": np.array([VEHICLES.index(r["vehicle_type"]) for r in rides], np.int64),
        "payment_type": np.array([PAYMENTS.index(r["payment_type"]) for r in rides], np.int64),
        "pickup_lat": column("pickup_lat", np.float64),
        "pickup_lon": column("pickup_lon", np.float64),
        "is_airport_trip": column("is_airport_trip", bool),
        "surge_multiplier": nullable("surge_multiplier"),
        "rider_rating": nullable("rider_rating"),
    }


def trip_duration_minutes(
    rides: Columns | Sequence[Mapping[str, Any]], rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    """Return each ride's observed trip duration in minutes (the training target).

    The formula (hours and weekdays in UTC, Monday = 0)::

        speed_kmh = 30
                  * 0.6   on weekdays 07:00-09:59 and 16:00-19:59 (rush hours)
                  * 1.35  from 00:00 to 05:59
                  * 1.1   on Saturdays and Sundays
                  * {STANDARD: 1.0, XL: 0.95, LUX: 1.05, GREEN: 0.97}[vehicle_type]
                  / (0.8 + 0.2 * surge_multiplier)        (surge means traffic; null counts as 1)
        minutes   = 2 + 60 * distance_km / speed_kmh
                  + 5 if is_airport_trip
                  + 3 if |pickup_zone - dropoff_zone| > 100 (crossing boroughs)
                  + 0.4 * (passenger_count - 1)            (loading time)
        observed  = max(1, minutes * LogNormal(0, 0.08) + Normal(0, 1.5))

    Args:
        rides: the rides, as columns (``generate_columns``) or as ride dicts.
        rng: the source of the noise terms.

    Returns:
        One duration per ride, at least one minute.
    """
    cols = rides if isinstance(rides, Mapping) else to_columns(rides)
    hour, weekday = _hours_weekdays(cols["requested_at"])
    rush = (weekday < 5) & (((hour >= 7) & (hour <= 9)) | ((hour >= 16) & (hour <= 19)))
    speed = 30.0 * np.where(rush, 0.6, 1.0) * np.where(hour <= 5, 1.35, 1.0)
    speed = speed * np.where(weekday >= 5, 1.1, 1.0) * _VEHICLE_SPEED[cols["vehicle_type"]]
    surge = np.nan_to_num(cols["surge_multiplier"], nan=1.0)
    speed = speed / (0.8 + 0.2 * surge)
    minutes = 2.0 + 60.0 * cols["distance_km"] / speed
    minutes += np.where(cols["is_airport_trip"], 5.0, 0.0)
    minutes += np.where(np.abs(cols["pickup_zone"] - cols["dropoff_zone"]) > 100, 3.0, 0.0)
    minutes += 0.4 * (cols["passenger_count"] - 1)
    n = len(minutes)
    observed = minutes * rng.lognormal(0.0, 0.08, n) + rng.normal(0.0, 1.5, n)
    out: npt.NDArray[np.float64] = np.maximum(1.0, observed)
    return out


def feature_matrix(cols: Columns) -> npt.NDArray[np.float32]:
    """The model's features straight from columns, in ``FEATURES`` order (for training)."""
    hour, weekday = _hours_weekdays(cols["requested_at"])
    return np.column_stack(
        [
            cols["distance_km"],
            cols["pickup_zone"],
            cols["dropoff_zone"],
            hour,
            weekday,
            cols["passenger_count"],
            cols["vehicle_type"],
            cols["is_airport_trip"],
            cols["surge_multiplier"],
        ]
    ).astype(np.float32)


def evolved_ride_schemas() -> dict[str, dict[str, Any]]:
    """The ride request schema's evolutions (raw JSON), for the registry demo and tests.

    ``v2`` (readable by the model, BACKWARD compatible): ``passenger_count`` promoted from int
    to long, ``promo_code`` added with a default, ``rider_rating`` (unused) dropped. ``v3``
    (incompatible, registered only under compatibility NONE): ``distance_km`` dropped, a
    feature field without a default in v2.
    """
    v1 = json.loads(RIDE_SCHEMA_PATH.read_text(encoding="utf-8"))
    v2 = json.loads(json.dumps(v1))
    v2["doc"] = "Version 2 of the example input contract (int->long, a field added, one dropped)."
    fields = []
    for f in v2["fields"]:
        if f["name"] == "rider_rating":
            continue
        if f["name"] == "passenger_count":
            f = {**f, "type": "long"}
        fields.append(f)
    fields.append({"name": "promo_code", "type": ["null", "string"], "default": None})
    v2["fields"] = fields
    v3 = json.loads(json.dumps(v2))
    v3["doc"] = "Version 3: distance_km dropped (incompatible with a reader that needs it)."
    v3["fields"] = [f for f in v3["fields"] if f["name"] != "distance_km"]
    return {"v1": v1, "v2": v2, "v3": v3}


def ride_as(version: str, ride: Mapping[str, Any]) -> dict[str, Any]:
    """A ride dict (``generate_rides``) as written with ``evolved_ride_schemas()[version]``."""
    out = dict(ride)
    if version in ("v2", "v3"):
        out.pop("rider_rating", None)
        out["promo_code"] = "SPRING" if int(ride["pickup_zone"]) % 2 else None
    if version == "v3":
        out.pop("distance_km", None)
    return out


def arrow_schema() -> Any:
    """The ride request as Arrow columns (``score``'s Parquet input).

    Enums as strings, the request time a UTC millisecond timestamp, the nullable ones nullable.
    """
    import pyarrow as pa

    return pa.schema(
        [
            ("ride_id", pa.string()),
            ("requested_at", pa.timestamp("ms", tz="UTC")),
            ("pickup_zone", pa.int32()),
            ("dropoff_zone", pa.int32()),
            ("distance_km", pa.float64()),
            ("passenger_count", pa.int32()),
            ("vehicle_type", pa.string()),
            ("payment_type", pa.string()),
            ("pickup_lat", pa.float64()),
            ("pickup_lon", pa.float64()),
            ("is_airport_trip", pa.bool_()),
            ("surge_multiplier", pa.float64()),
            ("rider_rating", pa.float32()),
        ]
    )


def to_table(cols: Columns) -> Any:
    """Generated columns (``generate_columns``) as an Arrow table of ``arrow_schema``.

    Built column by column (no Python object per row: the benchmark's 10 million rows).
    """
    import pyarrow as pa

    schema = arrow_schema()
    arrays = []
    for f in schema:
        values = cols[f.name]
        if f.name in ("vehicle_type", "payment_type"):
            symbols = VEHICLES if f.name == "vehicle_type" else PAYMENTS
            dictionary = pa.DictionaryArray.from_arrays(
                pa.array(values.astype(np.int32)), pa.array(symbols)
            )
            arrays.append(dictionary.cast(pa.string()))
        elif f.name in ("surge_multiplier", "rider_rating"):
            arrays.append(pa.array(values, f.type, from_pandas=True))  # NaN: null
        elif f.name == "requested_at":
            arrays.append(pa.array(values.astype(np.int64)).cast(f.type))
        else:
            arrays.append(pa.array(values).cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)
