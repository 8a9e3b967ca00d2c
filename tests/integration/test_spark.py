"""The scorer on Spark (``local[2]``): the same predictions and dead letters as ``score``.

Spark runs on this machine's Java 17, its Python workers on this interpreter. Under
``CI=true`` (and everywhere) a Spark that cannot start fails the test: it never skips.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support import free_ports, ride_config

from stream_scorer.batch.score import run_score
from stream_scorer.batch.spark import SPARK_SCHEMA, ship
from stream_scorer.config import load_config
from stream_scorer.example.rides import arrow_schema, generate_rides
from stream_scorer.example.train import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYSPARK_PYTHON", sys.executable)
        env.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        env.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        try:
            from pyspark.sql import SparkSession

            driver, block = free_ports(2)
            session = (
                SparkSession.builder.master("local[2]")
                .appName("stream-scorer-test")
                .config("spark.ui.enabled", "false")
                .config("spark.driver.bindAddress", "127.0.0.1")
                .config("spark.driver.host", "127.0.0.1")
                .config("spark.driver.port", str(driver))
                .config("spark.blockManager.port", str(block))
                .config("spark.sql.shuffle.partitions", "2")
                .getOrCreate()
            )
        except Exception as exc:  # no Java, no pyspark: a failure, never a skip
            pytest.fail(f"Spark (local[2]) could not start: {exc}")
        try:
            yield session
        finally:
            session.stop()


def test_spark_predictions_equal_score_bit_for_bit(tmp_path: Path, spark: Any) -> None:
    model = tmp_path / "model"
    train(model, rows=2000, n_estimators=15)
    rides = generate_rides(500, seed=21)
    rides[7]["distance_km"] = math.nan  # nan_value
    rides[8]["passenger_count"] = 40  # out_of_range
    rides[9]["vehicle_type"] = "BOAT"  # unseen: passed as missing
    rides[10]["surge_multiplier"] = None
    data = tmp_path / "rides.parquet"
    pq.write_table(pa.Table.from_pylist(rides, schema=arrow_schema()), data, row_group_size=120)
    raw = ride_config(
        tmp_path,
        model={"path": str(model)},
        input={"event_time_field": "requested_at"},
    )
    config = tmp_path / "rides.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")

    score = ship(spark, config)
    frame = spark.read.parquet(str(data)).repartition(2)
    rows = [r.asDict() for r in frame.mapInArrow(score, SPARK_SCHEMA).collect()]

    report = run_score(load_config(config, environ={}), [str(data)], tmp_path / "p.parquet")
    assert report.records == 500
    expected = {p["input_id"]: p for p in pq.read_table(tmp_path / "p.parquet").to_pylist()}
    expected_dead = {
        json.loads(d["record"])["ride_id"]: d["reason"]
        for d in pq.read_table(tmp_path / "p.dead-letters.parquet").to_pylist()
    }
    assert expected_dead == {"ride-21-7": "nan_value", "ride-21-8": "out_of_range"}

    got = {r["input_id"]: r for r in rows if r["reason"] is None}
    got_dead = {r["input_id"]: r["reason"] for r in rows if r["reason"] is not None}
    assert len(rows) == 500
    assert got_dead == expected_dead
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        assert np.float64(have["prediction"]).tobytes() == np.float64(want["prediction"]).tobytes()
        assert have["label"] == want["label"]
        assert have["model_version"] == want["model_version"]
        assert have["event_time"].timestamp() == want["event_time"].timestamp()
