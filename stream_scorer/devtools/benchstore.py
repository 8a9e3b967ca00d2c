"""``sink postgres``'s own cost next to a plain binary COPY of the same rows, in one run.

No broker: the prediction records are made with the output encoder and handed to the sink's
batch path (``PredictionStore.store_now``: decode with the decode stage, the offsets guard, one
transaction per batch, binary COPY), next to two floors on the same local PostgreSQL
(``local-postgres``), each into a fresh table of its own, alternated over ``rounds``:

- ``copy``: the rows already decoded, binary COPY only, psycopg writing each row
  (``write_row``): the floor of any path that hands psycopg Python values;
- ``copy, prebuilt tuples``: the rows already in binary COPY's tuple format, sent as one block
  (the database's own floor, and how the sink's compiled path sends them);
- ``fastavro + copy``: a hand-written loop decoding each record with fastavro (no guards),
  then binary COPY (the floor of any tool that reads the topic's Avro);
- ``sink``: the sink's batch path (v1 records: the compiled reader, ``fast.read``);
- ``sink, generic decoder``: the same with the decode stage's generic ``Decoder`` (what any
  other prediction schema gets).

``python -m stream_scorer.devtools.benchstore --rows 200000`` prints one JSON line per round and
the medians (docs/manual/benchmarks.md, "Storing predictions").
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import psycopg

from stream_scorer import postgres as pg
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.devtools.bench import ensure_example_model, example_config
from stream_scorer.devtools.localkafka import default_cache_dir
from stream_scorer.devtools.localpostgres import LocalPostgres
from stream_scorer.fast.read import PredictionReader
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.records import PlainMessage
from stream_scorer.worker.flow import StopFlag
from stream_scorer.worker.store import PredictionStore


def _messages(rows: int, partitions: int) -> list[PlainMessage]:
    encoder = PredictionEncoder(load_schema(PREDICTION_SCHEMA_V1))
    out = []
    for i in range(rows):
        value = encoder.encode(
            f"ev-{i}", i / 7.0, i % 2, "v1", 1_763_900_000_000 + i, 1_763_900_100_000
        )
        out.append(PlainMessage(value, t="predictions", p=i % partitions, o=i // partitions))
    return out


def _row(record: Any, msg: PlainMessage, names: list[str]) -> tuple[Any, ...]:
    return (*(record.get(n) for n in names), msg.t, msg.p, msg.o)


def run(rows: int, batch: int, rounds: int, port: int) -> dict[str, Any]:
    """Run the three paths ``rounds`` times over ``rows`` rows; return the medians (rows/s)."""
    schema = load_schema(PREDICTION_SCHEMA_V1)
    columns = pg.table_columns(schema)
    names = [c.name for c in columns[: -len(pg.COORDINATES)]]
    messages = _messages(rows, 4)
    decoded = [
        _row(fastavro.schemaless_reader(io.BytesIO(m.val or b""), schema, None), m, names)
        for m in messages
    ]
    model = ensure_example_model(default_cache_dir() / "bench-models" / "100x6")
    with tempfile.TemporaryDirectory() as state:
        server = LocalPostgres(Path(state), port)
        try:
            medians = _rounds(server.start(), rows, batch, rounds, messages, decoded, model)
        finally:
            server.destroy()  # the cluster too: it is in a temporary folder of its own
    return {
        "rows": rows,
        "batch": batch,
        "rounds": rounds,
        "rows_per_s": medians,
        "sink_vs_copy": round(medians["sink"] / medians["copy"], 3),
        "sink_vs_fastavro_copy": round(medians["sink"] / medians["fastavro + copy"], 3),
        "sink_vs_prebuilt_tuples": round(medians["sink"] / medians["copy, prebuilt tuples"], 3),
        "generic_sink_vs_copy": round(medians["sink, generic decoder"] / medians["copy"], 3),
    }


def _rounds(
    dsn: str, rows: int, batch: int, rounds: int, messages: list[PlainMessage],
    decoded: list[tuple[Any, ...]], model: Path,
) -> dict[str, int]:  # fmt: skip
    """The three paths alternated over ``rounds``; the median rows/s of each."""
    schema = load_schema(PREDICTION_SCHEMA_V1)
    columns = pg.table_columns(schema)
    names = [c.name for c in columns[: -len(pg.COORDINATES)]]
    results: dict[str, list[float]] = {
        "copy": [], "copy, prebuilt tuples": [], "fastavro + copy": [], "sink": [],
        "sink, generic decoder": [],
    }  # fmt: skip
    reader = PredictionReader("Prediction", 1 << 20)
    coordinates = np.array([[0, m.p, m.o] for m in messages], dtype=np.int64)
    tuples = []
    for i in range(0, rows, batch):
        cols = reader.read(messages[i : i + batch])
        data, ends = reader.copy_tuples(cols, ["predictions"], coordinates[i : i + batch])
        tuples.append(pg.BinaryTuples(data, len(ends)))
    conn = psycopg.connect(dsn)
    for n in range(rounds):
        for path in results:
            table = f"bench_{path.replace(' + ', '_').replace(', ', '_').replace(' ', '_')}_{n}"
            pg.migrate(conn, table, columns)
            started = time.perf_counter()
            if path.startswith("sink"):
                cfg = example_config(
                    model,
                    store={"dsn": dsn, "table": table, "group_id": f"bench-{n}",
                           "dead_letter_topic": "bench-dlq", "max_records": batch,
                           "offsets_table": f"{table}_offsets"},
                )  # fmt: skip
                sink = PredictionStore(cfg, StopFlag(), member_id="bench")
                if path != "sink":
                    sink.decoder.fast = None  # the generic decoder
                sink.prepare()
                started = time.perf_counter()
                for i in range(0, rows, batch):
                    sink.store_now(messages[i : i + batch])
                assert sink.report.stored == rows
            else:
                for i in range(0, rows, batch):
                    with conn.cursor() as cur:
                        chunk: pg.Rows
                        if path == "copy":
                            chunk = decoded[i : i + batch]
                        elif path == "copy, prebuilt tuples":
                            chunk = tuples[i // batch]
                        else:
                            chunk = [
                                _row(fastavro.schemaless_reader(
                                    io.BytesIO(m.val or b""), schema, None), m, names)
                                for m in messages[i : i + batch]
                            ]  # fmt: skip
                        pg.copy_rows(cur, table, columns, chunk)
                    conn.commit()
            seconds = time.perf_counter() - started
            results[path].append(rows / seconds)
            print(json.dumps({"round": n, "path": path, "rows_per_s": round(rows / seconds)}))
            conn.execute(f"DROP TABLE {table}")
            conn.commit()
    conn.close()
    return {k: round(statistics.median(v)) for k, v in results.items()}


def main() -> None:
    """``python -m stream_scorer.devtools.benchstore``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=39432)
    args = parser.parse_args()
    print(json.dumps(run(args.rows, args.batch, args.rounds, args.port)))


if __name__ == "__main__":
    main()
