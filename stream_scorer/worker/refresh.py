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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stream_scorer.errors import RefusedError, UnavailableError
from stream_scorer.model.store import ModelSource
from stream_scorer.stages.pipeline import Pipeline
from stream_scorer.stages.score import Scorer, warm_up
from stream_scorer.worker.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model version ready to score: the pipeline built for it (one model per batch).

    Attributes:
        source_version: the version as the source names it (alias target).
        pipeline: scores batches with this model.
        scorer: the model.
        directory: where its files are.
    """

    source_version: str
    pipeline: Pipeline
    scorer: Scorer
    directory: Path

    @property
    def model_version(self) -> str:
        """The manifest's version, carried by every output this model produced."""
        return self.scorer.model_version


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
    """Polls the source's alias and prepares new versions for the main loop (see module doc)."""

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
        self._previous: LoadedModel | None = None
        self._load = load
        self._metrics = metrics
        self._interval = interval_s
        self._target = current.source_version  # what is in use or about to be
        self._pending: LoadedModel | None = None
        self._refused: set[str] = set()
        self._failing = False
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

    def check_now(self) -> None:
        """Ask the source once; load and check a new version it points at (in this thread)."""
        try:
            wanted = self._source.wanted()
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
            return
        if self._failing:
            log.info("%s answers again", self._source.describe())
            self._failing = False
        with self._lock:
            if wanted == self._target or wanted in self._refused:
                return
            if wanted == self._current.source_version:  # moved back before the swap
                self._pending, self._target = None, wanted
                return
            previous = self._previous
        started = time.monotonic()
        if previous is not None and previous.source_version == wanted:
            loaded = previous  # still loaded: rolling back to it loads nothing
        else:
            try:
                loaded = load_model(self._source, wanted, self._load)
            except (UnavailableError, RefusedError) as exc:  # not the version's fault: again later
                if not self._failing:
                    log.warning(
                        "cannot fetch version %s from %s (%s); %s keeps scoring, asking again "
                        "every %s s",
                        wanted,
                        self._source.describe(),
                        exc,
                        self._current.model_version,
                        self._interval,
                    )
                self._failing = True
                return
            except Exception as exc:
                with self._lock:
                    self._refused.add(wanted)
                self._metrics.model_refused.inc()
                log.error(
                    "model version %s of %s refused, %s keeps scoring: %s",
                    wanted,
                    self._source.describe(),
                    self._current.model_version,
                    exc,
                )
                return
        with self._lock:
            self._pending = loaded
            self._target = wanted
        log.info(
            "model %s (version %s of %s) loaded and checked in %.2f s; it scores from the next "
            "batch on",
            loaded.model_version,
            wanted,
            self._source.describe(),
            time.monotonic() - started,
        )

    def take(self) -> LoadedModel | None:
        """The version to swap in now, if one is ready (call between batches only)."""
        if self._pending is None:  # the common case: no lock
            return None
        with self._lock:
            loaded, self._pending = self._pending, None
            if loaded is None or loaded is self._current:
                return None
            self._previous, self._current = self._current, loaded
        return loaded
