"""Several models on one batch: the pure part (no Kafka, no threads).

A batch is decoded once per distinct column builder: models whose manifests list the same
features (names, order, transforms and policies) share one builder, so one decode and one
feature matrix serve all of them; then each model predicts and encodes on its own
(``Pipeline.score``). A record one model refuses (a feature policy, a model failure, an encode
failure) is a dead letter of that model only; the others still score it. A record no builder can
decode is one dead letter, not one per model.

A shadow model's failure on the batch is its own: it comes back as ``failed`` (the worker marks
the model failed and retries it), never as dead letters of the records. The records a shadow
refuses get no dead letter either (they are counted, ``ModelOutput.refused``): the champion's
dead letters already say what is wrong with them, and a shadow must not change what the
dead-letter topic receives.

``compare`` gives a shadow's agreement with its champion.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt

from stream_scorer.stages.pipeline import BatchResult, ColumnBuilder, Pipeline
from stream_scorer.stages.records import Columns, DeadLetter, Message, Scored, Stage
from stream_scorer.stages.route import RoutedPipeline

#: Called with a stage (``decode``, ``features``) and the seconds it took for the batch.
StageTimer = Callable[[str, float], None]


def _no_timer(stage: str, seconds: float) -> None:
    """Discard a stage timing."""


@dataclass(frozen=True)
class Scoring:
    """One model scoring this batch: its entry's name, role, output topic and pipeline.

    Attributes:
        name: the entry's name; ``""``: the single-model form (its dead letters name none).
        topic: its output topic.
        pipeline: decode/features (its ``columns``, maybe shared) and its model (a rollout:
            its versions, each record routed by key).
        shadow: a shadow entry (failures are its own, no dead letters).
        copy_headers: the input headers copied onto its predictions (None: the sink's).
    """

    name: str
    topic: str
    pipeline: Pipeline | RoutedPipeline
    shadow: bool = False
    copy_headers: frozenset[str] | None = None


@dataclass(frozen=True)
class ModelOutput:
    """What one model made of a batch.

    Attributes:
        name: the entry's name (``""``: the single-model form).
        topic: where its predictions go.
        result: its predictions and its own dead letters (stamped ``result.model_version``).
        shadow: a shadow entry: ``result.dead`` is empty, ``refused`` counts its refusals.
        refused: the records a shadow could not score (no dead letter for them).
        failed: the exception a shadow raised on the whole batch (no output at all), or None.
        seconds: the time its predict and encode took.
        copy_headers: the input headers copied onto its predictions (None: the sink's).
    """

    name: str
    topic: str
    result: BatchResult
    shadow: bool = False
    refused: int = 0
    failed: BaseException | None = None
    seconds: float = 0.0
    copy_headers: frozenset[str] | None = None


@dataclass(frozen=True)
class MultiResult:
    """What became of a batch for every model.

    Attributes:
        outputs: each model's output, in configuration order.
        dead: the dead letters of no model in particular (decode, consume), written once.
        unseen: unseen category counts (of the first builder that saw the feature).
    """

    outputs: list[ModelOutput]
    dead: list[DeadLetter] = field(default_factory=list)
    unseen: Mapping[str, int] = field(default_factory=dict)

    @property
    def main(self) -> BatchResult:
        """The first serve model's result (latency, progress, the worker-wide model version)."""
        return next(o.result for o in self.outputs if not o.shadow)


def as_multi(result: BatchResult | MultiResult, topic: str = "") -> MultiResult:
    """A single pipeline's result as a ``MultiResult`` of one unnamed model writing ``topic``."""
    if isinstance(result, MultiResult):
        return result
    return MultiResult([ModelOutput("", topic, result)], [], result.unseen)


def share_columns(
    builders: dict[str, ColumnBuilder], key: str, make: Callable[[], ColumnBuilder]
) -> ColumnBuilder:
    """The column builder for the feature list ``key``: the one built already, or ``make()``."""
    found = builders.get(key)
    if found is None:
        found = builders[key] = make()
    return found


def _columns_runs(
    models: Sequence[Scoring], messages: Sequence[Message], timer: StageTimer
) -> dict[int, Columns]:
    """Run each distinct column builder once over ``messages`` (keyed by builder identity)."""
    runs: dict[int, Columns] = {}
    for m in models:
        builder = m.pipeline.columns
        if id(builder) in runs:
            continue
        t0 = time.perf_counter()
        cols = builder.run(messages)
        timer("decode", cols.decode_done - t0)
        timer("features", time.perf_counter() - cols.decode_done)
        runs[id(builder)] = cols
    return runs


def score_batch(
    models: Sequence[Scoring], messages: Sequence[Message], timer: StageTimer = _no_timer
) -> MultiResult:
    """Score ``messages`` with every model of ``models`` (see the module doc)."""
    runs = _columns_runs(models, messages, timer)
    several = len(models) > 1
    shared: list[DeadLetter] = []
    undecodable: set[int] = set()
    unseen: dict[str, int] = {}
    if several:  # a record no builder decodes is one dead letter, not one per model
        for cols in runs.values():
            for dl in cols.dead:
                if dl.stage is Stage.DECODE and id(dl.message) not in undecodable:
                    undecodable.add(id(dl.message))
                    shared.append(dl)
            for name, count in cols.unseen.items():
                unseen.setdefault(name, count)
    outputs = []
    for m in models:
        cols = runs[id(m.pipeline.columns)]
        t0 = time.perf_counter()
        if m.shadow:
            outputs.append(_shadow(m, cols, t0))
            continue
        result = m.pipeline.score(cols)
        if undecodable:
            own = [d for d in result.dead if id(d.message) not in undecodable]
            result = replace(result, dead=own)
        seconds = time.perf_counter() - t0
        outputs.append(
            ModelOutput(m.name, m.topic, result, seconds=seconds, copy_headers=m.copy_headers)
        )
    if not several:
        unseen = dict(outputs[0].result.unseen) if outputs else {}
    return MultiResult(outputs, shared, unseen)


def _shadow(m: Scoring, cols: Columns, t0: float) -> ModelOutput:
    """A shadow's output: its predictions; its refusals counted; its failure caught."""
    try:
        result = m.pipeline.score(cols, isolate=False)
    except Exception as exc:  # the shadow's failure, never the batch's
        empty = BatchResult(Scored([], [], []), [], {}, m.pipeline.model.model_version)
        return ModelOutput(
            m.name, m.topic, empty, True, 0, exc, time.perf_counter() - t0, m.copy_headers
        )
    refused = len(cols.messages) + len(cols.dead) - len(result.scored)
    quiet = replace(result, dead=[])
    return ModelOutput(
        m.name, m.topic, quiet, True, refused, None, time.perf_counter() - t0, m.copy_headers
    )


@dataclass(frozen=True)
class Comparison:
    """A shadow's predictions against its champion's, over the records both scored.

    Attributes:
        compared: how many records both scored.
        agreed: of those, how many got the same label (classifiers; 0 for regressions).
        deltas: the shadow's value minus the champion's, per record compared.
    """

    compared: int
    agreed: int
    deltas: npt.NDArray[np.float64]


def compare(champion: BatchResult, shadow: BatchResult) -> Comparison:
    """Compare ``shadow``'s predictions with ``champion``'s, record by record (by identity)."""
    position = {id(m): i for i, m in enumerate(champion.scored.messages)}
    pairs = [
        (position[id(m)], j) for j, m in enumerate(shadow.scored.messages) if id(m) in position
    ]
    if not pairs:
        return Comparison(0, 0, np.empty(0))
    ci, si = (np.asarray(x, dtype=np.int64) for x in zip(*pairs, strict=True))
    deltas = (
        np.asarray(shadow.values, dtype=np.float64)[si]
        - np.asarray(champion.values, dtype=np.float64)[ci]
    )
    agreed = 0
    if champion.labels is not None and shadow.labels is not None:
        agreed = int((np.asarray(champion.labels)[ci] == np.asarray(shadow.labels)[si]).sum())
    return Comparison(len(pairs), agreed, deltas)
