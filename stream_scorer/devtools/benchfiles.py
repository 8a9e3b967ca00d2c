"""``stream-scorer bench --files``: ``score`` against the floor, on one Parquet file, in one run.

Three ways to score the same 10-million-row Parquet file of the example's rides with the same
model (the example's, 100 trees of depth 6, one XGBoost thread each):

1. the floor: a plain hand-written script (``example.baselines``), pyarrow batches (the same
   size) to numpy features,
   ``inplace_predict``, predictions (id, value) written to Parquet; no checks, no dead letters;
2. ``score`` (``batch.score.run_score``, in this process): the whole product path, with its
   schema checks, the policies, dead letters and the six prediction columns;
3. a pandas row loop (``itertuples``, features by hand, one ``inplace_predict`` per row): run
   on a slice and extrapolated to the file's rows (said so in the output).

The file is generated once and kept in the cache folder (``bench-data``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from stream_scorer.batch.score import DEFAULT_BATCH_ROWS, run_score
from stream_scorer.devtools.bench import ensure_example_model, example_config
from stream_scorer.example.baselines import pandas_loop, plain_script
from stream_scorer.example.rides import FEATURES, generate_columns, to_table

_CHUNK = 1_000_000


def ensure_file(path: Path, rows: int, seed: int = 17) -> Path:
    """Write ``rows`` generated rides to ``path`` (Parquet) unless it is there with that many."""
    if path.is_file() and pq.ParquetFile(path).metadata.num_rows == rows:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer: pq.ParquetWriter | None = None
    for start in range(0, rows, _CHUNK):
        n = min(_CHUNK, rows - start)
        table = to_table(generate_columns(n, seed + start, start_ms=1_760_000_000_000))
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=_CHUNK)
    assert writer is not None
    writer.close()
    tmp.replace(path)
    return path


def _timed(run: Callable[[], int]) -> tuple[int, float]:
    started = time.perf_counter()
    rows = run()
    return rows, time.perf_counter() - started


def run_file_bench(
    *, rows: int, pandas_rows: int, cache_dir: Path, out_dir: Path, batch_rows: int = 0
) -> dict[str, Any]:
    """Run the three side by side; print a table and write ``files.json`` in ``out_dir``."""
    batch_rows = batch_rows or DEFAULT_BATCH_ROWS
    model = ensure_example_model(cache_dir / "bench-models" / "100x6")
    assert len(FEATURES) == 9  # the plain script's columns are the example's features
    data = ensure_file(cache_dir / "bench-data" / f"rides-{rows}.parquet", rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = example_config(model)
    results: dict[str, Any] = {"rows": rows, "batch_rows": batch_rows, "xgboost_threads": 1}
    n, s = _timed(lambda: plain_script(data, model, out_dir / "plain.parquet", batch_rows))
    results["plain"] = {"rows": n, "seconds": round(s, 2), "rows_per_s": round(n / s)}
    report = run_score(cfg, [str(data)], out_dir / "score.parquet", batch_size=batch_rows)
    s = report.elapsed_s
    n = report.records
    results["score"] = {"rows": n, "seconds": round(s, 2), "rows_per_s": round(n / s)}
    n, s = _timed(lambda: pandas_loop(data, model, pandas_rows))
    results["pandas_loop"] = {
        "rows_run": n,
        "seconds": round(s, 2),
        "rows_per_s": round(n / s),
        "extrapolated_seconds": round(s * rows / n, 1),
    }
    plain, score = results["plain"]["rows_per_s"], results["score"]["rows_per_s"]
    results["score_vs_plain"] = round(score / plain, 3)
    results["score_vs_pandas"] = round(score / results["pandas_loop"]["rows_per_s"], 1)
    (out_dir / "files.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(
        f"{rows:,} rows of Parquet, batches of {batch_rows:,}, 1 XGBoost thread\n"
        f"  plain pyarrow + xgboost script  {results['plain']['seconds']:8.2f} s  "
        f"{plain:>12,} rows/s\n"
        f"  stream-scorer score             {results['score']['seconds']:8.2f} s  "
        f"{score:>12,} rows/s  ({results['score_vs_plain']:.0%} of the plain script)\n"
        f"  pandas row loop ({pandas_rows:,} rows, extrapolated) "
        f"{results['pandas_loop']['extrapolated_seconds']:8.1f} s  "
        f"{results['pandas_loop']['rows_per_s']:>8,} rows/s",
        flush=True,
    )
    return results
