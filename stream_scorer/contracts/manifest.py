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

The file is declared as frozen pydantic dataclasses (``ValuePolicy``, ``FeatureSpec``,
``Manifest``; ``manifest_json_schema()`` is its JSON Schema): an unknown key, a missing required
key, a value of the wrong type or a failed check raises ``ModelError`` naming the key's path,
e.g. ``manifest: features[3].policy.unseen: applies to 'category' features only``. Building
the classes in code checks the same rules and raises the same error.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar, get_args

from pydantic import (
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Strict,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic.dataclasses import dataclass
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import ErrorDetails, PydanticCustomError, core_schema

from stream_scorer.errors import ModelError

MANIFEST_FILE = "manifest.json"
#: The layout this version reads and writes: the value of the file's required ``format`` key.
MANIFEST_FORMAT: Final = 1

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


# --- value types: what the file may hold, declared once ------------------------------------------


@dataclasses.dataclass(frozen=True)
class _OneOf:
    """Annotation: the value must be one of ``choices``; ``key``: the value is a JSON key."""

    choices: frozenset[Any]
    key: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(schema)
        out["enum"] = sorted(self.choices)
        return out

    def _check(self, value: Any) -> Any:
        if value in self.choices:
            return value
        known = ", ".join(str(c) for c in sorted(self.choices))
        if self.key:
            raise PydanticCustomError(
                "unknown_key", "unknown key (known: {known})", {"known": known}
            )
        one_of = "" if len(self.choices) == 1 else "one of "
        raise PydanticCustomError(
            "not_one_of",
            f"must be {one_of}{{known}}, got {{got}}",
            {"known": known, "got": repr(value)},
        )


#: ``pass`` or ``dead_letter``.
Action = Annotated[str, _OneOf(POLICY_ACTIONS)]
#: A number: an integer is read as a float; true/false, strings, NaN and infinities are refused.
Number = Annotated[float, Strict()]


class _Invalid(ValueError):
    """A check on a whole feature or manifest failed.

    Attributes:
        key: the offending key's path inside the feature or manifest.
    """

    def __init__(self, key: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.key = key


#: Unknown keys refused, no NaN or infinity where a number is declared, no input in the text of
#: a chained ValidationError; the attribute docstrings are the JSON Schema's descriptions.
_CONFIG = ConfigDict(
    extra="forbid",
    allow_inf_nan=False,
    hide_input_in_errors=True,
    use_attribute_docstrings=True,
)

_T = TypeVar("_T")


def _raises_model_error(
    where: Callable[[tuple[Any, ...], dict[str, Any]], str],
) -> Callable[[type[_T]], type[_T]]:
    """Class decorator: building the class in code raises ``ModelError``, not ValidationError.

    The message names the key as reading a manifest does.

    Args:
        where: what the error message starts with, from the constructor's arguments.
    """

    def decorate(cls: type[_T]) -> type[_T]:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise _model_error(exc, where(args, kwargs), cls) from exc

        setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses assigning to a method)
        return cls

    return decorate


# --- the declared models ------------------------------------------------------------------------


@_raises_model_error(lambda args, kwargs: "value policy")
@dataclass(frozen=True, config=_CONFIG)
class ValuePolicy:
    """What to do with a feature's unusual values: ``pass`` or ``dead_letter`` each."""

    missing: Action = PASS
    """The field is null or absent (reason ``missing_value``)."""
    nan: Action = PASS
    """The value is NaN (reason ``nan_value``)."""
    infinite: Action = DEAD_LETTER
    """The value is infinite or beyond float32's range (reason ``non_finite``)."""
    out_of_range: Action = DEAD_LETTER
    """The value is outside the feature's ``min``/``max`` (reason ``out_of_range``)."""
    unseen: Action = PASS
    """A ``category`` feature's value is not one of its ``categories`` (reason
    ``unseen_category``)."""

    def merged(self, overrides: Mapping[str, str]) -> ValuePolicy:
        """Return this policy with ``overrides`` (some of its keys) applied."""
        return replace(self, **overrides) if overrides else self


#: A key of ``ValuePolicy``.
PolicyKey = Annotated[str, _OneOf(frozenset(f.name for f in fields(ValuePolicy)), key=True)]


def _feature_name(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return f"feature {args[0] if args else kwargs.get('name')!r}"


@_raises_model_error(_feature_name)
@dataclass(frozen=True, config=_CONFIG)
class FeatureSpec:
    """One model input column."""

    name: str
    """The feature's name, as the booster knows it."""
    field: str
    """The input field it comes from (dots reach into nested records)."""
    transform: Annotated[str, _OneOf(TRANSFORMS)] = "number"
    """How the field's value becomes a float."""
    categories: tuple[str, ...] = ()
    """For ``category`` (required): the symbols, whose position is the feature value; any other
    value is *unseen* (see ``ValuePolicy.unseen``)."""
    min: Number | None = None
    """For ``number``: the smallest valid value (inclusive), or none."""
    max: Number | None = None
    """For ``number``: the largest valid value (inclusive), or none."""
    policy: Mapping[PolicyKey, Action] = dataclasses.field(default_factory=dict, hash=False)
    """Overrides of the manifest-wide value policy for this feature (keys of ``value_policy``;
    ``unseen`` on ``category`` features only)."""
    default_policy: SkipJsonSchema[ValuePolicy] = dataclasses.field(
        default_factory=ValuePolicy, init=False, compare=False, hash=False, repr=False
    )
    """The manifest-wide policy ``policy`` overrides: not an argument nor a key of the file,
    ``Manifest`` sets it (and not part of equality)."""

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        if self.transform == "category" and not self.categories:
            raise _Invalid(("categories",), "required for a 'category' feature")
        for key in ("min", "max"):
            if getattr(self, key) is not None and self.transform != "number":
                raise _Invalid((key,), "applies to 'number' features only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise _Invalid(("min",), f"must not be above max ({self.max}), got {self.min}")
        if "unseen" in self.policy and self.transform != "category":
            raise _Invalid(("policy", "unseen"), "applies to 'category' features only")
        return self

    @property
    def effective_policy(self) -> ValuePolicy:
        """The value policy that applies: the manifest's, with this feature's overrides."""
        return self.default_policy.merged(self.policy)


@_raises_model_error(lambda args, kwargs: "manifest")
@dataclass(frozen=True, config=_CONFIG)
class Manifest:
    """Everything the worker needs to know about a saved model."""

    model_version: str
    """The version each prediction carries (``model_version``)."""
    model_file: str
    """The booster's file (UBJSON), relative to the manifest's directory."""
    model_sha256: str
    """Hex sha256 of the model file, checked at start-up."""
    objective: Annotated[str, _OneOf(OBJECTIVES)]
    """The XGBoost objective the model was trained with."""
    features: tuple[FeatureSpec, ...]
    """The model's input columns, in the booster's order (names unique)."""
    xgboost_version: str
    """The XGBoost version that trained the model."""
    threshold: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.5
    """Binary classifiers: the probability at or above which the label is 1."""
    metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Validation metrics, for people (the worker does not read them)."""
    created_at: str = ""
    """When the model was trained (ISO 8601)."""
    value_policy: ValuePolicy = dataclasses.field(default_factory=ValuePolicy)
    """The manifest-wide value policy (keys left out keep their defaults)."""
    reference: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """Reference distributions from a training sample (``model pack --sample``): ``rows``,
    per feature and for the predictions ``edges`` (numeric), ``shares`` per bin and the
    ``missing`` share; for drift checks (the worker does not read them)."""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if not self.features:
            raise _Invalid(("features",), "must list at least one feature")
        seen: set[str] = set()
        for i, feature in enumerate(self.features):
            if feature.name in seen:
                raise _Invalid(("features", i, "name"), f"{feature.name!r} is listed twice")
            seen.add(feature.name)
        features = tuple(_with_default_policy(f, self.value_policy) for f in self.features)
        object.__setattr__(self, "features", features)
        return self

    @property
    def is_binary(self) -> bool:
        """Whether the model is a binary classifier (prediction is a probability)."""
        return self.objective in BINARY_OBJECTIVES

    @property
    def feature_names(self) -> list[str]:
        """Feature names in the booster's column order."""
        return [f.name for f in self.features]


def _with_default_policy(feature: FeatureSpec, policy: ValuePolicy) -> FeatureSpec:
    if feature.default_policy == policy:
        return feature
    out = copy.copy(feature)  # the caller's spec stays as it is
    object.__setattr__(out, "default_policy", policy)
    return out


@dataclass(frozen=True, config=_CONFIG)
class _ManifestFile(Manifest):
    """``manifest.json``: a manifest and the layout it is written in."""

    format: Annotated[int, Strict(), _OneOf(frozenset({MANIFEST_FORMAT}))] = dataclasses.field(
        kw_only=True
    )
    """The file's layout; this version reads and writes 1."""


_FILE = TypeAdapter(_ManifestFile)


def manifest_json_schema() -> dict[str, Any]:
    """Return the JSON Schema of ``manifest.json``.

    Checks that involve more than one key are not in it: categories required and ``unseen``
    allowed on ``category`` features only, ``min``/``max`` on ``number`` features only,
    ``min`` <= ``max``, feature names unique.
    """
    schema = _FILE.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "stream-scorer model manifest"
    return schema


# --- validation errors → ModelError -------------------------------------------------------------

#: pydantic error types whose meaning is one phrase of ours (then ", got <value>").
_PHRASES = {
    "missing": "is required",
    "missing_argument": "is required",
    "missing_keyword_only_argument": "is required",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "int_type": "must be an integer",
    "string_type": "must be a string",
}
#: pydantic error types of a value that is not the JSON object or array expected.
_SHAPES = {
    "dict_type": "must be a JSON object",
    "mapping_type": "must be a JSON object",
    "dataclass_type": "must be a JSON object",
    "dataclass_args_type": "must be a JSON object",
    "tuple_type": "must be a JSON array",
    "list_type": "must be a JSON array",
}
_UNKNOWN = frozenset({"extra_forbidden", "unexpected_keyword_argument"})
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})
_LIMIT_WORDS = {"gt": "greater than", "ge": "at least", "lt": "below", "le": "at most"}


def _keys_at(root: type, loc: Sequence[str | int]) -> list[str]:
    """The keys of the object that ``loc`` (a path from ``root``) points to."""
    node: Any = root
    for part in loc:
        if isinstance(part, int):  # an element of tuple[X, ...]
            node = (get_args(node) or (None,))[0]
        else:
            info = getattr(node, "__pydantic_fields__", {}).get(part)
            node = info.annotation if info is not None else None
    if not dataclasses.is_dataclass(node):
        return []
    return sorted(f.name for f in fields(node) if f.init)


def _message(err: ErrorDetails, root: type, loc: Sequence[str | int]) -> str:
    """Our wording of one pydantic error at ``loc``."""
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    if kind in _UNKNOWN:
        return f"unknown key (known: {', '.join(_keys_at(root, loc[:-1]))})"
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind in _RANGE_ERRORS:
        limit = next(k for k in _LIMIT_WORDS if k in ctx)
        return f"must be {_LIMIT_WORDS[limit]} {ctx[limit]}, got {value!r}"
    if kind in _PHRASES:
        return _PHRASES[kind] + ("" if kind.startswith("missing") else f", got {value!r}")
    if kind in _SHAPES:
        return f"{_SHAPES[kind]}, got {type(value).__name__}"
    return err["msg"]


def _path(loc: Sequence[str | int]) -> str:
    """``features[3].policy.unseen`` for ``("features", 3, "policy", "unseen")``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _model_error(exc: ValidationError, where: str, root: type) -> ModelError:
    """The first error of ``exc`` (a wrong ``format`` before any other) as a ModelError.

    Args:
        exc: what pydantic found.
        where: what the message starts with (``manifest``, ``feature 'f'``, ...).
        root: the class validated; the message names the key's path from it.
    """
    errors = exc.errors(include_url=False)
    err = next((e for e in errors if e["loc"][:1] == ("format",)), errors[0])
    loc: list[str | int] = [p for p in err["loc"] if p != "[key]"]
    names = [f.name for f in fields(root) if f.init]
    if loc and isinstance(loc[0], int) and loc[0] < len(names):  # a positional argument
        loc[0] = names[loc[0]]
    error = err.get("ctx", {}).get("error")
    if isinstance(error, _Invalid):
        loc += error.key
    path = _path(loc)
    return ModelError(f"{where}: {path + ': ' if path else ''}{_message(err, root, loc)}")


# --- files --------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _from_json(raw: object, where: str) -> Manifest:
    try:
        loaded = _FILE.validate_python(raw)
    except ValidationError as exc:
        raise _model_error(exc, where, _ManifestFile) from exc
    return Manifest(**{f.name: getattr(loaded, f.name) for f in fields(Manifest) if f.init})


def manifest_from_dict(raw: Mapping[str, Any]) -> Manifest:
    """Build a ``Manifest`` from its JSON form, rejecting what does not fit.

    Raises:
        ModelError: naming the first offending key's path, e.g. ``features[3].policy.unseen``.
    """
    return _from_json(raw, "manifest")


def read_manifest(model_dir: Path) -> Manifest:
    """Read and validate ``manifest.json`` in ``model_dir``.

    Raises:
        ModelError: no manifest, not JSON, or (naming the key's path) not a valid manifest.
    """
    path = model_dir / MANIFEST_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelError(f"no manifest at {path}: train a model first") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read manifest {path}: {exc}") from exc
    return _from_json(raw, f"manifest {path}")


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
    if not body["reference"]:
        del body["reference"]
    body = {"format": MANIFEST_FORMAT, **body}
    path = model_dir / MANIFEST_FILE
    path.write_text(json.dumps(body, indent=2, default=list) + "\n", encoding="utf-8")
    return path
