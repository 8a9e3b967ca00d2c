"""The model manifest: what a saved model expects and how to feed it.

A model directory holds the booster (UBJSON) and ``manifest.json``. The manifest names the
features in the booster's column order and, for each, the input field it comes from and the
transform that turns the field's value into a float. The worker needs nothing else to score a
schema it has never seen.

Example ``manifest.json``::

    {
      "format": 1,
      "model_version": "fraud-20261123-1a2b3c4d",
      "model_file": "model.ubj",
      "model_sha256": "…",
      "objective": "binary:logistic",
      "threshold": 0.5,
      "xgboost_version": "3.2.0",
      "features": [
        {"name": "amount", "field": "amount", "transform": "number"},
        {"name": "hour", "field": "created_at", "transform": "hour_of_day"},
        {"name": "age", "field": "customer.age", "transform": "number"},
        {"name": "channel", "field": "channel", "transform": "category",
         "categories": ["WEB", "POS", "APP"], "policy": {"unseen": "dead_letter"}},
        {"name": "items", "field": "items", "min": 1, "max": 500,
         "policy": {"missing": "dead_letter", "out_of_range": "pass"}}
      ],
      "value_policy": {"missing": "pass", "nan": "pass", "infinite": "dead_letter",
                       "out_of_range": "dead_letter", "unseen": "pass"},
      "metrics": {"validation": {"rmse": 1.0}},
      "created_at": "2026-11-23T12:00:00+00:00"
    }

A ``category`` feature's value is the position of the input's string (or enum symbol) in its
``categories`` (0, 1, 2, ...); any other value is *unseen*.

Value policies say what happens to a feature value that is *missing* (null or absent), *nan*,
*infinite* (or beyond float32's range), *out_of_range* (outside the feature's optional
``min``/``max``, inclusive; ``number`` features only) or *unseen* (``category`` features only):
``pass`` scores the record anyway (missing, NaN, infinite and unseen values reach the model as
NaN, which XGBoost treats as missing; an out-of-range value as itself), ``dead_letter`` rejects
it at the feature stage. The manifest-wide ``value_policy`` (default: missing, nan, unseen:
pass; infinite, out_of_range: dead_letter) applies to every feature; a feature's ``policy``
overrides some or all of it (``unseen`` only on a ``category`` feature). Manifests without
these fields load with the defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from stream_scorer.errors import ModelError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

#: Transforms a feature may use; see ``stages/features.py`` for their exact meaning.
TRANSFORMS = frozenset({"number", "category", "hour_of_day", "day_of_week"})
#: Objectives the worker knows how to turn into a prediction record.
REGRESSION_OBJECTIVES = frozenset(
    {"reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror", "reg:squaredlogerror"}
)
BINARY_OBJECTIVES = frozenset({"binary:logistic"})
OBJECTIVES = REGRESSION_OBJECTIVES | BINARY_OBJECTIVES
#: What a value policy does with a value: score it anyway, or dead-letter the record.
PASS = "pass"
DEAD_LETTER = "dead_letter"
POLICY_ACTIONS = frozenset({PASS, DEAD_LETTER})


def _check_actions(where: str, policy: Mapping[str, Any]) -> None:
    known = {f.name for f in fields(ValuePolicy)}
    for key, action in policy.items():
        if key not in known:
            raise ModelError(
                f"{where}: unknown value policy key {key!r} (known: {', '.join(sorted(known))})"
            )
        if action not in POLICY_ACTIONS:
            raise ModelError(
                f"{where}: policy {key!r} is {action!r}, not one of "
                f"{', '.join(sorted(POLICY_ACTIONS))}"
            )


@dataclass(frozen=True)
class ValuePolicy:
    """What to do with a feature's unusual values: ``pass`` or ``dead_letter`` each.

    Attributes:
        missing: the field is null or absent (reason ``missing_value``).
        nan: the value is NaN (reason ``nan_value``).
        infinite: the value is infinite or beyond float32's range (reason ``non_finite``).
        out_of_range: the value is outside the feature's ``min``/``max`` (reason
            ``out_of_range``).
        unseen: a ``category`` feature's value is not one of its ``categories`` (reason
            ``unseen_category``).
    """

    missing: str = PASS
    nan: str = PASS
    infinite: str = DEAD_LETTER
    out_of_range: str = DEAD_LETTER
    unseen: str = PASS

    def __post_init__(self) -> None:
        _check_actions("value policy", asdict(self))

    def merged(self, overrides: Mapping[str, str]) -> ValuePolicy:
        """Return this policy with ``overrides`` (some of its keys) applied."""
        return replace(self, **overrides) if overrides else self


@dataclass(frozen=True)
class FeatureSpec:
    """One model input column.

    Attributes:
        name: the feature's name, as the booster knows it.
        field: the input field it comes from (dots reach into nested records).
        transform: how the field's value becomes a float (one of ``TRANSFORMS``).
        categories: for ``category``: the symbols, whose position is the feature value (any
            other value is *unseen*: see ``ValuePolicy.unseen``).
        min: for ``number``: the smallest valid value (inclusive), or None.
        max: for ``number``: the largest valid value (inclusive), or None.
        policy: overrides of the manifest-wide value policy for this feature (keys of
            ``ValuePolicy``, values ``pass`` or ``dead_letter``).
        default_policy: the manifest-wide policy ``policy`` overrides; ``Manifest`` sets it
            (not part of equality).
    """

    name: str
    field: str
    transform: str = "number"
    categories: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    policy: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    default_policy: ValuePolicy = dataclasses.field(
        default_factory=ValuePolicy, compare=False, hash=False, repr=False
    )

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ModelError(
                f"feature {self.name!r}: unknown transform {self.transform!r} "
                f"(known: {', '.join(sorted(TRANSFORMS))})"
            )
        if self.transform == "category" and not self.categories:
            raise ModelError(f"feature {self.name!r}: transform 'category' needs categories")
        _check_actions(f"feature {self.name!r}", self.policy)
        if "unseen" in self.policy and self.transform != "category":
            raise ModelError(
                f"feature {self.name!r}: the 'unseen' policy applies to 'category' features only"
            )
        object.__setattr__(self, "policy", dict(self.policy))
        bounds = [b for b in (self.min, self.max) if b is not None]
        if bounds and self.transform != "number":
            raise ModelError(f"feature {self.name!r}: min/max apply to 'number' features only")
        if any(isinstance(b, bool) or not math.isfinite(b) for b in bounds):
            raise ModelError(f"feature {self.name!r}: min and max must be finite numbers")
        for key in ("min", "max"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, float(getattr(self, key)))
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ModelError(f"feature {self.name!r}: min {self.min} is above max {self.max}")

    @property
    def effective_policy(self) -> ValuePolicy:
        """The value policy that applies: the manifest's, with this feature's overrides."""
        return self.default_policy.merged(self.policy)


@dataclass(frozen=True)
class Manifest:
    """Everything the worker needs to know about a saved model."""

    model_version: str
    model_file: str
    model_sha256: str
    objective: str
    features: tuple[FeatureSpec, ...]
    xgboost_version: str
    threshold: float = 0.5
    metrics: Mapping[str, Any] = field(default_factory=dict)
    created_at: str = ""
    value_policy: ValuePolicy = field(default_factory=ValuePolicy)

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "features",
            tuple(replace(f, default_policy=self.value_policy) for f in self.features),
        )
        if self.objective not in OBJECTIVES:
            raise ModelError(
                f"objective {self.objective!r} is not supported "
                f"(supported: {', '.join(sorted(OBJECTIVES))})"
            )
        if not self.features:
            raise ModelError("manifest lists no features")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ModelError("manifest lists a feature name twice")
        if not 0.0 < self.threshold < 1.0:
            raise ModelError(f"threshold {self.threshold} is not strictly between 0 and 1")

    @property
    def is_binary(self) -> bool:
        """Whether the model is a binary classifier (prediction is a probability)."""
        return self.objective in BINARY_OBJECTIVES

    @property
    def feature_names(self) -> list[str]:
        """Feature names in the booster's column order."""
        return [f.name for f in self.features]


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _bound(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelError(f"manifest feature {raw.get('name')!r}: {key} {value!r} is not a number")
    return float(value)


def _policy_from_json(where: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ModelError(f"{where}: the value policy must be a JSON object, not {raw!r}")
    return {str(k): str(v) for k, v in raw.items()}


def _value_policy_from_json(raw: Any) -> ValuePolicy:
    policy = _policy_from_json("manifest value_policy", raw)
    _check_actions("manifest value_policy", policy)
    return ValuePolicy(**policy)


def _feature_from_json(raw: Mapping[str, Any]) -> FeatureSpec:
    try:
        return FeatureSpec(
            name=str(raw["name"]),
            field=str(raw["field"]),
            transform=str(raw.get("transform", "number")),
            categories=tuple(str(c) for c in raw.get("categories", ())),
            min=_bound(raw, "min"),
            max=_bound(raw, "max"),
            policy=_policy_from_json(f"feature {raw['name']!r}", raw.get("policy", {})),
        )
    except KeyError as exc:
        raise ModelError(f"manifest feature {dict(raw)!r} lacks {exc.args[0]!r}") from exc


def manifest_from_dict(raw: Mapping[str, Any]) -> Manifest:
    """Build a ``Manifest`` from its JSON form, rejecting what does not fit."""
    if raw.get("format") != MANIFEST_FORMAT:
        raise ModelError(f"manifest format {raw.get('format')!r} is not {MANIFEST_FORMAT}")
    try:
        features: Sequence[Mapping[str, Any]] = raw["features"]
        return Manifest(
            model_version=str(raw["model_version"]),
            model_file=str(raw["model_file"]),
            model_sha256=str(raw["model_sha256"]),
            objective=str(raw["objective"]),
            features=tuple(_feature_from_json(f) for f in features),
            xgboost_version=str(raw["xgboost_version"]),
            threshold=float(raw.get("threshold", 0.5)),
            metrics=dict(raw.get("metrics", {})),
            created_at=str(raw.get("created_at", "")),
            value_policy=_value_policy_from_json(raw.get("value_policy", {})),
        )
    except KeyError as exc:
        raise ModelError(f"manifest lacks {exc.args[0]!r}") from exc


def read_manifest(model_dir: Path) -> Manifest:
    """Read and validate ``manifest.json`` in ``model_dir``."""
    path = model_dir / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"no manifest at {path}: train a model first") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read manifest {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"manifest {path} is not a JSON object")
    return manifest_from_dict(raw)


def _feature_to_json(spec: FeatureSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": spec.name, "field": spec.field, "transform": spec.transform}
    if spec.categories:
        out["categories"] = list(spec.categories)
    for key in ("min", "max"):
        if getattr(spec, key) is not None:
            out[key] = getattr(spec, key)
    if spec.policy:
        out["policy"] = dict(spec.policy)
    return out


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``manifest.json`` in ``model_dir`` and return its path."""
    body = asdict(manifest)
    body["features"] = [_feature_to_json(f) for f in manifest.features]
    body = {"format": MANIFEST_FORMAT, **body}
    path = model_dir / MANIFEST_FILE
    path.write_text(json.dumps(body, indent=2, default=list) + "\n", encoding="utf-8")
    return path
