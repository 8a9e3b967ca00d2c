"""Where ``evaluate --decide`` takes the versions it judges and carries its decisions out.

``decide.Rollout`` is the seam. Two implementations here:

- ``AliasPair``: a champion and a challenger alias of one model store or MLflow model
  (``model promote``/``model rollback``'s ``AliasStore``). Promote points the champion alias at
  the challenger's version (``store.promote``, history kept, so ``model rollback`` undoes it);
  roll back points the challenger alias at the champion's version (the canary's traffic goes
  back to the champion).
- ``FixedPair``: two versions given on the command line (``--champion``, ``--challenger``):
  decisions only (``--dry-run``); acting needs a store.

A rollout record with its own rule and traffic split (the rollouts issue) plugs in as another
``Rollout``.
"""

from __future__ import annotations

from stream_scorer.errors import ConfigError
from stream_scorer.model.store import AliasStore, promote


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
