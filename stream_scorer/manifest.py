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
         "categories": ["WEB", "POS", "APP"]}
      ],
      "metrics": {"validation": {"rmse": 1.0}},
      "created_at": "2026-11-23T12:00:00+00:00"
    }
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stream_scorer.errors import ModelError

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1

#: Transforms a feature may use; see ``features.py`` for their exact meaning.
TRANSFORMS = frozenset({"number", "category", "hour_of_day", "day_of_week"})
#: Objectives the worker knows how to turn into a prediction record.
REGRESSION_OBJECTIVES = frozenset(
    {"reg:squarederror", "reg:absoluteerror", "reg:pseudohubererror", "reg:squaredlogerror"}
)
BINARY_OBJECTIVES = frozenset({"binary:logistic"})
OBJECTIVES = REGRESSION_OBJECTIVES | BINARY_OBJECTIVES


@dataclass(frozen=True)
class FeatureSpec:
    """One model input column.

    Attributes:
        name: the feature's name, as the booster knows it.
        field: the input field it comes from (dots reach into nested records).
        transform: how the field's value becomes a float (one of ``TRANSFORMS``).
        categories: for ``category``: the symbols, whose position is the feature value.
    """

    name: str
    field: str
    transform: str = "number"
    categories: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ModelError(
                f"feature {self.name!r}: unknown transform {self.transform!r} "
                f"(known: {', '.join(sorted(TRANSFORMS))})"
            )
        if self.transform == "category" and not self.categories:
            raise ModelError(f"feature {self.name!r}: transform 'category' needs categories")


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

    def __post_init__(self) -> None:
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


def _feature_from_json(raw: Mapping[str, Any]) -> FeatureSpec:
    try:
        return FeatureSpec(
            name=str(raw["name"]),
            field=str(raw["field"]),
            transform=str(raw.get("transform", "number")),
            categories=tuple(str(c) for c in raw.get("categories", ())),
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


def write_manifest(model_dir: Path, manifest: Manifest) -> Path:
    """Write ``manifest`` as ``manifest.json`` in ``model_dir`` and return its path."""
    body = asdict(manifest)
    body["features"] = [
        {k: v for k, v in asdict(f).items() if not (k == "categories" and not v)}
        for f in manifest.features
    ]
    body = {"format": MANIFEST_FORMAT, **body}
    path = model_dir / MANIFEST_FILE
    path.write_text(json.dumps(body, indent=2, default=list) + "\n", encoding="utf-8")
    return path
