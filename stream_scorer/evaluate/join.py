"""The join of predictions with their outcomes: bounded state keyed by the event id.

A prediction waits for its outcome, and an outcome that arrives first waits for its prediction,
each at most ``horizon_ms`` of stream time (the largest record time seen). An outcome joins its
prediction when it came at most ``horizon_ms`` after the prediction's event time; later it is
*late*: not joined, counted, whether its prediction was still waiting or had expired already
(the ids of the last ``max_pending`` expired predictions are kept for that). A prediction still
waiting when the stream time passes its time plus the horizon is *unlabelled* (once); an outcome
still waiting then is *unmatched* (no prediction).

Bounded: each side keeps at most ``max_pending`` ids; beyond that the oldest (in arrival order)
is dropped and counted. A second prediction or outcome of one id replaces the first (the join is
an upsert; the latest wins).

Each record remembers whether the evaluator had read it before its last restart (``seen``: its
offset is below the committed one). A pair of two seen records was counted in a window already
written; the rebuild after a restart joins it again (to clear the state) but does not count it
(``Pair.counted``); nor are a seen record's expiry or lateness counted again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Prediction:
    """One prediction as the join needs it."""

    version: str
    value: float
    label: int | None
    time_ms: int
    seen: bool = False


@dataclass(frozen=True)
class Outcome:
    """One outcome (the true label or value) as the join needs it."""

    value: float
    time_ms: int
    seen: bool = False


@dataclass(frozen=True)
class Pair:
    """A prediction joined with its outcome."""

    prediction: Prediction
    outcome: Outcome

    @property
    def counted(self) -> bool:
        """False when both records were read before the last restart (counted already)."""
        return not (self.prediction.seen and self.outcome.seen)


@dataclass
class JoinCounts:
    """What the join counted since the last ``take_counts``."""

    unlabelled: dict[str, int] = field(default_factory=dict)  # by version
    unmatched: int = 0
    late: int = 0
    dropped_predictions: int = 0
    dropped_outcomes: int = 0


class JoinState:
    """Predictions waiting for outcomes and outcomes waiting for predictions, bounded."""

    def __init__(self, horizon_ms: int, max_pending: int) -> None:
        """Create an empty state.

        Raises:
            ValueError: a horizon or bound below 1.
        """
        if horizon_ms < 1 or max_pending < 1:
            raise ValueError("horizon_ms and max_pending must be at least 1")
        self.horizon_ms = horizon_ms
        self.max_pending = max_pending
        self.predictions: OrderedDict[str, Prediction] = OrderedDict()
        self.outcomes: OrderedDict[str, Outcome] = OrderedDict()
        #: Ids of expired predictions (whether each was seen), so a late outcome is known late.
        self.expired: OrderedDict[str, bool] = OrderedDict()
        self.now_ms = 0
        self.counts = JoinCounts()

    def _tick(self, time_ms: int) -> None:
        if time_ms > self.now_ms:
            self.now_ms = time_ms
            self.expire()

    def _unlabelled(self, p: Prediction) -> None:
        if not p.seen:  # a prediction read before the restart may have been counted already
            self.counts.unlabelled[p.version] = self.counts.unlabelled.get(p.version, 0) + 1

    def add_prediction(self, event_id: str, p: Prediction) -> Pair | None:
        """Add a prediction; the pair when its outcome was waiting."""
        waiting = self.outcomes.pop(event_id, None)
        self._tick(p.time_ms)
        if waiting is not None:
            return self._pair(p, waiting)
        self.predictions.pop(event_id, None)
        self.predictions[event_id] = p
        if len(self.predictions) > self.max_pending:
            self.predictions.popitem(last=False)
            self.counts.dropped_predictions += 1
        return None

    def add_outcome(self, event_id: str, o: Outcome) -> Pair | None:
        """Add an outcome; the pair when its prediction was waiting."""
        waiting = self.predictions.pop(event_id, None)  # before the expiry its time may cause
        self._tick(o.time_ms)
        if waiting is not None:
            return self._pair(waiting, o)
        if event_id in self.expired:
            seen = self.expired.pop(event_id)
            self.counts.late += not (seen and o.seen)
            return None
        self.outcomes.pop(event_id, None)
        self.outcomes[event_id] = o
        if len(self.outcomes) > self.max_pending:
            self.outcomes.popitem(last=False)
            self.counts.dropped_outcomes += 1
        return None

    def _pair(self, p: Prediction, o: Outcome) -> Pair | None:
        if o.time_ms - p.time_ms > self.horizon_ms:
            self.counts.late += not (p.seen and o.seen)
            self._unlabelled(p)
            return None
        return Pair(p, o)

    def expire(self) -> None:
        """Drop (and count) what waited longer than the horizon of stream time.

        In arrival order: the scan stops at the first record still inside the horizon.
        """
        limit = self.now_ms - self.horizon_ms
        while self.predictions:
            event_id, first = next(iter(self.predictions.items()))
            if first.time_ms >= limit:
                break
            self.predictions.popitem(last=False)
            self._unlabelled(first)
            self.expired[event_id] = first.seen
            if len(self.expired) > self.max_pending:
                self.expired.popitem(last=False)
        while self.outcomes:
            first_o = next(iter(self.outcomes.values()))
            if first_o.time_ms >= limit:
                break
            self.outcomes.popitem(last=False)
            self.counts.unmatched += not first_o.seen

    def take_counts(self) -> JoinCounts:
        """The counts since the last call, and reset them."""
        counts, self.counts = self.counts, JoinCounts()
        return counts
