"""``sink postgres`` on a real PostgreSQL (``local-postgres``) and a real broker.

Predictions are produced with the output encoder (``stages.encode``), as the worker writes
them; the tests check the table against them: count = distinct = expected, values equal,
after a member killed with SIGKILL and a PostgreSQL restart while two members run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support import (
    free_ports,
    http_get,
    metric_sample,
    produce_raw,
    read_topic,
    ride_config,
    wait_for,
)

from stream_scorer import headers as hdr
from stream_scorer import postgres as pg
from stream_scorer.cli import main
from stream_scorer.config import load_config
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.devtools.localpostgres import LocalPostgres
from stream_scorer.errors import SchemaError
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.worker.flow import StopFlag
from stream_scorer.worker.store import PredictionStore

pytestmark = pytest.mark.integration

Row = tuple[str, float, int | None, str, datetime, datetime]


def predictions(n: int, version: str = "v1", start: int = 0) -> list[tuple[bytes, bytes, Row]]:
    """``n`` encoded predictions (key, value) with the row each must become."""
    encoder = PredictionEncoder(load_schema(PREDICTION_SCHEMA_V1))
    out = []
    for i in range(start, start + n):
        event_ms, scored_ms = 1_763_900_000_000 + i, 1_763_900_100_000 + 7 * i
        label = None if i % 3 == 0 else i % 2
        value = encoder.encode(f"ev-{i}", i / 7.0, label, version, event_ms, scored_ms)
        row = (
            f"ev-{i}",
            i / 7.0,
            label,
            version,
            datetime.fromtimestamp(event_ms / 1000, UTC),
            datetime.fromtimestamp(scored_ms / 1000, UTC),
        )
        out.append((f"ev-{i}".encode(), value, row))
    return out


def write_config(
    tmp_path: Path,
    bootstrap: str,
    server: LocalPostgres,
    unique: Callable[[str], str],
    **store: Any,
) -> tuple[Path, dict[str, Any]]:
    raw = ride_config(
        tmp_path,
        kafka={
            "bootstrap_servers": bootstrap,
            # a killed member's partitions move after 6 s, not librdkafka's 45 s
            "consumer": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"},
        },
        output={"topic": unique("predictions"), "schema": str(PREDICTION_SCHEMA_V1)},
        metrics={"port": 0},  # two members on one host: each would need a port of its own
        store={
            "dsn": server.dsn(),
            "table": unique("preds").replace("-", "_"),
            "group_id": unique("sink"),
            "dead_letter_topic": unique("sink-dlq"),
            "max_records": 200,
            "max_wait_s": 0.2,
            "unavailable_timeout_s": 60,
            **store,
        },
    )
    path = tmp_path / "sink.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def table_rows(server: LocalPostgres, table: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(server.dsn()) as conn:
        return conn.execute(
            f"SELECT input_id, prediction, label, model_version, event_time, scored_at "
            f"FROM {table} ORDER BY input_id"
        ).fetchall()


def count(server: LocalPostgres, table: str) -> int:
    try:
        with psycopg.connect(server.dsn(), connect_timeout=3) as conn:
            return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])  # type: ignore[index]
    except psycopg.Error:  # not created yet, or the server restarting
        return -1


def test_rows_equal_the_predictions_with_dead_letters_and_duplicates_kept_once(
    tmp_path: Path,
    kafka_bootstrap: str,
    postgres_server: LocalPostgres,
    make_topics: Callable[[dict[str, int]], None],
    unique: Callable[[str], str],
) -> None:
    path, raw = write_config(tmp_path, kafka_bootstrap, postgres_server, unique)
    topic, store = raw["output"]["topic"], raw["store"]
    make_topics({topic: 3, store["dead_letter_topic"]: 1})
    good = predictions(300)
    bad: list[tuple[bytes | None, bytes | None]] = [
        (b"k1", b"\xff\xff\xff"),
        (b"k2", b""),
        (b"k3", None),
    ]
    again: list[tuple[bytes | None, bytes | None]] = [
        (good[5][0], good[5][1])
    ]  # an at-least-once producer's duplicate
    items: list[tuple[bytes | None, bytes | None]] = [(k, v) for k, v, _ in good]
    produce_raw(kafka_bootstrap, topic, items + bad + again, 3)
    cfg = load_config(path, environ={})
    stop = StopFlag()
    sink = PredictionStore(cfg, stop, member_id="m1")
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(sink.run()))
    thread.start()
    try:
        wait_for(
            lambda: sink.report.dead_letters == 3 and count(postgres_server, store["table"]) == 300
            and sink.report.duplicates == 1,
            60, "300 rows stored, 3 dead letters, 1 duplicate",
        )  # fmt: skip
    finally:
        stop.set("test")
        thread.join(60)
    assert done and done[0].stored == 300
    assert table_rows(postgres_server, store["table"]) == sorted(r for _, _, r in good)
    letters = read_topic(kafka_bootstrap, store["dead_letter_topic"])
    originals = sorted((m.value() is None, m.value() or b"") for m in letters)
    assert originals == [(False, b""), (False, b"\xff\xff\xff"), (True, b"")]
    reasons = sorted(dict(m.headers())[hdr.REASON].decode() for m in letters)
    assert reasons == ["empty", "null_value", "truncated"]
    with psycopg.connect(postgres_server.dsn()) as conn:
        offsets: dict[int, int] = dict(
            conn.execute(
                "SELECT partition, next_offset FROM stream_scorer_offsets WHERE group_id = %s",
                (store["group_id"],),
            ).fetchall()
        )
    assert sum(offsets.values()) == 304  # every record consumed, once


def test_the_sink_serves_its_metrics_liveness_and_readiness(
    tmp_path: Path,
    kafka_bootstrap: str,
    postgres_server: LocalPostgres,
    make_topics: Callable[[dict[str, int]], None],
    unique: Callable[[str], str],
) -> None:
    port = free_ports(1)[0]
    path, raw = write_config(tmp_path, kafka_bootstrap, postgres_server, unique)
    topic, store = raw["output"]["topic"], raw["store"]
    make_topics({topic: 2, store["dead_letter_topic"]: 1})
    items: list[tuple[bytes | None, bytes | None]] = [(k, v) for k, v, _ in predictions(120)]
    produce_raw(kafka_bootstrap, topic, [*items, (b"k", b"\x02")], 2)
    stop = StopFlag()
    cfg = load_config(path, environ={}, overrides={"metrics": {"port": port}})
    sink = PredictionStore(cfg, stop, member_id="m1")
    thread = threading.Thread(target=sink.run)
    thread.start()

    def sample(name: str, **labels: str) -> float | None:
        return metric_sample(port, name, labels)

    try:
        wait_for(lambda: sink.port == port, 30, "the endpoint listening")
        wait_for(lambda: sample("stream_scorer_sink_rows_stored_total") == 120, 60, "rows")
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, 30, "ready")
        code, body = http_get(port, "/readyz")
        assert code == 200 and body["ready"] is True
        assert body["checks"] == {
            "database_reachable": True,
            "broker_reachable": True,
            "assignment_received": True,
            "no_stalled_partitions": True,
        }
        assert body["assigned_partitions"] == 2
        assert http_get(port, "/healthz")[0] == 200
        assert sample("stream_scorer_sink_dead_letters_total", stage="decode",
                      reason="truncated") == 1  # fmt: skip
        assert (sample("stream_scorer_sink_batches_total") or 0) >= 1
        assert sample("stream_scorer_sink_database_retries_total") == 0
        assert sample("stream_scorer_ready") == 1
        # the lag the worker reports: every record stored (the lag signal committed), so 0
        wait_for(
            lambda: all(
                sample("stream_scorer_consumer_lag_records", topic=topic, partition=str(p)) == 0
                for p in (0, 1)
            ),
            30, "the lag gauges at 0",
        )  # fmt: skip
        produce_raw(kafka_bootstrap, topic, [(k, v) for k, v, _ in predictions(10, start=500)], 2)
        wait_for(lambda: sample("stream_scorer_sink_rows_stored_total") == 130, 60, "10 more")
    finally:
        stop.set("test")
        thread.join(60)
    assert not thread.is_alive()
    assert sink.report.stored == 130


def test_no_broker_for_the_unreachable_timeout_exits_1_saying_so(
    tmp_path: Path,
    postgres_server: LocalPostgres,
    unique: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    dead = f"127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    path, raw = write_config(tmp_path, dead, postgres_server, unique)
    raw["kafka"]["unreachable_timeout_s"] = 3
    path.write_text(yaml.safe_dump(raw))
    assert main(["sink", "postgres", "--config", str(path), "--idle-timeout", "2"]) == 1
    err = capsys.readouterr().err
    assert f"no broker reachable at {dead}" in err
    assert "kafka.unreachable_timeout_s = 3" in err


def _member(path: Path, name: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "stream_scorer", "sink", "postgres", "--config", str(path),
             "--member-id", name],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip


def test_two_members_a_kill_9_and_a_postgres_restart_lose_and_double_nothing(
    tmp_path: Path,
    kafka_bootstrap: str,
    postgres_server: LocalPostgres,
    make_topics: Callable[[dict[str, int]], None],
    unique: Callable[[str], str],
) -> None:
    path, raw = write_config(tmp_path, kafka_bootstrap, postgres_server, unique)
    topic, table = raw["output"]["topic"], raw["store"]["table"]
    make_topics({topic: 4, raw["store"]["dead_letter_topic"]: 1})
    expected = predictions(6000)
    items = [(k, v) for k, v, _ in expected]
    produce_raw(kafka_bootstrap, topic, items[:300], 4)
    # the rest paced (~10 s), started once the members store: the restart and the kill land
    # while predictions still arrive
    producer = threading.Thread(
        target=produce_raw, args=(kafka_bootstrap, topic, items[300:], 4),
        kwargs={"per_second": 600},
    )  # fmt: skip
    log = tmp_path / "members.log"
    members = [_member(path, "a", log), _member(path, "b", log)]
    try:
        wait_for(lambda: count(postgres_server, table) >= 300, 60, "the first rows stored")
        producer.start()
        wait_for(lambda: count(postgres_server, table) >= 600, 60, "rows while producing")
        postgres_server.stop()  # while both members write
        postgres_server.start()
        during = count(postgres_server, table)
        wait_for(lambda: count(postgres_server, table) >= during + 600, 60, "rows after restart")
        members[0].send_signal(signal.SIGKILL)  # mid-batch: its transaction is rolled back
        members[0].wait(10)
        members.append(_member(path, "c", log))
        killed = count(postgres_server, table)
        producer.join(60)
        wait_for(lambda: count(postgres_server, table) == 6000, 90, "every row stored")
    finally:
        for proc in members:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in members:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    with psycopg.connect(postgres_server.dsn()) as conn:
        total, distinct, offsets = conn.execute(
            f"SELECT count(*), count(DISTINCT (input_id, model_version)), "
            f"count(DISTINCT (kafka_partition, kafka_offset)) FROM {table}"
        ).fetchone()  # type: ignore[misc]
    assert (total, distinct, offsets) == (6000, 6000, 6000), log.read_text()[-3000:]
    assert table_rows(postgres_server, table) == sorted(r for _, _, r in expected)
    assert members[1].returncode == 0, log.read_text()[-3000:]
    assert "PostgreSQL not answering, retrying" in log.read_text()  # the restart was seen
    assert during < killed < 6000  # both happened while predictions were still arriving


def test_a_refused_credential_is_a_configuration_error(
    tmp_path: Path, kafka_bootstrap: str, postgres_server: LocalPostgres,
    unique: Callable[[str], str], capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    dsn = postgres_server.tcp_dsn().replace("user=postgres", "user=nobody password=hunter22")
    path, _raw = write_config(tmp_path, kafka_bootstrap, postgres_server, unique, dsn=dsn)
    assert main(["sink", "postgres", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "store.dsn" in err and "nobody" in err
    assert "hunter22" not in err


def test_the_table_gains_the_new_optional_fields_and_refuses_a_changed_type(
    postgres_server: LocalPostgres, unique: Callable[[str], str]
) -> None:
    schema = load_schema(PREDICTION_SCHEMA_V1)
    old = {**schema, "fields": [f for f in schema["fields"] if f["name"] != "label"]}
    table = unique("migrated").replace("-", "_")
    with psycopg.connect(postgres_server.dsn()) as conn:
        assert pg.migrate(conn, table, pg.table_columns(old)) == []
        assert pg.migrate(conn, table, pg.table_columns(schema)) == ["label"]
        assert pg.migrate(conn, table, pg.table_columns(schema)) == []
        nullable = conn.execute(
            "SELECT is_nullable FROM information_schema.columns "
            "WHERE table_name = %s AND column_name = 'label'",
            (table,),
        ).fetchone()
        assert nullable == ("YES",)
        changed = {
            **schema,
            "fields": [
                {**f, "type": "long"} if f["name"] == "prediction" else f for f in schema["fields"]
            ],
        }
        with pytest.raises(SchemaError, match="prediction is double precision"):
            pg.migrate(conn, table, pg.table_columns(changed))


def test_local_postgres_runs_as_the_postgres_user_when_root(postgres_server: LocalPostgres) -> None:
    status = postgres_server.status()
    assert status is not None and status.answering
    with psycopg.connect(postgres_server.dsn()) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[index]
    uid = os.stat(f"/proc/{pid}").st_uid
    assert uid != 0 or os.geteuid() != 0  # PostgreSQL never runs as root


def test_a_query_reads_as_arrow_batches_and_a_table_is_written_whole(
    postgres_server: LocalPostgres, unique: Callable[[str], str]
) -> None:
    import pyarrow as pa

    table = unique("scored").replace("-", "_")
    schema = pa.schema(
        [("id", pa.int64()), ("score", pa.float64()), ("model", pa.string()),
         ("at", pa.timestamp("us", tz="UTC")), ("flag", pa.bool_())]
    )  # fmt: skip
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    rows = [{"id": i, "score": i / 3, "model": f"m{i % 2}", "at": at, "flag": i % 2 == 0}
            for i in range(2500)]  # fmt: skip
    first = pa.RecordBatch.from_pylist(rows[:1000], schema=schema)
    second = pa.RecordBatch.from_pylist(rows[1000:], schema=schema)
    with psycopg.connect(postgres_server.dsn()) as conn:
        with pg.TableWriter(conn, table, schema) as writer:
            writer.write(first)
            writer.write(second)
        assert writer.rows == 2500
        batches = list(pg.read_query(conn, f"SELECT * FROM {table} ORDER BY id", batch_rows=1000))
        assert [b.num_rows for b in batches] == [1000, 1000, 500]
        assert batches[0].schema == schema
        assert pa.Table.from_batches(batches).to_pylist() == rows
        # a failed rewrite leaves the old table whole
        with pytest.raises(RuntimeError), pg.TableWriter(conn, table, schema) as writer:
            writer.write(first)
            raise RuntimeError("crash mid-write")
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (2500,)
        # a complete rewrite replaces it
        with pg.TableWriter(conn, table, schema) as writer:
            writer.write(first)
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (1000,)


def test_local_postgres_command_starts_reports_stops_and_destroys(tmp_path: Path) -> None:
    from support import free_ports

    (port,) = free_ports(1)

    def cli(action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "stream_scorer", "local-postgres", action, "--port", str(port),
             "--dir", str(tmp_path)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    try:
        started = cli("start")
        assert started.returncode == 0, started.stderr
        with psycopg.connect(started.stdout.strip().splitlines()[-1]) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        status = cli("status")
        assert status.returncode == 0 and "answering" in status.stdout
        assert cli("stop").stdout.strip() == "stopped"
        assert cli("status").returncode == 1  # not running
        assert cli("start").returncode == 0  # the same cluster again
    finally:
        cli("destroy")
    assert LocalPostgres(tmp_path, port).cluster is None
