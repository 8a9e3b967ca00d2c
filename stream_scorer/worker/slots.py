"""The model entries of a worker (``models:``, or the one of ``model:``): one slot each.

A slot holds where its entry's versions come from (its ``ModelSource``), what scores now (a
``LoadedModel``) and its refresher (a new version of its alias, or a new rollout split, is
loaded in the background and swapped in whole between batches, each slot on its own). A rollout
of the entry's alias (canary, A/B, blue-green: ``model/rollout.py``) keeps its versions loaded
in the slot and routes each record's key to one of them (``stages/route.py``); each prediction
carries the version that made it, and ``stream_scorer_rollout_weight_percent`` and
``stream_scorer_version_predictions_total`` are labelled with the entry's name.

A serve slot that cannot load stops start-up. A shadow slot never stops its champion: when
it fails to load, or raises on a batch, it is marked failed (``stream_scorer_shadow_failed``
and one log line), scores nothing, and is loaded again in a thread with the backoff of the one
retry policy (``retry.RetryPolicy``) until it loads; it scores again from the next batch
boundary after that.
"""

from __future__ import annotations

import logging
import threading
from contextlib import suppress

from stream_scorer.config import ModelEntry
from stream_scorer.model.store import ModelSource
from stream_scorer.retry import RetryPolicy
from stream_scorer.stages.multi import Scoring
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.refresh import LoadedModel, Loader, ModelRefresher, load_initial

log = logging.getLogger(__name__)


class Slot:
    """One model entry: its source, the version scoring now, its refresher (see module doc)."""

    def __init__(
        self,
        entry: ModelEntry,
        source: ModelSource,
        load: Loader,
        metrics: Metrics,
        *,
        refresh_s: float,
        policy: RetryPolicy,
        named: bool,
    ) -> None:
        """A slot for ``entry``; ``load`` builds a version's pipeline.

        ``named``: its outputs name it (the ``models:`` form); the single form's dead letters
        carry no model name, as before ``models:`` existed.
        """
        self.entry = entry
        self.source = source
        self._load = load
        self._metrics = metrics
        self._refresh_s = refresh_s
        self._policy = policy
        self._named = named
        self.loaded: LoadedModel | None = None
        self._refresher: ModelRefresher | None = None
        self._recovered: LoadedModel | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._retry: threading.Thread | None = None
        self._attempts = 0

    @property
    def shadow(self) -> bool:
        """Whether this entry is a shadow (a challenger)."""
        return self.entry.role == "shadow"

    @property
    def name(self) -> str:
        """The entry's name."""
        return self.entry.name

    @property
    def scoring_name(self) -> str:
        """The name its outputs carry: its name in the ``models:`` form, else none."""
        return self.name if self._named else ""

    @property
    def failed(self) -> bool:
        """A shadow marked failed (not scoring, being retried)."""
        return self.loaded is None

    def start(self) -> None:
        """Load what the source's alias (and its rollout) asks for and follow it.

        Raises:
            StreamScorerError: a serve entry's model cannot be loaded (a shadow is marked
                failed instead).
        """
        try:
            loaded = load_initial(self.source, self._load, self._metrics)
        except Exception as exc:
            if not self.shadow:
                raise
            self.fail(exc)
            return
        of = f" (model {self.name})" if self._named else ""
        log.info("model %s from %s%s", loaded.model_version, self.source.describe(), of)
        if loaded.split is not None:
            log.info("%s from %s%s", loaded.describe(), self.source.describe(), of)
        self._use(loaded, None)

    def _use(self, loaded: LoadedModel, old: str | None) -> None:
        """Score with ``loaded`` from now on and follow the source's alias from it."""
        self.loaded = loaded
        self._metrics.entry_version(self.name, self.entry.role, old, loaded.model_version)
        self._metrics.routing(self.name, loaded.weights())
        if self.shadow:
            self._metrics.shadow_failed.labels(self.name).set(0)
        if self._refresher is None:
            self._refresher = ModelRefresher(
                self.source, loaded, self._load, self._metrics, self._refresh_s
            )
            self._refresher.__enter__()

    def scoring(self) -> Scoring | None:
        """What scores the next batch for this entry (None: a failed shadow)."""
        if self.loaded is None:
            return None
        return Scoring(
            self.scoring_name,
            self.entry.output.topic,
            self.loaded.pipeline,
            self.shadow,
            frozenset(self.entry.output.copy_headers),
        )

    def swap(self) -> LoadedModel | None:
        """Between batches: swap in a version that is ready; return it (None: no change)."""
        with self._lock:
            recovered, self._recovered = self._recovered, None
        if recovered is not None:
            log.info("shadow model %s loaded again (%s): it scores from this batch on",
                     self.name, recovered.model_version)  # fmt: skip
            self._use(recovered, None)
            return recovered
        if self._refresher is None or self.loaded is None:
            return None
        new = self._refresher.take()
        if new is None:
            return None
        old, self.loaded = self.loaded.model_version, new
        self._metrics.entry_version(self.name, self.entry.role, old, new.model_version)
        self._metrics.routing(self.name, new.weights())
        return new

    def scored(self) -> None:
        """A batch was scored: a shadow's backoff starts from the beginning again."""
        self._attempts = 0

    def fail(self, exc: BaseException) -> None:
        """A shadow failed (to load, or on a batch): mark it failed and retry it with backoff."""
        if self.loaded is not None:
            with suppress(KeyError):
                self._metrics.model_version_info.remove(
                    self.name, self.loaded.model_version, self.entry.role
                )
        self.loaded = None
        self._metrics.routing(self.name, {})  # it scores no key
        self._metrics.shadow_failed.labels(self.name).set(1)
        self._attempts += 1
        wait = self._policy.wait_s(self._attempts)
        log.error(
            "shadow model %s failed (%s: %s); its champion %s scores on; loading it again in "
            "%.1f s",
            self.name,
            type(exc).__name__,
            exc,
            self.entry.shadow_of,
            wait,
        )
        if self._retry is None or not self._retry.is_alive():
            self._retry = threading.Thread(
                target=self._reload, args=(wait,), name=f"shadow-{self.name}", daemon=True
            )
            self._retry.start()

    def _reload(self, wait: float) -> None:
        """Load the shadow again until it loads (in its thread), waiting ``wait`` s first."""
        attempt = self._attempts
        while not self._stop.wait(wait):
            try:
                loaded = load_initial(self.source, self._load, self._metrics)
            except Exception as exc:
                attempt += 1
                wait = self._policy.wait_s(attempt)
                log.debug("shadow model %s still fails (%s); again in %.1f s", self.name, exc, wait)
                continue
            with self._lock:
                self._recovered = loaded
            return

    def close(self) -> None:
        """Stop the refresher and the retry thread, and close the source."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.__exit__(None, None, None)
        if self._retry is not None:
            self._retry.join(timeout=30)
        self.source.close()
