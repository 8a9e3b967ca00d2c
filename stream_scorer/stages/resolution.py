"""Avro schema resolution, decided once per (writer schema, reader schema) pair.

A record written with one schema (its *writer* schema, named by the frame's id) is read with the
schema the model expects (the *reader* schema), by the Avro rules fastavro implements
(``schemaless_reader(buf, writer, reader)``): fields matched by name (and the reader's aliases),
reader fields the writer lacks take their defaults, writer fields the reader lacks are skipped,
promotions int→long→float→double and string↔bytes.

``resolve_pair`` classifies a pair once, so that no record pays for it:

- ``FAST``: every record resolves, and the fields the model reads (features, id, event time)
  have the same type on both sides, or an int written where a long is read (same value): the
  compiled fast path can read the writer's bytes directly with the reader's field paths.
- ``FASTAVRO``: resolution can succeed but is not one the fast path reproduces exactly (a
  promotion to float/double or a default on a field the model reads, an alias, an enum that
  gained symbols, a union whose branches may not match, ...): the guarded fastavro path
  resolves these records, exactly.
- ``MISMATCH``: no record of this writer can be read (a reader field without a default that
  the writer lacks, types that never match, a renamed record): each is dead-lettered with
  ``schema_mismatch`` and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

_PROMOTIONS = {
    ("int", "long"),
    ("int", "float"),
    ("int", "double"),
    ("long", "float"),
    ("long", "double"),
    ("float", "double"),
    ("string", "bytes"),
    ("bytes", "string"),
}
_NAMED = ("record", "enum", "fixed")
_IGNORED_KEYS = {"doc", "aliases", "default", "order", "__fastavro_parsed", "__named_schemas"}


class Kind(Enum):
    """How records of a writer schema are read (see the module docstring)."""

    FAST = "fast"
    FASTAVRO = "fastavro"
    MISMATCH = "mismatch"


@dataclass(frozen=True)
class Resolution:
    """The verdict on one (writer, reader) pair and, unless ``FAST``, why."""

    kind: Kind
    why: str = ""


class _Data(Exception):
    """Resolution depends on the data (a union branch, an enum symbol): fastavro decides."""


class _Never(Exception):
    """No value of the writer type can be read as the reader type."""


def _named(schema: Mapping[str, Any]) -> dict[str, Any]:
    named = schema.get("__named_schemas", {})
    return dict(named) if isinstance(named, Mapping) else {}


class _Pair:
    def __init__(self, writer: Mapping[str, Any], reader: Mapping[str, Any]) -> None:
        self.wnamed = _named(writer)
        self.rnamed = _named(reader)
        self.seen: set[tuple[str, str]] = set()

    @staticmethod
    def _deref(schema: Any, named: Mapping[str, Any]) -> Any:
        if isinstance(schema, str) and schema in named:
            return named[schema]
        if isinstance(schema, Mapping) and not isinstance(schema.get("type"), str | None):
            return _Pair._deref(schema["type"], named)  # {"type": {...}} or {"type": [...]}
        if isinstance(schema, Mapping) and schema.get("type") in named:
            return named[schema["type"]]
        return schema

    @staticmethod
    def type_of(schema: Any) -> str:
        if isinstance(schema, list):
            return "union"
        if isinstance(schema, str):
            return schema
        return str(schema["type"])

    @staticmethod
    def name_of(schema: Any) -> str:
        return str(schema.get("name", "")) if isinstance(schema, Mapping) else ""

    def matches(self, w: Any, r: Any) -> bool:
        """Avro's type match (no recursion): same kind, a promotion, or the same name."""
        w, r = self._deref(w, self.wnamed), self._deref(r, self.rnamed)
        wt, rt = self.type_of(w), self.type_of(r)
        if wt in _NAMED or rt in _NAMED:
            aliases = r.get("aliases", []) if isinstance(r, Mapping) else []
            wn = self.name_of(w)
            return wt == rt and (wn == self.name_of(r) or wn in aliases)
        return wt == rt or (wt, rt) in _PROMOTIONS

    def check(self, w: Any, r: Any) -> None:
        """Raise ``_Never`` or ``_Data`` unless every value of ``w`` reads as ``r``."""
        w, r = self._deref(w, self.wnamed), self._deref(r, self.rnamed)
        wt, rt = self.type_of(w), self.type_of(r)
        if wt == "union" and rt == "union":
            ok = [any(self.matches(b, rb) for rb in r) for b in w]
            if not all(ok):
                raise _Data("a writer union branch matches no reader branch")
            for b in w:
                self._inner(b, next(rb for rb in r if self.matches(b, rb)))
            return
        if rt == "union":
            branch = next((rb for rb in r if self.matches(w, rb)), None)
            if branch is None:
                raise _Never(f"the writer's {wt} matches no branch of the reader's union")
            self.check(w, branch)
            return
        if wt == "union":
            if not all(self.matches(b, r) for b in w):
                raise _Data(f"a branch of the writer's union is not readable as {rt}")
            for b in w:
                self._inner(b, r)
            return
        if not self.matches(w, r):
            raise _Never(f"the writer's {self._label(w)} cannot be read as {self._label(r)}")
        wl = w.get("logicalType") if isinstance(w, Mapping) else None
        rl = r.get("logicalType") if isinstance(r, Mapping) else None
        if wl != rl:
            raise _Data("the logical types differ")
        if wt == "record":
            self._record(w, r)
        elif wt == "enum":
            if not set(w["symbols"]) <= set(r["symbols"]) and "default" not in r:
                raise _Data(f"enum {self.name_of(w)!r}: the writer has symbols the reader lacks")
        elif wt == "fixed":
            if int(w["size"]) != int(r["size"]):
                raise _Never(f"fixed {self.name_of(w)!r}: size {w['size']} is not {r['size']}")
        elif wt in ("array", "map"):
            key = "items" if wt == "array" else "values"
            self._inner(w[key], r[key])

    def _inner(self, w: Any, r: Any) -> None:
        """Check a value that may not occur in every record: a failure depends on the data."""
        try:
            self.check(w, r)
        except _Never as exc:
            raise _Data(str(exc)) from None

    def _record(self, w: Mapping[str, Any], r: Mapping[str, Any]) -> None:
        key = (self.name_of(w), self.name_of(r))
        if key in self.seen:  # recursive types: assume the rest holds
            return
        self.seen.add(key)
        wfields = {f["name"]: f for f in w["fields"]}
        for rf in r["fields"]:
            wf = wfields.get(rf["name"])
            if wf is None:
                wf = next((wfields[a] for a in rf.get("aliases", []) if a in wfields), None)
            if wf is None:
                if "default" not in rf:
                    raise _Never(
                        f"the reader's field {rf['name']!r} of {self.name_of(r)!r} has no "
                        "default and the writer does not have it"
                    )
                continue
            try:
                self.check(wf["type"], rf["type"])
            except _Never as exc:
                raise _Never(f"field {rf['name']!r}: {exc}") from None

    def _label(self, schema: Any) -> str:
        t = self.type_of(schema)
        return f"{t} {self.name_of(schema)!r}" if t in _NAMED else t

    def leaf_same(self, path: Sequence[str], w: Any, r: Any) -> str:
        """Why the fast path cannot read ``path`` straight from the writer ('' when it can)."""
        w, r = self._deref(w, self.wnamed), self._deref(r, self.rnamed)
        if not path:
            if self._strip(w) == self._strip(r):
                return ""
            wt, rt = self.type_of(w), self.type_of(r)
            wl = w.get("logicalType") if isinstance(w, Mapping) else None
            rl = r.get("logicalType") if isinstance(r, Mapping) else None
            if (wt, rt) == ("int", "long") and wl is None and rl is None:
                return ""
            if wt == rt == "enum" and set(w["symbols"]) <= set(r["symbols"]):
                return ""  # the same symbol either way (the fast path maps symbols by name)
            return f"{self._label(w)} is read as {self._label(r)}"
        if self.type_of(w) != "record" or self.type_of(r) != "record":
            # a path through a union or a non-record: the fast path's own semantics apply only
            # when both sides are the same type
            return "" if self._strip(w) == self._strip(r) else "a field path crosses a union"
        rf = next((f for f in r["fields"] if f["name"] == path[0]), None)
        wf = next((f for f in w["fields"] if f["name"] == path[0]), None)
        if rf is None:
            return ""  # not in the reader either: missing on both paths
        if wf is None:
            return f"field {path[0]!r} takes the reader's default"
        return self.leaf_same(path[1:], wf["type"], rf["type"])

    def _strip(self, schema: Any) -> Any:
        if isinstance(schema, list):
            return [self._strip(b) for b in schema]
        if isinstance(schema, Mapping):
            return {k: self._strip(v) for k, v in schema.items() if k not in _IGNORED_KEYS}
        return schema


def resolve_pair(
    writer: Mapping[str, Any], reader: Mapping[str, Any], paths: Sequence[str]
) -> Resolution:
    """Classify reading ``writer``'s records with ``reader`` (see the module docstring).

    Args:
        writer: the parsed writer schema (fastavro's parsed form).
        reader: the parsed reader schema.
        paths: the dotted field paths the model reads (features, id, event time).
    """
    pair = _Pair(writer, reader)
    try:
        pair.check(writer, reader)
    except _Never as exc:
        return Resolution(Kind.MISMATCH, str(exc))
    except _Data as exc:
        return Resolution(Kind.FASTAVRO, str(exc))
    for path in paths:
        why = pair.leaf_same(tuple(path.split(".")), writer, reader)
        if why:
            return Resolution(Kind.FASTAVRO, f"{path}: {why}")
    return Resolution(Kind.FAST)
