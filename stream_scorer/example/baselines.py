"""The baselines ``bench --files`` measures ``score`` against, written for the example's rides.

``plain_script`` is the floor: what a hand-written pyarrow + xgboost script does with the
example's features (no schema check, no policies, no dead letters); ``pandas_loop`` is the naive
way, a pandas row loop predicting one row at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xgboost as xgb

from stream_scorer.example.rides import VEHICLES


def plain_script(path: Path, model_dir: Path, out: Path, batch_rows: int) -> int:
    """The floor: what a hand-written pyarrow + xgboost script does. Returns the rows scored."""
    booster = xgb.Booster(model_file=str(model_dir / "model.ubj"))
    booster.set_param({"nthread": 1})
    vehicles = pa.array(VEHICLES)
    writer: pq.ParquetWriter | None = None
    rows = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        ms = batch.column("requested_at").cast(pa.int64()).to_numpy()
        x = np.column_stack(
            [
                batch.column("distance_km").to_numpy(zero_copy_only=False),
                batch.column("pickup_zone").to_numpy(zero_copy_only=False),
                batch.column("dropoff_zone").to_numpy(zero_copy_only=False),
                (ms // 3_600_000) % 24,
                (ms // 86_400_000 + 3) % 7,
                batch.column("passenger_count").to_numpy(zero_copy_only=False),
                pc.index_in(batch.column("vehicle_type"), value_set=vehicles)
                .cast(pa.float64())
                .to_numpy(zero_copy_only=False),
                batch.column("is_airport_trip").to_numpy(zero_copy_only=False),
                batch.column("surge_multiplier").to_numpy(zero_copy_only=False),
            ]
        ).astype(np.float32)
        predictions = booster.inplace_predict(x, validate_features=False)
        table = pa.table({"input_id": batch.column("ride_id"), "prediction": predictions})
        if writer is None:
            writer = pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        rows += batch.num_rows
    if writer is not None:
        writer.close()
    return rows


def pandas_loop(path: Path, model_dir: Path, rows: int) -> int:
    """The naive way: a pandas row loop, features by hand, one prediction per row."""
    booster = xgb.Booster(model_file=str(model_dir / "model.ubj"))
    booster.set_param({"nthread": 1})
    frame = pq.ParquetFile(path).read_row_group(0).slice(0, rows).to_pandas()
    index = {v: float(i) for i, v in enumerate(VEHICLES)}
    for r in frame.itertuples():
        ts = r.requested_at
        x = np.array(
            [[
                r.distance_km, r.pickup_zone, r.dropoff_zone, ts.hour, ts.weekday(),
                r.passenger_count, index.get(r.vehicle_type, np.nan), float(r.is_airport_trip),
                r.surge_multiplier,
            ]],
            dtype=np.float32,
        )  # fmt: skip
        booster.inplace_predict(x, validate_features=False)
    return len(frame)
