"""Where ``evaluate --decide`` takes the versions it judges and carries its decisions out.

``decide.Rollout`` is the seam. Three implementations here:

- ``RolloutCanary``: the rollout record of one alias (``model rollout --canary``,
  docs/manual/rollouts.md), the default: it judges the record's one challenger against its
  champion; promote is ``model promote`` of the challenger (the alias moves, the rollout ends),
  roll back is ``model rollback`` (the rollout ends: 100% champion at once).
- ``AliasPair``: a champion and a challenger alias of one model store or MLflow model
  (``model promote``/``model rollback``'s ``AliasStore``). Promote points the champion alias at
  the challenger's version (``store.promote``, history kept, so ``model rollback`` undoes it);
  roll back points the challenger alias at the champion's version (the canary's traffic goes
  back to the champion).
- ``FixedPair``: two versions given on the command line (``--champion``, ``--challenger``):
  decisions only (``--dry-run``); acting needs a store.

"""

from __future__ import annotations

from stream_scorer.errors import ConfigError
from stream_scorer.model.store import AliasStore, promote, read_rollout, rollback


class RolloutCanary:
    """The canary of one alias's rollout record: its one challenger against its champion."""

    def __init__(self, store: AliasStore, alias: str) -> None:
        """Judge the rollout record of ``alias`` in ``store``."""
        self.store = store
        self.alias = alias

    def versions(self) -> tuple[str, str] | None:
        """(champion, challenger) of the record in force; None: no rollout of one challenger.

        An A/B split over several challengers is not judged (a rule compares two versions).

        Raises:
            RolloutError: the record is malformed.
        """
        rollout = read_rollout(self.store, self.alias)
        if rollout is None or len(rollout.challengers) != 1:
            return None
        return rollout.champion, rollout.challengers[0][0]

    def _pair(self) -> tuple[str, str]:
        pair = self.versions()
        if pair is None:
            raise ConfigError(
                "evaluate.decide.champion_alias",
                f"{self.store.describe()}@{self.alias} has no rollout of one challenger in force",
            )
        return pair

    def promote(self) -> str:
        """``model promote`` the challenger: the alias moves to it and the rollout ends."""
        move = promote(self.store, self._pair()[1], self.alias)
        return f"{self.store.describe()}@{move.alias}: {move.before or '(unset)'} -> {move.after}"

    def rollback(self) -> str:
        """``model rollback``: the rollout ends, every key back on the champion at once."""
        self._pair()
        move = rollback(self.store, self.alias)
        return f"{self.store.describe()}@{move.alias}: rollout ended, {move.after} scores every key"


class AliasPair:
    """The champion/challenger alias pair of one model in a store."""

    def __init__(self, store: AliasStore, champion_alias: str, challenger_alias: str) -> None:
        """Judge ``challenger_alias``'s version against ``champion_alias``'s."""
        self.store = store
        self.champion_alias = champion_alias
        self.challenger_alias = challenger_alias

    def versions(self) -> tuple[str, str] | None:
        """The aliases' versions now (None when either is unset)."""
        champion = self.store.get_alias(self.champion_alias)
        challenger = self.store.get_alias(self.challenger_alias)
        if champion is None or challenger is None:
            return None
        return champion, challenger

    def _move(self, alias: str, version: str) -> str:
        move = promote(self.store, version, alias)
        return f"{self.store.describe()}@{move.alias}: {move.before or '(unset)'} -> {move.after}"

    def promote(self) -> str:
        """Point the champion alias at the challenger's version."""
        pair = self.versions()
        if pair is None:
            raise ConfigError("evaluate.decide", "the champion or challenger alias is not set")
        return self._move(self.champion_alias, pair[1])

    def rollback(self) -> str:
        """Point the challenger alias back at the champion's version."""
        pair = self.versions()
        if pair is None:
            raise ConfigError("evaluate.decide", "the champion or challenger alias is not set")
        return self._move(self.challenger_alias, pair[0])


class FixedPair:
    """Two versions named on the command line: decisions only."""

    def __init__(self, champion: str, challenger: str) -> None:
        """Judge ``challenger`` against ``champion``."""
        self.pair = (champion, challenger)

    def versions(self) -> tuple[str, str] | None:
        """The two versions."""
        return self.pair

    def promote(self) -> str:
        """Refused: nothing to move."""
        raise ConfigError("--champion", "acting on a decision needs evaluate.decide.store")

    def rollback(self) -> str:
        """Refused: nothing to move."""
        raise ConfigError("--champion", "acting on a decision needs evaluate.decide.store")
