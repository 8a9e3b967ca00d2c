"""Rollout records: which versions of a model score live traffic, with which weights.

A rollout belongs to an alias (``champion`` by default) of a model store or an MLflow registered
model. The alias stays the champion (``promote``/``rollback`` move it, other tools read it as
before); the rollout record beside it names the challengers and their share of the keys:

- **canary**: one challenger at P percent;
- **A/B**: weights over two or more versions summing to 100 (the champion may be one of them;
  its weight is what the challengers leave);
- **blue-green**: one challenger at 100 percent, the champion loaded and warm beside it, so
  ``rollback`` switches every key back at one batch boundary.

Where it lives: a model store writes ``<root>/<name>/aliases/<alias>.rollout.json`` atomically
(and appends every change to ``<alias>.rollout.log``, JSON lines); MLflow keeps it in the
registered-model tag ``stream_scorer.rollout.<alias>`` (one JSON value: a tag write replaces it
whole, and ``registered-models/get`` returns aliases and tags in one answer).

The record, version 1 (``FORMAT``)::

    {"format": "stream-scorer.rollout", "version": 1, "mode": "canary",
     "champion": "3", "challengers": [{"version": "4", "percent": 10.0}],
     "changed_at": "2026-12-07T00:10:00Z", "changed_by": "ana@ops-1 (model rollout)"}

It is validated on read (``parse``): a record that is not this raises ``RolloutError``. A worker
then keeps the split in force (``stream_scorer_rollout_unreadable`` = 1, one error line) and
does not crash; at start-up it scores with the champion alone. A record whose ``champion`` is
not the version the alias points at is stale (the alias moved since): the champion alone scores.
"""

from __future__ import annotations

import getpass
import json
import math
import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from stream_scorer.errors import RolloutError

FORMAT: Final = "stream-scorer.rollout"
SCHEMA_VERSION: Final = 1
MODES: Final = ("canary", "ab", "blue-green")
#: The smallest weight step, in percent: one of ``stages.route.BUCKETS`` (not imported here: the
#: command line reads records without loading the scoring stages).
STEP: Final = 0.01


@dataclass(frozen=True)
class Split:
    """What a worker routes by: the champion and the challengers' percents (no rollout: none).

    Attributes:
        champion: the version the alias points at (scores every key no challenger takes).
        challengers: ``(version, percent)`` in bucket order.
    """

    champion: str
    challengers: tuple[tuple[str, float], ...] = ()

    @property
    def versions(self) -> tuple[str, ...]:
        """The challengers' versions, then the champion's (the order ``RoutedPipeline`` takes)."""
        return (*(v for v, _ in self.challengers), self.champion)

    def weights(self) -> dict[str, float]:
        """Percent of keys per version: the champion first (what the challengers leave)."""
        out = {self.champion: round(100 - sum(p for _, p in self.challengers), 4)}
        for version, percent in self.challengers:
            out[version] = out.get(version, 0.0) + percent
        return out

    def describe(self) -> str:
        """``3 90%, 4 10%`` (champion first)."""
        return ", ".join(f"{v} {w:g}%" for v, w in self.weights().items())


@dataclass(frozen=True)
class Rollout:
    """A rollout record (module doc)."""

    mode: str
    champion: str
    challengers: tuple[tuple[str, float], ...]
    changed_at: str = ""
    changed_by: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def split(self) -> Split:
        """The split this record asks for."""
        return Split(self.champion, self.challengers)

    def to_json(self) -> str:
        """The record as stored (one line of JSON)."""
        return json.dumps(
            {
                "format": FORMAT,
                "version": SCHEMA_VERSION,
                "mode": self.mode,
                "champion": self.champion,
                "challengers": [{"version": v, "percent": p} for v, p in self.challengers],
                "changed_at": self.changed_at,
                "changed_by": self.changed_by,
            },
            sort_keys=True,
        )


def _fail(where: str, why: str) -> RolloutError:
    return RolloutError(f"rollout record {where}: {why}")


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(where, f"percent {value!r} is not a number")
    if not 0 <= value <= 100:
        raise _fail(where, f"percent {value} is not between 0 and 100")
    if abs(round(value / STEP) * STEP - value) > 1e-9:
        raise _fail(where, f"percent {value}: use steps of {STEP:g}")
    return float(value)


def validate(mode: str, champion: str, challengers: list[tuple[str, float]], where: str) -> None:
    """Raise ``RolloutError`` unless these make a valid rollout (see ``parse``)."""
    if mode not in MODES:
        raise _fail(where, f"mode {mode!r} is none of {', '.join(MODES)}")
    if not champion:
        raise _fail(where, "no champion version")
    versions = [v for v, _ in challengers]
    if not challengers:
        raise _fail(where, "no challenger (rollback ends a rollout)")
    if champion in versions or len(set(versions)) != len(versions):
        raise _fail(where, f"a version is listed twice: champion {champion}, {versions}")
    total = sum(p for _, p in challengers)
    if total > 100 + 1e-9:
        raise _fail(where, f"challengers' percents sum to {total:g} > 100")
    if mode == "canary" and len(challengers) != 1:
        raise _fail(where, "a canary has one challenger")
    if mode == "blue-green" and (len(challengers) != 1 or challengers[0][1] != 100):
        raise _fail(where, "blue-green has one challenger at 100 percent")


def parse(text: str, where: str) -> Rollout:
    """Read and validate a stored record.

    Raises:
        RolloutError: not JSON, another format or version, a missing or wrong field, percents
            out of range or summing to more than 100, a version listed twice.
    """
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(where, f"not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise _fail(where, "not a JSON object")
    if raw.get("format") != FORMAT:
        raise _fail(where, f"format {raw.get('format')!r} is not {FORMAT!r}")
    if raw.get("version") != SCHEMA_VERSION:
        raise _fail(
            where,
            f"record version {raw.get('version')!r}: this stream-scorer reads version "
            f"{SCHEMA_VERSION} (written by a newer one?)",
        )
    champion = raw.get("champion")
    if not isinstance(champion, str):
        raise _fail(where, f"champion {champion!r} is not a version string")
    entries = raw.get("challengers")
    if not isinstance(entries, list):
        raise _fail(where, "challengers is not a list")
    challengers = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("version"), str):
            raise _fail(where, f"challengers[{i}] is not {{'version': str, 'percent': number}}")
        challengers.append(
            (entry["version"], _percent(entry.get("percent"), f"{where} challengers[{i}]"))
        )
    mode = raw.get("mode")
    if not isinstance(mode, str):
        raise _fail(where, f"mode {mode!r} is not a string")
    validate(mode, champion, challengers, where)
    known = {"format", "version", "mode", "champion", "challengers", "changed_at", "changed_by"}
    return Rollout(
        mode,
        champion,
        tuple(challengers),
        str(raw.get("changed_at", "")),
        str(raw.get("changed_by", "")),
        {k: v for k, v in raw.items() if k not in known},
    )


def who() -> str:
    """``user@host`` of the process making a change (for ``changed_by``)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def make(mode: str, champion: str, challengers: list[tuple[str, float]], by: str) -> Rollout:
    """A new record, stamped now, validated.

    Raises:
        RolloutError: the weights do not make a valid rollout.
    """
    checked = [(v, _percent(p, "to write")) for v, p in challengers]
    validate(mode, champion, checked, "to write")
    now = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return Rollout(mode, champion, tuple(checked), now, by)


def parse_weights(text: str) -> list[tuple[str, float]]:
    """``V1=50,V2=50`` as ``[(V1, 50.0), (V2, 50.0)]``.

    Raises:
        RolloutError: not ``VERSION=PERCENT`` pairs.
    """
    out = []
    for part in text.split(","):
        version, sep, value = part.strip().partition("=")
        if not sep or not version:
            raise RolloutError(f"weights {text!r}: give VERSION=PERCENT,VERSION=PERCENT")
        try:
            percent = float(value)
        except ValueError:
            raise RolloutError(f"weights {text!r}: {value!r} is not a number") from None
        out.append((version.strip(), percent))
    return out
