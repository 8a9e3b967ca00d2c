"""Canary decisions: keep, promote or roll back a challenger, from live evidence. Pure.

The rule (``evaluate.decide``): compare the challenger's live ``metric`` with the champion's.
The *gap* is how much worse the challenger is (positive: worse), in the metric's units: for a
metric where lower is better (log loss, Brier, MAE, RMSE) ``challenger - champion``, else
(AUC, precision, recall) ``champion - challenger``.

- Fewer than ``min_outcomes`` outcomes for either version, or the metric undefined for either
  (AUC of a window with one class): **keep**, never act.
- gap > ``rollback_margin``: **rollback** (worse by more than the margin).
- gap <= ``promote_margin``: **promote** (no worse than the champion by more than the margin;
  a negative margin asks the challenger to be better).
- otherwise: **keep** (wait for more evidence).

``rollback_margin`` must be at least ``promote_margin`` (checked with the configuration), so
the two never overlap.

Drift (``max_prediction_psi``, off when None), judged first: **rollback** when the challenger's
prediction PSI (against the prediction reference packed with its version) exceeds its expected
no-drift noise for the window (``stages.drift.expected_psi``) by more than the bound. It needs
no outcomes (the point of a label-free trigger: it acts before the labels mature), but at least
``min_outcomes`` *predictions* of the challenger in the window, so a handful of predictions
never trips it. Without a reference (PSI None) there is no drift check.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, Protocol

from stream_scorer.evaluate.stats import LOWER_IS_BETTER

Action = Literal["keep", "promote", "rollback"]
KEEP: Final = "keep"
PROMOTE: Final = "promote"
ROLLBACK: Final = "rollback"


@dataclass(frozen=True)
class Rule:
    """When to promote or roll back a challenger."""

    metric: str
    min_outcomes: int
    promote_margin: float
    rollback_margin: float
    max_prediction_psi: float | None = None


@dataclass(frozen=True)
class Evidence:
    """One version's live metric over its latest window, and how many outcomes it rests on."""

    version: str
    n: int
    value: float | None
    predictions: int = 0
    """Predictions of the version in the window (joined or not)."""
    psi: float | None = None
    """PSI of those predictions against the version's packed reference (None: no reference)."""
    psi_expected: float = 0.0
    """The PSI expected of that many predictions when nothing drifted (the noise)."""


@dataclass(frozen=True)
class Decision:
    """What the rule says, and why."""

    action: Action
    champion: Evidence
    challenger: Evidence
    metric: str
    gap: float | None
    reason: str
    psi_bound: float | None = None


def decide(rule: Rule, champion: Evidence, challenger: Evidence) -> Decision:
    """Apply ``rule`` to the two versions' evidence (see the module doc)."""

    def made(action: Action, gap: float | None, reason: str) -> Decision:
        return Decision(
            action, champion, challenger, rule.metric, gap, reason, rule.max_prediction_psi
        )

    bound, psi = rule.max_prediction_psi, challenger.psi
    if bound is not None and psi is not None and challenger.predictions >= rule.min_outcomes:
        excess = psi - challenger.psi_expected
        if excess > bound:
            return made(
                ROLLBACK,
                None,
                f"prediction PSI {psi:.4g} exceeds its no-drift noise "
                f"{challenger.psi_expected:.2g} by {excess:.4g} > bound {bound} "
                f"({challenger.predictions} predictions)",
            )

    short = [e for e in (champion, challenger) if e.n < rule.min_outcomes]
    if short:
        return made(
            KEEP,
            None,
            f"version {short[0].version} has {short[0].n} outcomes, fewer than {rule.min_outcomes}",
        )
    if champion.value is None or challenger.value is None:
        which = champion if champion.value is None else challenger
        return made(KEEP, None, f"{rule.metric} is undefined for version {which.version}")
    if rule.metric in LOWER_IS_BETTER:
        gap = challenger.value - champion.value
    else:
        gap = champion.value - challenger.value
    if gap > rule.rollback_margin:
        return made(ROLLBACK, gap, f"worse by {gap:.6g} > rollback margin {rule.rollback_margin}")
    if gap <= rule.promote_margin:
        return made(PROMOTE, gap, f"worse by {gap:.6g} <= promote margin {rule.promote_margin}")
    return made(KEEP, gap, f"worse by {gap:.6g}: between the margins, waiting")


class Rollout(Protocol):
    """Where a decision is carried out: the seam to the rollout records.

    ``versions`` names the champion and the challenger being judged (None: no canary now);
    ``promote`` makes the challenger the champion; ``rollback`` sends the challenger's traffic
    back to the champion.
    """

    def versions(self) -> tuple[str, str] | None:
        """The (champion, challenger) versions of the current rollout, or None."""
        ...

    def promote(self) -> str:
        """Promote the challenger; a line saying what moved."""
        ...

    def rollback(self) -> str:
        """Roll the challenger back; a line saying what moved."""
        ...
