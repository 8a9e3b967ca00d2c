"""``score`` from a PostgreSQL table to a table against a Parquet file to a file, in one run.

``python -m stream_scorer.devtools.benchtables --rows 200000``: the same generated rides in a
Parquet file and in a table of a local PostgreSQL (``devtools.localpostgres``, started on a free
port in a temporary folder and removed at the end), scored by ``batch.score.run_score`` with the
example's model: file to file, then query to table, alternately ``--rounds`` times; the best
round of each is printed (rows/s) and written to ``tables.json`` in the cache's results folder.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pyarrow.parquet as pq

from stream_scorer import postgres as pg
from stream_scorer.batch.score import DEFAULT_BATCH_ROWS, run_score
from stream_scorer.devtools.bench import ensure_example_model, example_config
from stream_scorer.devtools.localpostgres import LocalPostgres
from stream_scorer.example.rides import generate_columns, to_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_table_bench(*, rows: int, rounds: int, cache_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Run both ways side by side; print them and write ``tables.json`` in ``out_dir``."""
    model = ensure_example_model(cache_dir / "bench-models" / "100x6")
    cfg = example_config(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"rows": rows, "batch_rows": DEFAULT_BATCH_ROWS, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="bench-tables-") as tmp:
        work = Path(tmp)
        table = to_table(generate_columns(rows, 17, start_ms=1_760_000_000_000))
        data = work / "rides.parquet"
        pq.write_table(table, data, row_group_size=DEFAULT_BATCH_ROWS)
        server = LocalPostgres(work / "pg", port=_free_port(), log=lambda _: None)
        server.start()
        try:
            dsn = server.dsn()
            with psycopg.connect(dsn) as conn, pg.TableWriter(conn, "rides", table.schema) as w:
                for batch in table.to_batches(max_chunksize=DEFAULT_BATCH_ROWS):
                    w.write(batch)
            best: dict[str, float] = {}
            for _ in range(rounds):
                report = run_score(cfg, [str(data)], work / "out.parquet")
                best["files"] = min(best.get("files", 1e18), report.elapsed_s)
                report = run_score(
                    cfg, (), None, query="SELECT * FROM rides", output_table="preds", dsn=dsn
                )
                assert report.records == rows
                best["tables"] = min(best.get("tables", 1e18), report.elapsed_s)
        finally:
            server.destroy()
    for way, seconds in best.items():
        results[way] = {"seconds": seconds, "rows_per_s": round(rows / seconds)}
    results["tables_vs_files"] = round(
        results["tables"]["rows_per_s"] / results["files"]["rows_per_s"], 3
    )
    (out_dir / "tables.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(
        f"{rows:,} rides, best of {rounds}, batches of {DEFAULT_BATCH_ROWS:,}\n"
        f"  Parquet file -> Parquet file  {results['files']['rows_per_s']:>10,} rows/s\n"
        f"  query -> PostgreSQL table     {results['tables']['rows_per_s']:>10,} rows/s  "
        f"({results['tables_vs_files']:.0%} of files)",
        flush=True,
    )
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m stream_scorer.devtools.benchtables [--rows N] [--rounds N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    cache = Path.home() / ".cache" / "stream-scorer"
    run_table_bench(
        rows=args.rows, rounds=args.rounds, cache_dir=cache, out_dir=cache / "bench-results"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

__all__ = ["main", "run_table_bench"]
