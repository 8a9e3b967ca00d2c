"""Bring your own model: ``model pack`` and ``model check``, and the training-side features.

``pack`` turns a saved XGBoost booster (UBJSON or JSON; the legacy binary format only with an
XGBoost before 3.1, which still reads it), the input
schema and a feature mapping into a model directory the worker loads: the booster re-saved as
``model.ubj`` and a ``manifest.json`` with its version, sha256, objective, XGBoost version and
features. Checked on the way: the mapping's feature names against the booster's (names and
count), each feature's field and type against the schema; with a training sample (an Avro
container file, a CSV file, or Parquet when pyarrow is installed), reference bins per feature
and for the predictions go into the manifest (``reference``). Every mismatch is a ``ModelError``
or ``SchemaError`` naming the feature.

``check`` runs the worker's own checks on a model directory, offline: manifest, sha256, the
booster's features against the manifest, the fields against the schema, a warm-up batch.

``training_matrix`` is the worker's feature builder for training scripts: records as the worker
decodes them (dicts; timestamps as datetimes or epoch milliseconds, enums as symbols) in, the
float32 matrix the worker scores out, with the rows the worker would dead-letter marked.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import xgboost as xgb
import yaml

from stream_scorer.contracts.manifest import (
    OBJECTIVES,
    FeatureSpec,
    Manifest,
    ValuePolicy,
    manifest_from_dict,
    sha256_file,
    write_manifest,
)
from stream_scorer.errors import ModelError, SchemaError
from stream_scorer.stages.features import FeatureBuilder, RejectedRow, check_schema
from stream_scorer.stages.fields import base_type, resolve
from stream_scorer.stages.score import compare_features

MODEL_FILE: Final = "model.ubj"
#: Bins of a numeric feature's reference distribution (quantiles of the sample).
REFERENCE_BINS: Final = 10


# --- the training side ----------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingMatrix:
    """What the worker would make of a set of records.

    Attributes:
        matrix: one float32 row per record, in the features' order (NaN: missing).
        kept: True where the worker would score the record, False where it would
            dead-letter it (its row is NaN-filled: drop it with ``matrix[kept]``).
        rejected: why each dropped row would be a dead letter.
    """

    matrix: npt.NDArray[np.float32]
    kept: npt.NDArray[np.bool_]
    rejected: list[RejectedRow]


def training_matrix(
    records: Sequence[Mapping[str, Any]], features: Sequence[FeatureSpec] | Manifest
) -> TrainingMatrix:
    """Build the matrix the worker builds for ``records`` (see the module doc)."""
    specs = features.features if isinstance(features, Manifest) else tuple(features)
    matrix, rejected = FeatureBuilder(specs).build(records)
    kept = np.ones(len(records), dtype=np.bool_)
    kept[[r.index for r in rejected]] = False
    return TrainingMatrix(matrix, kept, rejected)


# --- the booster ----------------------------------------------------------------------------


def load_booster(path: Path) -> xgb.Booster:
    """Load a saved booster (UBJSON or JSON; the legacy binary format where XGBoost reads it).

    Raises:
        ModelError: the file is missing or XGBoost cannot read it (a legacy binary file that the
            installed XGBoost no longer reads: the message says how to convert it).
    """
    if not path.is_file():
        raise ModelError(f"no booster file at {path}")
    with path.open("rb") as fh:
        head = fh.read(64).lstrip()
    legacy = not head.startswith(b"{")  # UBJSON and JSON models both open an object
    if legacy and _version(xgb.__version__) >= (3, 1):
        raise ModelError(
            f"{path} is in XGBoost's legacy binary format, which XGBoost 3.1 and later "
            f"(installed: {xgb.__version__}) cannot read: load it with XGBoost 3.0 or older and "
            "save it again as UBJSON (booster.save_model('model.ubj'))"
        )
    try:
        return xgb.Booster(model_file=str(path))
    except xgb.core.XGBoostError as exc:
        raise ModelError(f"xgboost cannot load {path}: {exc}") from exc


def _version(text: str) -> tuple[int, int]:
    major, minor = [*text.split("."), "0", "0"][:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def booster_objective(booster: xgb.Booster) -> str:
    """The objective the booster was trained with."""
    config = json.loads(booster.save_config())
    return str(config["learner"]["objective"]["name"])


# --- the feature mapping --------------------------------------------------------------------


def parse_feature_flag(text: str) -> dict[str, Any]:
    """``NAME=FIELD[:TRANSFORM[:CAT1,CAT2,...]]`` (a ``--feature`` flag) as a mapping entry."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ModelError(f"--feature {text!r}: write NAME=FIELD[:TRANSFORM[:CATEGORIES]]")
    field, _, rest = rest.partition(":")
    transform, _, cats = rest.partition(":")
    entry: dict[str, Any] = {"name": name, "field": field, "transform": transform or "number"}
    if cats:
        entry["categories"] = cats.split(",")
    return entry


def read_mapping(path: Path) -> dict[str, Any]:
    """Read a feature mapping file (YAML).

    Its keys: ``features`` (a list of manifest feature entries), optionally ``value_policy``
    and ``threshold``.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read the feature mapping {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("features"), list):
        raise ModelError(f"{path}: needs a 'features' list")
    unknown = set(raw) - {"features", "value_policy", "threshold"}
    if unknown:
        raise ModelError(f"{path}: unknown key {sorted(unknown)[0]!r}")
    return raw


def default_mapping(booster: xgb.Booster, schema: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Map each booster feature to the input field of its name.

    An enum field gives a ``category`` feature (its symbols in order), any other a ``number``.

    Raises:
        ModelError: the booster has no feature names.
    """
    names = list(booster.feature_names or [])
    if not names:
        raise ModelError("the booster has no feature names: give --feature flags or --features")
    out = []
    for name in names:
        entry: dict[str, Any] = {"name": name, "field": name, "transform": "number"}
        try:
            types = resolve(schema, name)
        except SchemaError as exc:
            raise ModelError(f"feature {name!r}: {exc}; map it with --feature") from None
        enums = [t for t in types if base_type(t) == "enum"]
        if enums:
            entry.update(transform="category", categories=list(enums[0]["symbols"]))
        out.append(entry)
    return out


# --- samples and reference bins -------------------------------------------------------------


def _csv_value(text: str, types: list[Any]) -> Any:
    if text == "":
        return None
    kinds = {base_type(t) for t in types}
    if kinds & {"int", "long"}:
        try:
            return int(text)
        except ValueError:
            pass
    if kinds & {"float", "double", "int", "long"}:
        try:
            return float(text)
        except ValueError:
            pass
    if "boolean" in kinds and text.lower() in ("true", "false", "1", "0"):
        return text.lower() in ("true", "1")
    return text


def read_sample(
    path: Path, schema: Mapping[str, Any], fields: Iterable[str]
) -> list[dict[str, Any]]:
    """Read the records of a training sample.

    An Avro container file (``.avro``), CSV (``.csv``: a header row, dotted column names for
    nested fields, values typed by the schema) or Parquet (``.parquet``, when pyarrow is
    installed).
    """
    suffix = path.suffix.lower()
    try:
        if suffix in (".avro", ".avro-container"):
            import fastavro

            with path.open("rb") as fh:
                return [dict(r) for r in fastavro.reader(fh) if isinstance(r, dict)]
        if suffix == ".csv":
            wanted = {f: resolve(schema, f) for f in fields}
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
            return [_nest({k: _csv_value(r.get(k, ""), wanted[k]) for k in wanted}) for r in rows]
        if suffix == ".parquet":
            try:
                import pyarrow.parquet as pq  # type: ignore[import-not-found, unused-ignore]
            except ImportError:
                raise ModelError(
                    f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
                ) from None
            return [_nest(r) for r in pq.read_table(path).to_pylist()]
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the sample {path}: {exc}") from exc
    raise ModelError(f"sample {path}: give an Avro container file (.avro), .csv or .parquet")


def _nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}`` (dotted CSV columns reach nested fields)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def reference_bins(values: npt.NDArray[Any], categorical: int = 0) -> dict[str, Any]:
    """A distribution to compare live data with (PSI): bin edges and the share per bin.

    Numeric: ``edges`` (inner quantile edges of the finite values), ``shares`` (one per bin,
    ``len(edges) + 1`` bins), ``missing`` (the share of NaN). Categorical (``categorical``
    categories): ``shares`` per category index and ``missing`` (NaN: unseen or missing).
    """
    values = np.asarray(values, dtype=np.float64)
    n = max(len(values), 1)
    finite = values[np.isfinite(values)]
    missing = round(1.0 - len(finite) / n, 6)
    if categorical:
        counts = np.bincount(finite.astype(np.int64), minlength=categorical)[:categorical]
        return {"shares": [round(c / n, 6) for c in counts.tolist()], "missing": missing}
    if len(finite) == 0:
        return {"edges": [], "shares": [0.0], "missing": missing}
    qs = np.quantile(finite, np.linspace(0, 1, REFERENCE_BINS + 1)[1:-1])
    edges = sorted({round(float(q), 6) for q in qs})
    counts = np.bincount(np.searchsorted(edges, finite, side="right"), minlength=len(edges) + 1)
    return {
        "edges": edges,
        "shares": [round(c / n, 6) for c in counts.tolist()],
        "missing": missing,
    }


def reference_of(
    booster: xgb.Booster, features: Sequence[FeatureSpec], records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Reference bins per feature and for the predictions, from a training sample."""
    built = training_matrix(records, features)
    matrix = built.matrix[built.kept]
    if len(matrix) == 0:
        raise ModelError("the sample has no record the worker would score")
    out: dict[str, Any] = {"rows": len(matrix), "features": {}}
    for j, spec in enumerate(features):
        cats = len(spec.categories) if spec.transform == "category" else 0
        out["features"][spec.name] = reference_bins(matrix[:, j], cats)
    predictions = np.asarray(booster.inplace_predict(matrix), dtype=np.float64).reshape(-1)
    out["prediction"] = reference_bins(predictions)
    return out


# --- pack and check -------------------------------------------------------------------------


def pack(
    booster_path: Path,
    schema: Mapping[str, Any],
    out_dir: Path,
    *,
    mapping: Mapping[str, Any] | None = None,
    version: str = "",
    sample: Path | None = None,
    threshold: float | None = None,
) -> Manifest:
    """Write a model directory from a booster, the input schema and a feature mapping.

    Args:
        booster_path: the saved booster.
        schema: the parsed input schema.
        out_dir: the model directory to write (created; files in it are replaced).
        mapping: ``features`` (manifest feature entries), optional ``value_policy`` and
            ``threshold``; None: ``default_mapping``.
        version: the model version (default ``<out_dir name>-<date>-<sha256[:8]>``).
        sample: a training sample for the reference bins.
        threshold: binary classifiers' label threshold (default: the mapping's, else 0.5).

    Raises:
        ModelError: the booster, mapping or sample do not fit (naming the feature).
        SchemaError: a feature's field is not in the schema or has the wrong type.
    """
    booster = load_booster(booster_path)
    objective = booster_objective(booster)
    if objective not in OBJECTIVES:
        raise ModelError(
            f"objective {objective!r} is not one the worker scores "
            f"({', '.join(sorted(OBJECTIVES))})"
        )
    mapping = dict(mapping or {"features": default_mapping(booster, schema)})
    entries = list(mapping.get("features") or [])
    policy = mapping.get("value_policy") or {}
    probe = manifest_from_dict(  # the entries' own rules, with the manifest's messages
        {
            "format": 1,
            "model_version": "probe",
            "model_file": MODEL_FILE,
            "model_sha256": "",
            "objective": objective,
            "xgboost_version": xgb.__version__,
            "features": entries,
            "value_policy": policy,
        }
    )
    features = probe.features
    compare_features(booster, [f.name for f in features])
    check_schema(features, schema)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    booster.save_model(str(path))
    digest = sha256_file(path)
    now = datetime.now(UTC)
    reference: dict[str, Any] = {}
    if sample is not None:
        records = read_sample(sample, schema, [f.field for f in features])
        reference = reference_of(booster, features, records)
    manifest = Manifest(
        model_version=version or f"{out_dir.name}-{now:%Y%m%d}-{digest[:8]}",
        model_file=MODEL_FILE,
        model_sha256=digest,
        objective=objective,
        features=features,
        xgboost_version=xgb.__version__,
        threshold=float(mapping.get("threshold", 0.5) if threshold is None else threshold),
        created_at=now.isoformat(timespec="seconds"),
        value_policy=probe.value_policy if policy else ValuePolicy(),
        reference=reference,
    )
    write_manifest(out_dir, manifest)
    return manifest


def check(model_dir: Path, schema: Mapping[str, Any]) -> Manifest:
    """Run the worker's start-up checks on a model directory (see the module doc).

    Raises:
        ModelError: manifest, sha256, booster features or the warm-up batch (naming the feature).
        SchemaError: a feature's field is not in the schema or has the wrong type.
    """
    from stream_scorer.stages.score import Scorer, warm_up  # the worker's own warm-up

    scorer = Scorer(model_dir)
    check_schema(scorer.manifest.features, schema)
    warm_up(scorer)
    return scorer.manifest


def reference_counts(
    reference: Mapping[str, Any], values: npt.NDArray[Any]
) -> npt.NDArray[np.int64]:
    """How many of ``values`` fall in each bin of ``reference`` (``reference_bins``).

    The last count is of the missing (NaN) values; counts add up batch by batch, for
    ``population_stability``.
    """
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    shares = reference.get("shares", [])
    if "edges" in reference:
        bins = np.searchsorted(np.asarray(reference["edges"], dtype=np.float64), finite, "right")
    else:  # categorical: the category's index
        bins = finite.astype(np.int64)
        bins = bins[(bins >= 0) & (bins < len(shares))]
    counts = np.bincount(bins, minlength=len(shares))[: len(shares)]
    return np.append(counts, len(values) - len(finite)).astype(np.int64)


#: The share given to an empty bin in ``population_stability`` (no log of zero).
PSI_FLOOR: Final = 1e-4


def population_stability(reference: Mapping[str, Any], counts: npt.NDArray[Any]) -> float:
    """The population stability index of ``counts`` (``reference_counts``) against ``reference``.

    ``sum((live - ref) * ln(live / ref))`` over the bins and the missing share, each share
    floored at ``PSI_FLOOR``; 0 is no shift, above 0.25 is commonly read as a large one.
    The one home of the PSI: pure numpy, for ``model compare`` and any drift check.
    """
    ref = np.append(np.asarray(reference.get("shares", []), dtype=np.float64),
                    float(reference.get("missing", 0.0)))  # fmt: skip
    total = float(np.sum(counts))
    if total == 0 or len(ref) != len(counts):
        return 0.0
    live = np.maximum(np.asarray(counts, dtype=np.float64) / total, PSI_FLOOR)
    ref = np.maximum(ref, PSI_FLOOR)
    return float(np.sum((live - ref) * np.log(live / ref)))
