"""``stream-scorer score`` with a PostgreSQL query in and tables out, on a real PostgreSQL.

The same ride requests (with records the example's policies dead-letter) are stored in a
Parquet file and in a table; scored from both, they give bit-identical predictions and the same
dead-letter reasons, and the prediction table equals the Parquet output row for row. A run that
fails midway leaves the previous table whole; a missing or mistyped column, a refused
credential (exit 2, its password never shown) and an outage (retried, then exit 1) are told
apart.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support import free_ports

from stream_scorer import postgres as pg
from stream_scorer.cli import main
from stream_scorer.devtools.localpostgres import LocalPostgres
from stream_scorer.example.rides import arrow_schema, generate_rides
from stream_scorer.example.train import train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "deploy" / "config" / "rides.yaml"
RIDES = 400
#: The rides in their stored order (a seq column orders the query as the file is ordered).
QUERY = "SELECT * FROM rides ORDER BY seq"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model")
    train(out, rows=3000, n_estimators=20)
    return out


def _rides() -> list[dict[str, Any]]:
    rides = generate_rides(RIDES, seed=11)
    rides[3]["distance_km"] = math.nan  # nan_value (policy)
    rides[10]["distance_km"] = math.inf  # non_finite
    rides[17]["distance_km"] = 5000.0  # out_of_range
    rides[21]["passenger_count"] = 12  # out_of_range
    rides[30]["surge_multiplier"] = None
    rides[31]["rider_rating"] = None
    return rides


@pytest.fixture(scope="module")
def stored(
    postgres_server: LocalPostgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path]]:
    """The rides in table ``rides`` (with ``seq``) and in a Parquet file; the DSN and file."""
    rides = pa.Table.from_pylist(_rides(), schema=arrow_schema())
    path = tmp_path_factory.mktemp("rides") / "rides.parquet"
    pq.write_table(rides, path, row_group_size=150)
    dsn = postgres_server.dsn()
    with_seq = rides.append_column("seq", pa.array(range(RIDES), pa.int64()))
    with psycopg.connect(dsn) as conn, pg.TableWriter(conn, "rides", with_seq.schema) as writer:
        for batch in with_seq.to_batches(max_chunksize=100):
            writer.write(batch)
    yield dsn, path


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, model_dir: Path) -> None:
    monkeypatch.setenv("STREAM_SCORER_MODEL__PATH", str(model_dir))
    monkeypatch.setenv("STREAM_SCORER_METRICS__PORT", "0")


def _table(dsn: str, table: str) -> pa.Table:
    with psycopg.connect(dsn) as conn:
        return pa.Table.from_batches(pg.read_query(conn, f"SELECT * FROM {table}"))


def _score(*args: str) -> int:
    return main(["score", "--config", str(CONFIG), "--batch-size", "100", *args])


def _bits(values: list[float]) -> list[bytes]:
    return [np.float64(v).tobytes() for v in values]


def test_a_table_and_a_parquet_file_give_the_same_predictions_and_dead_letters(
    stored: tuple[str, Path], env: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, parquet = stored
    out = tmp_path / "p.parquet"
    assert _score("--input", str(parquet), "--output", str(out)) == 0
    assert _score("--input-query", QUERY, "--output-table", "preds", "--dsn", dsn) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["records"] == RIDES
    assert report["output"] == "table preds"
    assert report["dead_letters"] == {"features/nan_value": 1, "features/non_finite": 1,
                                      "features/out_of_range": 2}  # fmt: skip

    from_file = pq.read_table(out)
    from_table = _table(dsn, "preds")
    assert from_table.num_rows == from_file.num_rows == RIDES - 4
    # row for row: the same ids, the same doubles to the bit, labels, versions, event times
    for name in ("input_id", "label", "model_version"):
        assert from_table.column(name).to_pylist() == from_file.column(name).to_pylist(), name
    assert _bits(from_table.column("prediction").to_pylist()) == _bits(
        from_file.column("prediction").to_pylist()
    )
    assert (
        from_table.column("event_time").cast(pa.int64()).to_pylist()
        == (
            from_file.column("event_time").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        ).to_pylist()
    )

    # the same records dead-lettered for the same reasons, to a table too
    file_dead = pq.read_table(tmp_path / "p.dead-letters.parquet").to_pylist()
    table_dead = _table(dsn, "preds_dead_letters").to_pylist()
    assert sorted((json.loads(d["record"])["ride_id"], d["reason"]) for d in table_dead) == sorted(
        (json.loads(d["record"])["ride_id"], d["reason"]) for d in file_dead
    )
    assert len(table_dead) == 4

    # a query into a file: the same predictions again
    again = tmp_path / "q.parquet"
    assert _score("--input-query", QUERY, "--output", str(again), "--dsn", dsn) == 0
    assert _bits(pq.read_table(again).column("prediction").to_pylist()) == _bits(
        from_file.column("prediction").to_pylist()
    )


def test_a_run_failing_midway_leaves_the_previous_table_whole(
    stored: tuple[str, Path], env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, _ = stored
    assert _score("--input-query", QUERY, "--output-table", "kept", "--dsn", dsn) == 0
    before = _table(dsn, "kept")
    assert before.num_rows == RIDES - 4
    # the server fails on row 250, after two batches of 100 were scored and copied
    failing = "SELECT * FROM rides WHERE 1 / (CASE WHEN seq = 250 THEN 0 ELSE 1 END) = 1"
    assert _score("--input-query", failing, "--output-table", "kept", "--dsn", dsn) == 1
    err = capsys.readouterr().err
    assert "division by zero" in err and "after 200 rows" in err
    after = _table(dsn, "kept")
    assert after.drop_columns(["scored_at"]).equals(before.drop_columns(["scored_at"]))
    assert after.column("scored_at").equals(before.column("scored_at"))
    with psycopg.connect(dsn) as conn:
        staged = conn.execute("SELECT to_regclass('kept__staging')").fetchone()
    assert staged == (None,)


def test_a_missing_or_mistyped_column_is_named(
    stored: tuple[str, Path], env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, _ = stored
    missing = "SELECT ride_id, requested_at FROM rides"
    assert _score("--input-query", missing, "--output-table", "x", "--dsn", dsn) == 2
    err = capsys.readouterr().err
    assert "field 'distance_km' is not a column of --input-query" in err
    mistyped = "SELECT r.*, 'far'::text AS distance_km FROM (SELECT ride_id, requested_at, "
    mistyped += "pickup_zone, dropoff_zone, passenger_count, vehicle_type, payment_type, "
    mistyped += "pickup_lat, pickup_lon, is_airport_trip, surge_multiplier, rider_rating "
    mistyped += "FROM rides) r"
    assert _score("--input-query", mistyped, "--output-table", "x", "--dsn", dsn) == 2
    err = capsys.readouterr().err
    assert "column 'distance_km' of --input-query is string" in err
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('x')").fetchone() == (None,)


def test_a_refused_credential_exits_2_without_its_password_and_an_outage_exits_1(
    postgres_server: LocalPostgres,
    env: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = postgres_server.tcp_dsn().replace("user=postgres", "user=nobody password=hunter22")
    assert _score("--input-query", QUERY, "--output", str(tmp_path / "o.parquet"),
                  "--dsn", refused) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "--dsn" in err and "nobody" in err
    assert "hunter22" not in err
    # nobody listens: retried with the policy until store.unavailable_timeout_s, then exit 1
    monkeypatch.setenv("STREAM_SCORER_STORE__UNAVAILABLE_TIMEOUT_S", "1")
    (port,) = free_ports(1)
    down = f"postgresql://scorer:s3cret@127.0.0.1:{port}/rides"
    assert _score("--input-query", QUERY, "--output-table", "t", "--dsn", down) == 1
    err = capsys.readouterr().err
    assert "PostgreSQL did not answer for store.unavailable_timeout_s (1 s)" in err
    assert "retrying" in err
    assert "s3cret" not in err
    assert not (tmp_path / "o.parquet").exists()
