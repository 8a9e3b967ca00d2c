"""Drift arithmetic: bin a batch's features like the training sample was binned, and PSI.

The reference distributions come with the model (``Manifest.reference``, written by ``model
pack --sample``): per numeric feature the inner quantile ``edges`` of the training sample and
the share of each of the ``len(edges) + 1`` bins; per ``category`` feature the share of each
category; for both the ``missing`` share (NaN: missing, or an unseen category scored as
missing). The predictions have numeric bins of their own. Live values are binned the same way
(``bin_index``: the number of edges at or below the value), the missing ones into a last bin
of their own, so a feature's reference shares and its live counts have one slot per bin plus
one for missing, and the shares add up to 1.

PSI = sum over bins of (c - r) * ln(c / r), with r the reference and c the window's share, each
first raised to ``FLOOR`` (an empty bin would make the logarithm infinite; one fixed floor
keeps the numbers comparable: docs/manual/watching.md). Under no drift PSI is not 0 but about
``expected_psi`` (B - 1) * (1/N + 1/M) for B bins, N reference rows and M window events: the
noise to read thresholds against.

Everything here is numpy on whole batches: no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.errors import ModelError

#: Every share is raised to this before PSI's logarithm (Evidently's 0.0001; fixed, so numbers
#: from any window and model are comparable).
FLOOR: Final = 1e-4

Counts = npt.NDArray[np.int64]


def bin_index(values: npt.ArrayLike, edges: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Each value's bin among ``len(edges) + 1``: how many edges are at or below it.

    The one binning rule of the reference (``model.pack.reference_bins``) and the live window.
    """
    return np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right").astype(
        np.int64
    )


def psi(
    reference: npt.NDArray[np.float64], counts: npt.ArrayLike, floor: float = FLOOR
) -> npt.NDArray[np.float64]:
    """PSI of each row of ``counts`` against the same row of ``reference`` shares.

    Args:
        reference: shares per bin (rows add up to 1), shape (rows, bins) or (bins,).
        counts: live counts per bin, the same shape.
        floor: the least share (see ``FLOOR``).

    Returns:
        One PSI per row (NaN for a row without any count: an empty window says nothing).
    """
    ref = np.maximum(np.asarray(reference, dtype=np.float64), floor)
    c = np.asarray(counts, dtype=np.float64)
    totals = c.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cur = np.maximum(c / totals, floor)
        out = np.sum((cur - ref) * np.log(cur / ref), axis=-1)
    return np.where(totals[..., 0] > 0, out, np.nan)


def expected_psi(bins: int, reference_rows: int, window: int) -> float:
    """The mean PSI of a window of ``window`` events when nothing drifted.

    (B - 1) * (1/N + 1/M): the chi-square approximation, which matched simulations of 10
    decile bins (0.090 at 100 events, 0.009 at 1,000, 0.001 at 10,000; docs/manual/watching.md).
    """
    if bins < 2 or reference_rows <= 0 or window <= 0:
        return 0.0
    return (bins - 1) * (1.0 / reference_rows + 1.0 / window)


@dataclass(frozen=True)
class Bins:
    """A model's reference, laid out for binning whole batches at once.

    Attributes:
        names: the features' names, in the matrix's column order.
        edges: (features, most edges) inner edges, padded with +inf (no value reaches them).
        edges32: ``edges`` as float32, each the least float32 at or above its edge: for a
            float32 value v, ``v >= edge`` and ``v >= edge32`` agree exactly, so the worker's
            float32 matrix is binned without a float64 copy, as the reference was.
        categorical: which features are ``category`` features (the value is the bin).
        sizes: bins per feature, missing not counted.
        reference: (features, stride) reference shares; slot ``sizes[f]`` is missing, slots
            past it are padding (0, never counted).
        prediction_edges: the predictions' inner edges.
        prediction_reference: the predictions' shares, missing last.
        rows: the reference sample's rows.
    """

    names: tuple[str, ...]
    edges: npt.NDArray[np.float64]
    edges32: npt.NDArray[np.float32]
    categorical: npt.NDArray[np.bool_]
    sizes: npt.NDArray[np.int64]
    reference: npt.NDArray[np.float64]
    prediction_edges: npt.NDArray[np.float64]
    prediction_reference: npt.NDArray[np.float64]
    rows: int

    @property
    def stride(self) -> int:
        """Slots per feature in a count array (the most bins, plus missing)."""
        return int(self.reference.shape[1])

    @property
    def most_bins(self) -> int:
        """The most bins (with reference share > 0, missing included) of any feature."""
        return int(np.max(np.count_nonzero(self.reference > 0, axis=1), initial=0))

    def count(self, matrix: npt.NDArray[np.floating[Any]]) -> Counts:
        """Bin counts of a batch's feature matrix: (features, stride), missing in its slot."""
        n, width = matrix.shape
        if n == 0:
            return np.zeros((len(self.names), self.stride), dtype=np.int64)
        edges = self.edges32 if matrix.dtype == np.float32 else self.edges
        finite = np.isfinite(matrix)
        # numeric: how many edges are at or below the value, one edge column at a time over the
        # whole (rows, features) matrix (a 3-d comparison summed over its short last axis is
        # several times slower)
        slots = np.zeros((n, width), dtype=np.int64)
        for k in range(edges.shape[1]):
            slots += matrix >= edges[:, k]
        cats = self.categorical
        if cats.any():
            safe = np.where(finite[:, cats], matrix[:, cats], 0).astype(np.int64)
            slots[:, cats] = np.clip(safe, 0, self.sizes[cats] - 1)
        slots = np.where(finite, slots, self.sizes[None, :])  # missing: its own slot
        slots += (np.arange(width, dtype=np.int64) * self.stride)[None, :]
        return np.bincount(slots.ravel(), minlength=width * self.stride).reshape(width, self.stride)

    def count_predictions(self, values: npt.NDArray[np.floating[Any]]) -> Counts:
        """Bin counts of a batch's predictions (missing last)."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = np.isfinite(values)
        slots = np.where(
            finite, bin_index(values, self.prediction_edges), len(self.prediction_edges) + 1
        )
        return np.bincount(slots, minlength=len(self.prediction_reference))


def _ceil32(edges: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Each edge as the least float32 at or above it."""
    e32 = edges.astype(np.float32)
    low = e32.astype(np.float64) < edges
    return np.where(low, np.nextafter(e32, np.float32(np.inf)), e32)


def _shares(ref: Mapping[str, Any], where: str, size: int | None) -> list[float]:
    shares, missing = ref.get("shares"), ref.get("missing", 0.0)
    if not isinstance(shares, list) or not all(isinstance(s, int | float) for s in shares):
        raise ModelError(f"manifest reference {where}: 'shares' must be a list of numbers")
    if size is not None and len(shares) != size:
        raise ModelError(f"manifest reference {where}: {len(shares)} shares for {size} bins")
    if not isinstance(missing, int | float) or not 0 <= missing <= 1:
        raise ModelError(f"manifest reference {where}: 'missing' must be a share in [0, 1]")
    return [float(s) for s in shares] + [float(missing)]


def _edges(ref: Mapping[str, Any], where: str) -> list[float]:
    edges = ref.get("edges")
    if not isinstance(edges, list) or not all(isinstance(e, int | float) for e in edges):
        raise ModelError(f"manifest reference {where}: 'edges' must be a list of numbers")
    if edges != sorted(edges):
        raise ModelError(f"manifest reference {where}: 'edges' must be ascending")
    return [float(e) for e in edges]


def bins_of(reference: Mapping[str, Any], features: Sequence[FeatureSpec]) -> Bins | None:
    """The model's reference (``Manifest.reference``) as ``Bins``; None when it has none.

    Raises:
        ModelError: the reference is malformed or does not cover the features (naming where).
    """
    if not reference:
        return None
    per_feature = reference.get("features")
    rows = reference.get("rows")
    if not isinstance(per_feature, Mapping) or not isinstance(rows, int) or rows <= 0:
        raise ModelError("manifest reference: needs 'rows' (> 0) and 'features'")
    edges: list[list[float]] = []
    shares: list[list[float]] = []
    cats: list[bool] = []
    for spec in features:
        where = f"features.{spec.name}"
        ref = per_feature.get(spec.name)
        if not isinstance(ref, Mapping):
            raise ModelError(f"manifest reference: no bins for feature {spec.name!r}")
        if spec.transform == "category":
            cats.append(True)
            edges.append([])
            shares.append(_shares(ref, where, len(spec.categories)))
        else:
            cats.append(False)
            e = _edges(ref, where)
            edges.append(e)
            shares.append(_shares(ref, where, len(e) + 1))
    pred = reference.get("prediction")
    if not isinstance(pred, Mapping):
        raise ModelError("manifest reference: no 'prediction' bins")
    pred_edges = _edges(pred, "prediction")
    pred_shares = _shares(pred, "prediction", len(pred_edges) + 1)
    stride = max(len(s) for s in shares)
    widest = max((len(e) for e in edges), default=0)
    edge_array = np.full((len(features), max(widest, 1)), np.inf)
    ref_array = np.zeros((len(features), stride))
    for f, (e, s) in enumerate(zip(edges, shares, strict=True)):
        edge_array[f, : len(e)] = e
        ref_array[f, : len(s) - 1] = s[:-1]
        ref_array[f, len(s) - 1] = s[-1]
    return Bins(
        names=tuple(f.name for f in features),
        edges=edge_array,
        edges32=_ceil32(edge_array),
        categorical=np.array(cats, dtype=np.bool_),
        sizes=np.array([len(s) - 1 for s in shares], dtype=np.int64),
        reference=ref_array,
        prediction_edges=np.asarray(pred_edges, dtype=np.float64),
        prediction_reference=np.asarray(pred_shares, dtype=np.float64),
        rows=rows,
    )


def reference_counts(reference: Mapping[str, Any], values: npt.ArrayLike) -> Counts:
    """How many of ``values`` fall in each bin of one reference (``model.pack.reference_bins``).

    The last count is of the missing (NaN) values; counts add up batch by batch, for
    ``population_stability``.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = values[np.isfinite(values)]
    size = len(reference.get("shares", []))
    if "edges" in reference:
        slots = bin_index(finite, reference["edges"])
    else:  # categorical: the category's index
        slots = finite.astype(np.int64)
        slots = slots[(slots >= 0) & (slots < size)]
    counts = np.bincount(slots, minlength=size)[:size]
    return np.append(counts, len(values) - len(finite)).astype(np.int64)


def population_stability(reference: Mapping[str, Any], counts: npt.ArrayLike) -> float:
    """PSI of ``counts`` (``reference_counts``) against one reference's shares and missing share.

    ``psi`` with the one ``FLOOR``; 0.0 when there is nothing to compare (no count, or counts
    of another reference).
    """
    ref = np.append(
        np.asarray(reference.get("shares", []), dtype=np.float64),
        float(reference.get("missing", 0.0)),
    )
    c = np.asarray(counts, dtype=np.float64)
    if c.sum() == 0 or len(ref) != len(c):
        return 0.0
    return float(psi(ref, c))
