"""Field paths in an Avro record schema: a dotted path resolved to the types it can hold.

Start-up uses it to check every path a configuration or manifest names (nested ones too)
against the input schema, so a typo stops the worker instead of scoring with a missing value.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from stream_scorer.errors import SchemaError

#: Avro primitive type names (a string type that is not one of these names a named type).
PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})


def _named(schema: Mapping[str, Any]) -> Mapping[str, Any]:
    table: Mapping[str, Any] = schema.get("__named_schemas", {})  # fastavro.parse_schema's
    return table


def _branches(avro_type: Any, named: Mapping[str, Any]) -> list[Any]:
    """The non-null alternatives of a type (a union's branches, named types resolved)."""
    alternatives = avro_type if isinstance(avro_type, list) else [avro_type]
    out = []
    for alt in alternatives:
        if isinstance(alt, str) and alt not in PRIMITIVES:
            alt = named.get(alt, alt)
        if alt != "null":
            out.append(alt)
    return out


def type_name(avro_type: Any) -> str:
    """A short name of one (non-union) Avro type: ``long``, ``enum``, ``long/timestamp-millis``."""
    if isinstance(avro_type, Mapping):
        kind = str(avro_type.get("type"))
        logical = avro_type.get("logicalType")
        return f"{kind}/{logical}" if logical else kind
    return str(avro_type)


def base_type(avro_type: Any) -> str:
    """The Avro type of one (non-union) type, without its logical type: ``long``, ``record``."""
    if isinstance(avro_type, Mapping):
        return str(avro_type.get("type"))
    return str(avro_type)


def resolve(schema: Mapping[str, Any], path: str) -> list[Any]:
    """Return the non-null types the dotted ``path`` can hold in the parsed record ``schema``.

    Dots reach into nested records, also through nullable unions (``["null", Record]``).

    Raises:
        SchemaError: a part of the path is not a field there; the message names the path, the
            missing part, the fields that exist there and the nearest one.
    """
    named = _named(schema)
    current: Sequence[Any] = [schema]
    walked: list[str] = []
    for part in path.split("."):
        records = [t for t in current if base_type(t) == "record"]
        if not records:
            where = ".".join(walked)
            kinds = ", ".join(type_name(t) for t in current) or "null"
            raise SchemaError(f"field {path!r}: {where!r} is a {kinds}, not a record")
        found = [f["type"] for r in records for f in r["fields"] if f["name"] == part]
        if not found:
            names = sorted({f["name"] for r in records for f in r["fields"]})
            near = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join([*walked, near[0]])!r}?" if near else ""
            where = f" in {'.'.join(walked)!r}" if walked else ""
            raise SchemaError(
                f"field {path!r}: no field {part!r}{where} (fields there: {', '.join(names)}){hint}"
            )
        current = [b for t in found for b in _branches(t, named)]
        walked.append(part)
    return list(current)
