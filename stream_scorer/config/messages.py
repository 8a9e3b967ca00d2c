"""pydantic's list of validation errors turned into our messages, with ``did you mean``.

``config_error`` is the one place that words a problem of a single key: every error of a
``ValidationError`` becomes a ``(dotted key, problem)`` of one ``ConfigError``; an unknown key
comes first, with the nearest key of its table; a value inside the ``kafka.*`` tables or of a key
that looks secret is never echoed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from stream_scorer.config.keys import PASSTHROUGH, is_secret
from stream_scorer.config.sections import Config
from stream_scorer.errors import ConfigError


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field's annotation: ``S``, ``S | None`` or ``tuple[S, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if len(args) == 1:
        return section_type(args[0])
    return None


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The section model that ``loc`` (a path of field names or aliases) points into.

    A list index (``models.0.model``) stays in the list's section.
    """
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = field_of(model, part)
        found = section_type(field.annotation if field is not None else None)
        if found is None:
            return None
        model = found
    return model


def field_of(model: type[BaseModel], name: str | int) -> FieldInfo | None:
    """The field of ``model`` named ``name`` (its name or its alias), else None."""
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info
    return None


_LIMIT_WORDS = {"gt": "greater than", "ge": "at least", "lt": "below", "le": "at most"}


def _range(loc: tuple[str | int, ...], ctx: Mapping[str, Any]) -> str:
    """``must be …``: the range declared for the key at ``loc`` (else the bound ``ctx`` names)."""
    model = _model_at(loc[:-1])
    field = field_of(model, loc[-1]) if model is not None and loc else None
    metadata = field.metadata if field is not None else []
    limits = {k: getattr(m, k) for m in metadata for k in _LIMIT_WORDS if hasattr(m, k)} or ctx
    low = next(((k, limits[k]) for k in ("gt", "ge") if k in limits), None)
    high = next(((k, limits[k]) for k in ("lt", "le") if k in limits), None)
    if low == ("ge", 0) and high is None:
        return "must not be negative"
    if low is not None and high is not None and (low[0], high[0]) in (("gt", "lt"), ("ge", "le")):
        strictly = "strictly " if low[0] == "gt" else ""
        return f"must be {strictly}between {low[1]} and {high[1]}"
    words = [f"{_LIMIT_WORDS[b[0]]} {b[1]}" for b in (low, high) if b is not None]
    return "must be " + " and ".join(words)


#: pydantic error types whose meaning is one phrase of ours.
_PHRASES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "path_type": "must be a path",
    "string_too_short": "must not be empty",
}
_TABLE_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type", "mapping_type"})
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _message(err: ErrorDetails, loc: tuple[str | int, ...], secret: bool) -> str:
    """Our wording of one pydantic error; ``secret``: never show the value."""
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    got = "" if secret else f", got {value!r}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
        return f"unknown key (known: {', '.join(known)})"
    if kind in _TABLE_ERRORS:
        return f"must be a table, got {type(value).__name__}"
    if kind in _RANGE_ERRORS:
        return _range(loc, ctx) + got
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind in _PHRASES:
        return _PHRASES[kind] + ("" if kind == "string_too_short" else got)
    return err["msg"]  # pydantic's words (which never include the value)


def config_error(exc: ValidationError) -> ConfigError:
    """Every error of ``exc`` in one ConfigError naming each dotted key.

    Unknown keys come first, each with the nearest key of its table (``did you mean``; a
    required key missing beside it first): a misspelled key is the cause of that key missing.
    """
    errors = [
        (e, tuple(p for p in e["loc"] if p != "[key]")) for e in exc.errors(include_url=False)
    ]
    missing = [loc for e, loc in errors if e["type"] == "missing"]
    problems = []
    for err, loc in errors:
        name = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:] or "config"
        secret = (len(loc) > 1 and loc[0] == "kafka" and loc[1] in PASSTHROUGH) or any(
            is_secret(str(p)) for p in loc
        )
        message = _message(err, loc, secret)
        if err["type"] == "extra_forbidden":
            absent = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
            message = _nearest(str(loc[-1]), absent, loc) or message
        problems.append((err["type"] != "extra_forbidden", name, message))
    (_, field, message), *more = sorted(problems, key=lambda p: p[0])
    return ConfigError(field, message, more=[(f, m) for _, f, m in more])


def _nearest(unknown: str, absent: list[str], loc: tuple[str | int, ...]) -> str:
    """``unknown key; did you mean 'x'?`` with the missing or known key nearest ``unknown``."""
    model = _model_at(loc[:-1])
    known = [f.alias or n for n, f in model.model_fields.items()] if model else []
    for candidates in (absent, known):
        near = difflib.get_close_matches(unknown, candidates, n=1, cutoff=0.6)
        if near:
            return f"unknown key; did you mean {near[0]!r}?"
    return ""
