"""``stream-scorer model compare A B``: two model versions on the same stored records.

Both models score every record through ``score``'s pipeline (``BatchScorer``: each with its
own manifest's features and policies). Over the records both scored:

- ``agreement`` (both binary classifiers): the share of records whose labels, each at its
  model's threshold, are the same;
- ``delta``: ``B - A`` of the predictions (regression values or probabilities): quantiles,
  mean and mean absolute value;
- ``drift`` of each model's predictions against the reference bins its manifest holds (``model
  pack --sample``): the population stability index (``stages.drift.population_stability``);
  absent when a manifest has no reference;
- the records where they disagree most (largest ``|B - A|``), written to ``--out``.

Memory stays bounded: bins and a top-N of disagreements are kept, not the predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from stream_scorer.batch.files import BatchReader, ParquetWriter, prefetched
from stream_scorer.batch.score import DEFAULT_BATCH_ROWS, BatchScorer, Scored, open_readers
from stream_scorer.errors import InputError
from stream_scorer.stages.drift import population_stability, reference_counts

#: The quantiles of the delta distribution reported.
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)

DISAGREE_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("input_id", pa.string()),
        ("prediction_a", pa.float64()),
        ("prediction_b", pa.float64()),
        ("delta", pa.float64()),
        ("label_a", pa.int32()),
        ("label_b", pa.int32()),
    ]
)


@dataclass
class CompareReport:
    """What ``model compare`` found; printed as JSON."""

    model_a: str
    model_b: str
    records: int = 0
    compared: int = 0
    dead_letters_a: int = 0
    dead_letters_b: int = 0
    agreement: float | None = None
    delta: dict[str, float] = field(default_factory=dict)
    drift: dict[str, float | None] = field(default_factory=dict)
    disagreements: str = ""


class _Top:
    """The ``n`` rows with the largest ``|delta|`` seen so far."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.table: pa.Table = DISAGREE_SCHEMA.empty_table()

    def add(self, batch: pa.Table) -> None:
        if self.n <= 0 or batch.num_rows == 0:
            return
        both = pa.concat_tables([self.table, batch])
        order = np.argsort(-np.abs(both.column("delta").to_numpy()), kind="stable")[: self.n]
        self.table = both.take(pa.array(order))


class _Deltas:
    """The delta distribution: exact min, max and means; quantiles of the deltas kept.

    At most ``limit`` deltas are kept (past it, every other one: an even subsample), so memory
    stays bounded on any input; below it the quantiles are exact.
    """

    def __init__(self, limit: int = 2_000_000) -> None:
        self.limit = limit
        self.parts: list[npt.NDArray[np.float64]] = []
        self.kept = 0
        self.count = 0
        self.total = 0.0
        self.total_abs = 0.0
        self.low = np.inf
        self.high = -np.inf

    def add(self, delta: npt.NDArray[np.float64]) -> None:
        if delta.size == 0:
            return
        self.count += delta.size
        self.total += float(delta.sum())
        self.total_abs += float(np.abs(delta).sum())
        self.low = min(self.low, float(delta.min()))
        self.high = max(self.high, float(delta.max()))
        self.parts.append(delta)
        self.kept += delta.size
        if self.kept > self.limit:  # keep every other one: still an even sample
            merged = np.concatenate(self.parts)[::2]
            self.parts, self.kept = [merged], merged.size

    def summary(self) -> dict[str, float]:
        if not self.count:
            return {}
        sample = np.concatenate(self.parts)
        out = {f"q{round(q * 100):02d}": float(np.quantile(sample, q)) for q in QUANTILES}
        out["q00"], out["q100"] = self.low, self.high
        out["mean"] = self.total / self.count
        out["mean_abs"] = self.total_abs / self.count
        return out


def _predictions(scored: Scored) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], Any]:
    batch = scored.predictions
    values = batch.column("prediction").to_numpy()
    return scored.rows, values, batch.column("label")


def compare(
    a: BatchScorer,
    b: BatchScorer,
    readers: Iterable[BatchReader],
    *,
    names: tuple[str, str],
    out: Path | None = None,
    top: int = 1000,
    batch_size: int = DEFAULT_BATCH_ROWS,
) -> CompareReport:
    """Score ``readers``' records with ``a`` and ``b``; see the module docstring.

    Raises:
        InputError: an input cannot be read (exit 1).
    """
    report = CompareReport(*names)
    refs = [s.scorer.manifest.reference.get("prediction") for s in (a, b)]
    counts: list[npt.NDArray[np.int64] | None] = [None, None]
    binary = a.scorer.manifest.is_binary and b.scorer.manifest.is_binary
    same_labels = 0
    deltas = _Deltas()
    worst = _Top(top)
    for reader in readers:
        try:
            for item in prefetched(reader.batches(batch_size)):
                report.records += item.batch.num_rows
                scored = (a.score(item), b.score(item))
                report.dead_letters_a += len(scored[0].dead)
                report.dead_letters_b += len(scored[1].dead)
                (rows_a, va, la), (rows_b, vb, lb) = map(_predictions, scored)
                for k, (ref, values) in enumerate(zip(refs, (va, vb), strict=True)):
                    if ref:
                        c = reference_counts(ref, values)
                        before = counts[k]
                        counts[k] = c if before is None else before + c
                common, ia, ib = np.intersect1d(rows_a, rows_b, return_indices=True)
                report.compared += common.size
                delta = vb[ib] - va[ia]
                deltas.add(delta)
                take_a, take_b = pa.array(ia), pa.array(ib)
                if binary:
                    same = np.asarray(la.take(take_a).to_numpy(zero_copy_only=False)) == np.asarray(
                        lb.take(take_b).to_numpy(zero_copy_only=False)
                    )
                    same_labels += int(np.count_nonzero(same))
                worst.add(
                    pa.table(
                        {
                            "source": pa.array([item.source] * common.size, pa.string()),
                            "row": pa.array(common + item.first_row, pa.int64()),
                            "input_id": scored[0].predictions.column("input_id").take(take_a),
                            "prediction_a": pa.array(va[ia]),
                            "prediction_b": pa.array(vb[ib]),
                            "delta": pa.array(delta),
                            "label_a": la.take(take_a),
                            "label_b": lb.take(take_b),
                        },
                        schema=DISAGREE_SCHEMA,
                    )
                )
        except (OSError, pa.ArrowException, ValueError, EOFError) as exc:
            raise InputError(f"{reader.describe()}: cannot be read: {exc}") from exc
    if binary and report.compared:
        report.agreement = same_labels / report.compared
    report.delta = deltas.summary()
    for name, ref, found in zip(("a", "b"), refs, counts, strict=True):
        report.drift[name] = None if not ref or found is None else population_stability(ref, found)
    if out is not None:
        writer = ParquetWriter(out, DISAGREE_SCHEMA)
        try:
            for batch in worst.table.to_batches():
                writer.write(batch)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        report.disagreements = str(out)
    return report


def run_compare(
    scorers: tuple[BatchScorer, BatchScorer],
    inputs: Sequence[str],
    *,
    names: tuple[str, str],
    out: Path | None,
    top: int,
) -> CompareReport:
    """``model compare``: both models' readers checked, then ``compare``."""
    a, b = scorers
    open_readers(b, inputs)  # B's features checked against the inputs too
    return compare(a, b, open_readers(a, inputs), names=names, out=out, top=top)
