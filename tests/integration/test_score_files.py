"""``stream-scorer score``: the same records through the stream and through files, bit for bit.

One set of ride requests (with records the example's policies dead-letter) is produced to a
real broker and scored by a worker (``run``), and written to an Avro container file and to a
Parquet file scored by ``score``; every prediction (its double's bits, label, version, event
time) and every dead letter (its record and reason) must be the same three ways. Then: a
failed and a killed ``score`` leave the previous output whole.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import avro, produce_raw, read_record, read_topic, wait_for

from stream_scorer import headers as hdr
from stream_scorer.batch.files import temporary_name
from stream_scorer.example.rides import (
    arrow_schema,
    generate_columns,
    generate_rides,
    load_ride_schema,
    to_table,
)
from stream_scorer.example.train import train
from stream_scorer.stages.decode import load_schema

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "deploy" / "config" / "rides.yaml"
RIDE_SCHEMA = ROOT / "schemas" / "ride_request.v1.avsc"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_scorer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def _done(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    train(out, rows=3000, n_estimators=20)
    return out


def _rides() -> list[dict[str, Any]]:
    """Rides, with some the example's policies dead-letter (distance NaN, infinite, out of
    range; passengers out of range) and nullable fields null."""
    rides = generate_rides(400, seed=11)
    rides[3]["distance_km"] = math.nan  # nan_value (policy)
    rides[10]["distance_km"] = math.inf  # non_finite
    rides[17]["distance_km"] = 5000.0  # out_of_range
    rides[21]["passenger_count"] = 12  # out_of_range
    rides[30]["surge_multiplier"] = None  # missing, passed
    rides[31]["rider_rating"] = None
    return rides


def _parquet(rides: list[dict[str, Any]], path: Path) -> None:
    pq.write_table(pa.Table.from_pylist(rides, schema=arrow_schema()), path, row_group_size=150)


def _avro_file(rides: list[dict[str, Any]], path: Path) -> None:
    with path.open("wb") as fo:
        fastavro.writer(fo, load_ride_schema(), rides, codec="deflate", sync_interval=4000)


def _records(reader: Any) -> list[dict[str, Any]]:
    """An Avro container file's records (each a record: a dict)."""
    return [dict(r) for r in reader]


def _bits(value: float) -> bytes:
    return np.float64(value).tobytes()


def _as_tuple(p: dict[str, Any]) -> tuple[Any, ...]:
    """A prediction's double (its bits), label, model version and event time (milliseconds)."""
    event = p["event_time"]
    millis = event if isinstance(event, int) else round(event.timestamp() * 1000)
    return (_bits(p["prediction"]), p["label"], p["model_version"], millis)


def test_stream_and_files_give_the_same_predictions_and_dead_letters(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
) -> None:
    rides = _rides()
    ride_schema = load_ride_schema()
    topic, preds, dlq, group = unique("rides"), unique("preds"), unique("dlq"), unique("grp")
    make_topics({topic: 2, preds: 2, dlq: 1})
    items = [(r["ride_id"].encode(), avro(ride_schema, r)) for r in rides]
    produce_raw(kafka_bootstrap, topic, items, 2)
    env = {
        "STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAM_SCORER_INPUT__TOPIC": topic,
        "STREAM_SCORER_INPUT__GROUP_ID": group,
        "STREAM_SCORER_INPUT__AUTO_OFFSET_RESET": "earliest",
        "STREAM_SCORER_OUTPUT__TOPIC": preds,
        "STREAM_SCORER_DEAD_LETTER__TOPIC": dlq,
        "STREAM_SCORER_MODEL__PATH": str(model_dir),
        "STREAM_SCORER_METRICS__PORT": "0",
    }
    _parquet(rides, tmp_path / "rides.parquet")
    _avro_file(rides, tmp_path / "rides.avro")
    worker = _cli("run", "--config", str(CONFIG), "--max-messages", str(len(rides)), env=env)
    from_parquet = _cli(
        "score", "--config", str(CONFIG), "--input", str(tmp_path / "rides.parquet"),
        "--output", str(tmp_path / "p.parquet"), "--dead-letters", str(tmp_path / "p-dl.parquet"),
        env=env,
    )  # fmt: skip
    from_avro = _cli(
        "score", "--config", str(CONFIG), "--input", str(tmp_path / "*.avro"),
        "--output", str(tmp_path / "a.avro"), env=env,
    )  # fmt: skip
    for proc in (worker, from_parquet, from_avro):
        code, out, err = _done(proc)
        assert code == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["records"] == len(rides)
    assert report["dead_letters"] == {"features/nan_value": 1, "features/non_finite": 1,
                                      "features/out_of_range": 2}  # fmt: skip

    # the stream's outputs
    pred_schema = load_schema(ROOT / "schemas" / "prediction.v1.avsc")
    stream = {}
    for m in read_topic(kafka_bootstrap, preds):
        p = read_record(pred_schema, m.value())
        stream[p["input_id"]] = _as_tuple(p)
    stream_dead = {
        m.key().decode(): (dict(m.headers())[hdr.REASON].decode(), m.value())
        for m in read_topic(kafka_bootstrap, dlq)
    }
    assert len(stream) + len(stream_dead) == len(rides)
    assert len(stream_dead) == 4

    parquet_preds = {
        p["input_id"]: _as_tuple(p) for p in pq.read_table(tmp_path / "p.parquet").to_pylist()
    }
    with (tmp_path / "a.avro").open("rb") as fo:
        avro_preds = {p["input_id"]: _as_tuple(p) for p in _records(fastavro.reader(fo))}
    assert parquet_preds == stream
    assert avro_preds == stream

    # dead letters: the same records for the same reasons
    parquet_dead = {
        json.loads(d["record"])["ride_id"]: d["reason"]
        for d in pq.read_table(tmp_path / "p-dl.parquet").to_pylist()
    }
    assert parquet_dead == {k: reason for k, (reason, _) in stream_dead.items()}
    with (tmp_path / "a.dead-letters.avro").open("rb") as fo:
        letters = _records(fastavro.reader(fo))  # the records' bytes, byte for byte, and why
    assert sorted((d["value"], d["reason"]) for d in letters) == sorted(
        (value, reason) for reason, value in stream_dead.values()
    )


def test_a_failed_or_killed_run_leaves_the_previous_output_whole(
    tmp_path: Path, model_dir: Path
) -> None:
    env = {"STREAM_SCORER_MODEL__PATH": str(model_dir)}
    rides = generate_rides(300, seed=2)
    good = tmp_path / "good.avro"
    _avro_file(rides, good)
    out = tmp_path / "out.parquet"
    code, _, err = _done(
        _cli("score", "--config", str(CONFIG), "--input", str(good), "--output", str(out),
             env=env)
    )  # fmt: skip
    assert code == 0, err
    before = out.read_bytes()
    # a second input whose blocks break off half way: read, scored, then a failure (exit 1)
    data = good.read_bytes()
    broken = tmp_path / "broken.avro"
    broken.write_bytes(data[: len(data) * 2 // 3])
    code, _, err = _done(
        _cli("score", "--config", str(CONFIG), "--input", str(good), str(broken),
             "--output", str(out), env=env)
    )  # fmt: skip
    assert code == 1, err
    assert "cannot be read" in err
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.avro",
        "good.avro",
        "out.dead-letters.parquet",
        "out.parquet",
    ]
    # killed (SIGKILL) while writing: the old file stays whole (the temporary one is left)
    big = tmp_path / "big.parquet"
    pq.write_table(to_table(generate_columns(400_000, seed=3)), big, row_group_size=20_000)
    proc = _cli(
        "score", "--config", str(CONFIG), "--input", str(big), "--output", str(out),
        "--batch-size", "5000", env=env,
    )  # fmt: skip
    try:
        tmp = tmp_path / f".out.parquet.{proc.pid}.tmp"
        wait_for(lambda: tmp.exists() and tmp.stat().st_size > 0, 120, "a partial output")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert out.read_bytes() == before
    assert pq.read_table(out).num_rows == 300
    assert temporary_name(out).name.startswith(".out.parquet.")
