"""Route a batch's records by key to one of several model versions (canary, A/B, blue-green).

The split is sticky and stateless: each record's key is hashed into one of ``BUCKETS`` buckets
(CRC-32 of the key bytes, spread by MurmurHash3's 32-bit finalizer: the same on every worker,
every process, every run), and each version owns a contiguous range of buckets: the challengers
from bucket 0 up in the order the rollout lists them, the champion the rest. So a key always
sees one version while the weights hold, and a challenger's share grown from 10% to 50% keeps
the keys it had (its range only grows at the top).

A record without a Kafka key is routed by its value bytes: deterministic (a batch consumed again
after an abort is routed as before) but not sticky per entity; key the input for that.

``RoutedPipeline`` runs each version's own ``Pipeline`` on the records routed to it and merges
the results: every prediction's value and headers carry the version that made it. The batch is
decoded once (the champion's decode + features step; a version with another feature list decodes
its own records), so a routed entry of ``models:`` shares the decode of the other entries.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import replace
from typing import Final

import numpy as np
import numpy.typing as npt

from stream_scorer.stages.pipeline import BatchResult, ColumnBuilder, Model, Pipeline
from stream_scorer.stages.records import Columns, DeadLetter, Message, Scored

#: Buckets of the split: weights are honoured to 0.01 percent.
BUCKETS: Final = 10_000


def key_buckets(keys: Sequence[bytes | None]) -> npt.NDArray[np.int64]:
    """The bucket (``0 .. BUCKETS - 1``) of each key; a stable function of the key bytes only.

    ``None`` (a record without a key) hashes like ``b""``; ``RoutedPipeline`` passes the value.
    """
    h = np.fromiter((zlib.crc32(k or b"") for k in keys), dtype=np.uint32, count=len(keys))
    # MurmurHash3's fmix32: CRC-32 is linear, so keys differing in their last byte would fill
    # neighbouring buckets; the finalizer spreads them over the whole range
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return (h % np.uint32(BUCKETS)).astype(np.int64)


def bucket_bounds(challenger_percents: Sequence[float]) -> npt.NDArray[np.int64]:
    """The upper bucket bound of each challenger's range (cumulative, from bucket 0).

    Raises:
        ValueError: a percent below 0, or the percents sum to more than 100.
    """
    sizes = [round(p * BUCKETS / 100) for p in challenger_percents]
    if any(s < 0 for s in sizes) or sum(sizes) > BUCKETS:
        raise ValueError(f"challenger percents {list(challenger_percents)}: each >= 0, sum <= 100")
    return np.cumsum(np.array(sizes, dtype=np.int64))


def route(buckets: npt.NDArray[np.int64], bounds: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Index of the version of each bucket: ``i`` for challenger ``i``, ``len(bounds)``: champion.

    Pure and vectorized: a batch's buckets in, one index per record out.
    """
    return np.searchsorted(bounds, buckets, side="right").astype(np.int64)


def split_keys(keys: Sequence[bytes | None], challenger_percents: Sequence[float]) -> list[int]:
    """``route(key_buckets(keys), bucket_bounds(percents))`` as a list (for tests and tools)."""
    return route(key_buckets(keys), bucket_bounds(challenger_percents)).tolist()  # type: ignore[no-any-return]


def _routing_key(msg: Message) -> bytes | None:
    key = msg.key()
    return key if key is not None else msg.value()


class RoutedPipeline:
    """Scores each record of a batch with the version its key is routed to (module doc).

    Looks like a ``Pipeline`` to the worker: ``process``, ``score``, ``model`` (the champion's)
    and ``columns`` (the champion's decoder).
    """

    def __init__(self, pipelines: Sequence[Pipeline], challenger_percents: Sequence[float]):
        """Route over ``pipelines``: the challengers in order, the champion last.

        Raises:
            ValueError: not one pipeline more than percents, or bad percents.
        """
        if len(pipelines) != len(challenger_percents) + 1:
            raise ValueError("give one pipeline per challenger, then the champion's")
        self.pipelines = tuple(pipelines)
        self.bounds = bucket_bounds(challenger_percents)
        self.versions = tuple(p.model.model_version for p in pipelines)

    @property
    def model(self) -> Model:
        """The champion."""
        return self.pipelines[-1].model

    @property
    def columns(self) -> ColumnBuilder:
        """The champion's decode + features step."""
        return self.pipelines[-1].columns

    def process(self, messages: Sequence[Message]) -> BatchResult:
        """Score each record with its version; one merged result (per-record versions)."""
        if not messages:
            for pipeline in self.pipelines[:-1]:
                pipeline.process(messages)  # warm-up of every version
            return self.pipelines[-1].process(messages)
        return self.score(self.columns.run(messages))

    def score(self, cols: Columns, *, isolate: bool = True) -> BatchResult:
        """Score the champion decoder's ``cols`` (``Pipeline.score``), each row by its version.

        A version with the champion's decode + features step (the same feature list: the
        worker shares one) scores its rows of ``cols`` as they are; another decodes its records
        itself. A record the champion's step refused is a dead letter of the version its key
        routes to. ``isolate``: as ``Pipeline.score`` (False: a shadow's failure propagates).
        """
        kept, dead = cols.messages, cols.dead
        picks = route(key_buckets([_routing_key(m) for m in kept]), self.bounds)
        dead_picks = route(key_buckets([_routing_key(d.message) for d in dead]), self.bounds)
        scored = Scored([], [], [], [])
        assert scored.versions is not None
        out_dead: list[DeadLetter] = []
        values: list[npt.NDArray[np.float64]] = []
        labels: list[npt.NDArray[np.int64]] = []
        unlabelled = False
        for i, pipeline in enumerate(self.pipelines):
            rows = np.flatnonzero(picks == i)
            own = [d for d, p in zip(dead, dead_picks.tolist(), strict=True) if p == i]
            if not len(rows) and not own:
                continue
            if pipeline.columns is self.columns:
                part = pipeline.score(_take(cols, rows, own), isolate=isolate)
            else:  # another feature list: the version decodes its own records
                msgs = [*(kept[r] for r in rows.tolist()), *(d.message for d in own)]
                part = pipeline.score(pipeline.columns.run(msgs), isolate=isolate)
            version = self.versions[i]
            scored.messages.extend(part.scored.messages)
            scored.encoded.extend(part.scored.encoded)
            scored.event_ms.extend(part.scored.event_ms)
            scored.versions.extend([version] * len(part.scored))
            out_dead.extend(
                d if d.model_version else replace(d, model_version=version) for d in part.dead
            )
            values.append(part.values)
            if part.labels is None:
                unlabelled = True
            else:
                labels.append(part.labels)
        return BatchResult(
            scored,
            out_dead,
            cols.unseen,
            self.versions[-1],
            values=np.concatenate(values) if values else np.empty(0),
            labels=None if unlabelled or not labels else np.concatenate(labels),
        )


def _take(cols: Columns, rows: npt.NDArray[np.int64], dead: list[DeadLetter]) -> Columns:
    """The columns of ``rows`` of ``cols`` with ``dead`` as their dead letters."""
    picked = rows.tolist()
    return Columns(
        [cols.messages[r] for r in picked],
        [cols.ids[r] for r in picked],
        [cols.event_ms[r] for r in picked],
        cols.matrix[rows],
        dead,
        cols.decode_done,
        {},
    )
