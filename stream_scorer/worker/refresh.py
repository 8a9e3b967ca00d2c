"""Hot swap: follow the model source's alias, load a new version in the background.

A thread asks the source which version its alias points at every ``model.refresh_s``. A new
version is fetched, loaded and checked off the main loop (the manifest, the model file's sha256,
the booster's features against the manifest, the manifest's fields against the input schema,
the prediction schema, the compiled decoder, and a warm-up batch), then left for the main loop,
which swaps it in only between batches (``take``): after the batch's transaction committed
(exactly-once) or its outputs were handed to the producer (at-least-once). A batch is thus
scored by one version, which every output of it carries.

A version that fails is refused: one error line, ``stream_scorer_model_refused_total``, and the
model in use keeps scoring (readiness is not affected); it is not tried again until the alias
points at another version. The model swapped out stays loaded: an alias moved back to it (a
rollback) swaps it in again without loading anything.

Rollouts (``model/rollout.py``): with the alias, the refresher reads its rollout record, and
what it waits for is a whole split (the champion and the challengers' percents). Every version
the split names is loaded, checked and warmed first; then the routing (versions and weights) is
swapped in at once between batches, on every worker of the group within ``model.refresh_s``. A
split with a version that fails is refused whole (the split in force keeps scoring,
``stream_scorer_rollout_refused`` = 1). A record that cannot be read keeps the split in force
(``stream_scorer_rollout_unreadable`` = 1, one error line per distinct error).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stream_scorer.errors import RefusedError, RolloutError, UnavailableError
from stream_scorer.model.rollout import Split
from stream_scorer.model.store import ModelSource
from stream_scorer.stages.pipeline import ColumnBuilder, Pipeline
from stream_scorer.stages.route import RoutedPipeline
from stream_scorer.stages.score import Scorer, warm_up
from stream_scorer.worker.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready to score: the pipeline built for it (one model per batch).

    Attributes:
        source_version: the version as the source names it (alias target).
        pipeline: scores batches with this model (a rollout: a ``RoutedPipeline``).
        scorer: the model (a rollout: the champion).
        directory: where its files are.
        split: a rollout: the split ``pipeline`` routes by; None: this one version.
        parts: a rollout: each version's own ``LoadedModel``, in ``split.versions`` order.
    """

    source_version: str
    pipeline: Pipeline | RoutedPipeline
    scorer: Scorer
    directory: Path
    split: Split | None = None
    parts: tuple[LoadedModel, ...] = ()

    @property
    def model_version(self) -> str:
        """The manifest's version, carried by every output this model produced."""
        return self.scorer.model_version

    def weights(self) -> dict[str, float]:
        """Percent of keys per manifest version (one version: 100)."""
        if self.split is None:
            return {self.model_version: 100.0}
        by_source = {p.source_version: p.model_version for p in self.parts}
        out: dict[str, float] = {}
        for version, percent in self.split.weights().items():
            out[by_source[version]] = out.get(by_source[version], 0.0) + percent
        return out

    def describe(self) -> str:
        """``model 3`` or ``rollout 3 90%, 4 10%`` (manifest versions), for log lines."""
        if self.split is None:
            return f"model {self.model_version}"
        return "rollout " + ", ".join(f"{v} {w:g}%" for v, w in self.weights().items())


def routed(split: Split, parts: dict[str, LoadedModel]) -> LoadedModel:
    """The model of ``split``: its versions' pipelines behind one ``RoutedPipeline``.

    Without challengers: the champion itself.
    """
    champion = parts[split.champion]
    if not split.challengers:
        return champion
    ordered = tuple(parts[v] for v in split.versions)
    pipeline = RoutedPipeline(
        [p.pipeline for p in ordered],  # type: ignore[misc]
        [percent for _, percent in split.challengers],
    )
    return LoadedModel(
        champion.source_version, pipeline, champion.scorer, champion.directory, split, ordered
    )


#: Builds the pipeline for a model directory (``loop.build_pipeline``), checking it all.
Loader = Callable[[Path], tuple[Pipeline, Scorer]]


def load_model(source: ModelSource, version: str, load: Loader) -> LoadedModel:
    """Fetch ``version`` from ``source``, build its pipeline and warm it up.

    Raises:
        StreamScorerError: the version cannot be fetched, loaded or fails a check.
    """
    directory = source.fetch(version)
    pipeline, scorer = load(directory)
    warm_up(scorer)
    return LoadedModel(version, pipeline, scorer, directory)


class ModelRefresher:
    """Polls the source's alias (and rollout) and prepares new models (see module doc)."""

    def __init__(
        self,
        source: ModelSource,
        current: LoadedModel,
        load: Loader,
        metrics: Metrics,
        interval_s: float,
    ) -> None:
        """Follow ``source`` from ``current``; ``load`` builds a version's pipeline."""
        self._source = source
        self._current = current
        self._load = load
        self._metrics = metrics
        self._interval = interval_s
        self._target = split_of(current)  # what is in use or about to be
        #: loaded versions by source version: the model in use's and the one before's
        self._loaded: dict[str, LoadedModel] = _parts(current)
        self._previous: dict[str, LoadedModel] = {}
        self._pending: LoadedModel | None = None
        self._refused: set[Split] = set()
        self._failing = False
        self._unreadable = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """Whether the source can change and ``model.refresh_s`` asks to follow it."""
        return self._interval > 0 and self._source.tracks

    def __enter__(self) -> ModelRefresher:
        """Start the polling thread (when enabled)."""
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="model-refresh", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the polling thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check_now()
            except Exception:  # pragma: no cover - defensive: the thread must not die
                log.exception("model refresh failed")

    def _wanted(self) -> Split | None:
        """The split the source asks for now; None: cannot tell (logged once)."""
        try:
            wanted = self._source.wanted()
            try:
                record = self._source.rollout()
            except RolloutError as exc:  # the split in force stays
                self._metrics.rollout_unreadable.set(1)
                if str(exc) != self._unreadable:
                    log.error(
                        "%s; %s stays in force (fix or rewrite the record: stream-scorer model "
                        "rollout, or model rollback)",
                        exc,
                        self._current.describe(),
                    )
                    self._unreadable = str(exc)
                return None
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "cannot ask %s for its version (%s); %s keeps scoring, asking again every %s s",
                    self._source.describe(),
                    exc,
                    self._current.model_version,
                    self._interval,
                )
            self._failing = True
            return None
        if self._unreadable:
            log.info("the rollout record of %s reads again", self._source.describe())
            self._unreadable = ""
        self._metrics.rollout_unreadable.set(0)
        if self._failing:
            log.info("%s answers again", self._source.describe())
            self._failing = False
        if record is None:
            return Split(wanted)
        if record.champion != wanted:
            log.warning(
                "the rollout record of %s names champion %s but the alias points at %s (moved "
                "since): ignored, %s scores every key",
                self._source.describe(),
                record.champion,
                wanted,
                wanted,
            )
            return Split(wanted)
        return record.split()

    def check_now(self) -> None:
        """Ask the source once; load and check what a new split needs (in this thread)."""
        wanted = self._wanted()
        if wanted is None:
            return
        # 1 while the split asked for is one refused (a rollback to the split in force clears it)
        self._metrics.rollout_refused.set(int(wanted in self._refused and bool(wanted.challengers)))
        with self._lock:
            if wanted == self._target or wanted in self._refused:
                return
            if wanted == split_of(self._current):  # moved back before the swap
                self._pending, self._target = None, wanted
                return
            have = {**self._previous, **self._loaded}
        started = time.monotonic()
        parts: dict[str, LoadedModel] = {}
        for version in wanted.versions:
            if version in have:
                parts[version] = have[version]  # still loaded: nothing to load
                continue
            try:
                parts[version] = load_model(self._source, version, self._load)
            except (UnavailableError, RefusedError) as exc:  # not the version's fault: again later
                if not self._failing:
                    log.warning(
                        "cannot fetch version %s from %s (%s); %s keeps scoring, asking again "
                        "every %s s",
                        version,
                        self._source.describe(),
                        exc,
                        self._current.describe(),
                        self._interval,
                    )
                self._failing = True
                return
            except Exception as exc:
                with self._lock:
                    self._refused.add(wanted)
                self._metrics.model_refused.inc()
                if wanted.challengers:
                    self._metrics.rollout_refused.set(1)
                log.error(
                    "model version %s of %s refused, %s keeps scoring: %s",
                    version,
                    self._source.describe(),
                    self._current.describe(),
                    exc,
                )
                return
        loaded = routed(wanted, parts)
        with self._lock:
            self._pending = loaded
            self._target = wanted
        log.info(
            "%s (%s of %s) loaded and checked in %.2f s; it scores from the next batch on",
            loaded.describe(),
            wanted.describe(),
            self._source.describe(),
            time.monotonic() - started,
        )

    def take(self) -> LoadedModel | None:
        """The model to swap in now, if one is ready (call between batches only)."""
        if self._pending is None:  # the common case: no lock
            return None
        with self._lock:
            loaded, self._pending = self._pending, None
            if loaded is None or loaded is self._current:
                return None
            self._previous = self._loaded
            self._current, self._loaded = loaded, _parts(loaded)
        self._metrics.rollout_refused.set(0)
        return loaded


def split_of(model: LoadedModel) -> Split:
    """The split ``model`` routes by (one version: its own, 100%)."""
    return model.split if model.split is not None else Split(model.source_version)


def _parts(model: LoadedModel) -> dict[str, LoadedModel]:
    if model.split is None:
        return {model.source_version: model}
    return {p.source_version: p for p in model.parts}


def load_initial(source: ModelSource, load: Loader, metrics: Metrics) -> LoadedModel:
    """The model to start with: the alias's version and, with a rollout, its challengers.

    A rollout that cannot be read or whose challenger cannot be loaded does not stop the
    worker: the champion alone scores (logged; the refresher tries the rollout again and
    sets ``stream_scorer_rollout_unreadable`` or ``stream_scorer_rollout_refused``).

    Raises:
        StreamScorerError: the champion cannot be fetched, loaded or fails a check.
    """
    wanted = source.wanted()
    champion = load_model(source, wanted, load)
    try:
        record = source.rollout()
    except RolloutError as exc:
        metrics.rollout_unreadable.set(1)
        log.error("%s; starting with the champion %s alone", exc, champion.model_version)
        return champion
    if record is None or record.champion != wanted:
        return champion
    parts = {wanted: champion}
    for version in record.split().versions:
        if version in parts:
            continue
        try:
            parts[version] = load_model(source, version, load)
        except Exception as exc:
            log.error(
                "model version %s of %s (a challenger) cannot be loaded, starting with the "
                "champion %s alone: %s",
                version,
                source.describe(),
                champion.model_version,
                exc,
            )
            return champion
    return routed(record.split(), parts)


def columns_of(model: LoadedModel) -> list[ColumnBuilder]:
    """The decoders of ``model``'s pipelines: the champion's first, then the challengers'."""
    if model.split is None:
        return [model.pipeline.columns]
    return [model.parts[-1].pipeline.columns, *(p.pipeline.columns for p in model.parts[:-1])]
