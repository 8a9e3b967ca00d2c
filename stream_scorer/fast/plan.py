"""Fast path, part one: compile an input schema and a model's feature list into a program.

The program is a flat table of operations that ``fast.kernel`` interprets for every record of a
batch: read a value (with every guard of ``stages.avro_guard``), then store it —
as a feature cell, as the prediction's id, or as its event time — or skip it. Branches of a
union are jumps, arrays and maps are loops; nothing is allocated per record.

Feature semantics are those of ``stages/features.py`` for the value fastavro would return, decided
here once per (field type, transform) instead of once per value:

- ``number``: boolean, int, long, float, double; ``null`` and an absent path are *missing*; a
  NaN is *nan*; +/-infinity, or a double too large for float32, is *inf*; a value outside the
  bounds the kernel is given is *out of range* (both checked on the value as read: a double,
  or an exact integer, before it is narrowed to float32); any other type (string, enum,
  bytes, record, a timestamp with a logical type, ...) is *not numeric*.
- ``category``: a string or an enum symbol to its position in ``categories``; any other value
  (a string or symbol not listed, a value of another type) is *unseen*; ``null`` is *missing*.
- ``hour_of_day`` / ``day_of_week``: ``timestamp-*`` and ``local-timestamp-*`` longs, and plain
  int/long epoch milliseconds (outside years 1-9999: *not a timestamp*); ``null`` is *missing*;
  any other type is *not a timestamp*.

A schema the program cannot express raises ``Unsupported`` with the reason, and the caller
keeps the fastavro path: recursive types, a feature, id or event-time path through a map, an
id of a type without a plain text form, a local-time event time, ``uuid`` and ``bytes``
decimals (fastavro's conversions of those can fail in ways not reproduced here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from stream_scorer.contracts.manifest import FeatureSpec

# --- operations (column 0 of the program); columns 1-3 are their arguments -----------------
OP_END = 0
OP_BOOL = 1
OP_INT = 2  # a = logical range check (CHECK_*)
OP_LONG = 3  # a = logical range check
OP_FLOAT = 4
OP_DOUBLE = 5
OP_STRING = 6
OP_BYTES = 7
OP_FIXED = 8  # a = size
OP_ENUM = 9  # a = number of symbols
OP_UNION = 10  # a = number of branches, b = offset of their start pcs in ``branches``
OP_JUMP = 11  # a = target pc
OP_BLOCKS = 12  # array/map start: a = pc after the loop, b = the item's smallest encoding
OP_NEXT = 13  # array/map item end: a = pc of the item's first operation
ST_NUMBER_INT = 20  # a = column, b = its out-of-range state: the last integer or boolean read
ST_NUMBER_FLOAT = 21  # a = column: the last float or double read
ST_STATE = 22  # a = column, b = cell state (the value itself does not matter)
ST_CATEGORY_ENUM = 23  # a = column, b = offset in ``enum_lut`` (and in ``lut_symbols``)
ST_CATEGORY_STRING = 24  # a = column, b = first category in ``cat_spans``, c = how many
ST_HOUR = 25  # a = column, b = units per millisecond (1 or 1000), c = 1: check the range
ST_WEEKDAY = 26  # same arguments
ST_ID = 27  # a = id kind (ID_*), b = enum table (ID_ENUM)
ST_TIME = 28  # a = units per millisecond

# --- range checks of logical types (fastavro's conversion fails outside them) -------------
CHECK_NONE = 0
CHECK_TS_MILLIS = 1
CHECK_TS_MICROS = 2
CHECK_DATE = 3
CHECK_TIME_MILLIS = 4
CHECK_TIME_MICROS = 5

# --- cell states of the feature matrix (uint8), see ``fast.path`` for their policies ------
VALUE = 0
MISSING = 1
NAN = 2
INF = 3
UNSEEN = 4
NOT_NUMERIC = 5
NOT_TIMESTAMP = 6
OUT_OF_RANGE = 7  # a float or double outside the feature's bounds
OUT_OF_RANGE_INT = 8  # an int or long outside them
OUT_OF_RANGE_BOOL = 9  # a boolean outside them

# --- id kinds ------------------------------------------------------------------------------
ID_NULL = 0
ID_BOOL = 1
ID_INT = 2
ID_FLOAT = 3
ID_STRING = 4
ID_BYTES = 5
ID_ENUM = 6

#: Arrays and maps nested deeper than this are not specialised.
MAX_NESTING = 32
#: Programs longer than this are not specialised (a schema with thousands of fields).
MAX_OPS = 200_000
#: Largest fixed ``decimal`` whose conversion cannot overflow Python's decimal context.
_MAX_DECIMAL_FIXED = 100_000

_PRIMITIVE_OPS = {
    "boolean": OP_BOOL,
    "int": OP_INT,
    "long": OP_LONG,
    "float": OP_FLOAT,
    "double": OP_DOUBLE,
    "string": OP_STRING,
    "bytes": OP_BYTES,
}
_ID_KINDS = {
    OP_BOOL: ID_BOOL,
    OP_INT: ID_INT,
    OP_LONG: ID_INT,
    OP_FLOAT: ID_FLOAT,
    OP_DOUBLE: ID_FLOAT,
    OP_STRING: ID_STRING,
    OP_BYTES: ID_BYTES,
    OP_FIXED: ID_BYTES,
    OP_ENUM: ID_ENUM,
}
_TIMESTAMPS = {
    ("long", "timestamp-millis"): 1,
    ("long", "timestamp-micros"): 1000,
    ("long", "local-timestamp-millis"): 1,
    ("long", "local-timestamp-micros"): 1000,
}
_CHECKS = {
    ("long", "timestamp-millis"): CHECK_TS_MILLIS,
    ("long", "local-timestamp-millis"): CHECK_TS_MILLIS,
    ("long", "timestamp-micros"): CHECK_TS_MICROS,
    ("long", "local-timestamp-micros"): CHECK_TS_MICROS,
    ("int", "date"): CHECK_DATE,
    ("int", "time-millis"): CHECK_TIME_MILLIS,
    ("long", "time-micros"): CHECK_TIME_MICROS,
}


class Unsupported(Exception):
    """The schema (with these features) cannot be specialised; the message says why."""


@dataclass(frozen=True)
class Program:
    """A compiled schema: the operations and their tables.

    Attributes:
        code: ``(n, 4)`` int64: operation and three arguments per row.
        branches: union branch start pcs.
        enum_lut: enum symbol index to category position (-1: unseen), per category feature.
        lut_symbols: the enum symbol of each ``enum_lut`` entry.
        cat_bytes: the UTF-8 bytes of every string category, concatenated.
        cat_spans: ``(n, 2)`` int64: start and length of each category in ``cat_bytes``.
        enum_tables: symbols of the enums an id can be, by the table number in ``ST_ID``.
        n_features: columns of the feature matrix.
        depth: the deepest array/map nesting (stack size the kernel needs).
    """

    code: npt.NDArray[np.int64]
    branches: npt.NDArray[np.int64]
    enum_lut: npt.NDArray[np.int64]
    lut_symbols: tuple[str, ...]
    cat_bytes: npt.NDArray[np.uint8]
    cat_spans: npt.NDArray[np.int64]
    enum_tables: tuple[tuple[str, ...], ...]
    n_features: int
    depth: int


# A "target" is something to store where a path ends: ("feature", column, spec), ("id",) or
# ("time",). Each is carried down the schema with the part of its path not yet matched.
_Target = tuple[Any, ...]
_Pending = list[tuple[tuple[str, ...], _Target]]


class _Compiler:
    def __init__(self, named: Mapping[str, Any]) -> None:
        self.code: list[list[int]] = []
        self.branches: list[int] = []
        self.enum_lut: list[int] = []
        self.lut_symbols: list[str] = []
        self.cat_bytes = bytearray()
        self.cat_spans: list[tuple[int, int]] = []
        self.enum_tables: list[tuple[str, ...]] = []
        self.named = dict(named)
        self.expanding: list[str] = []
        self.depth = 0
        self.max_depth = 0

    def emit(self, op: int, a: int = 0, b: int = 0, c: int = 0) -> int:
        if len(self.code) >= MAX_OPS:
            raise Unsupported(f"the schema needs more than {MAX_OPS} operations")
        self.code.append([op, a, b, c])
        return len(self.code) - 1

    # --- types -----------------------------------------------------------------------------
    def resolve(self, schema: Any) -> Any:
        if isinstance(schema, str) and schema not in _PRIMITIVE_OPS and schema != "null":
            if schema not in self.named:
                raise Unsupported(f"unknown named type {schema!r}")
            return self.named[schema]
        return schema

    def compile(self, schema: Any, pending: _Pending) -> None:
        """Emit the operations reading one value of ``schema``, storing the ``pending`` ends."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            self.union(schema, pending)
            return
        if isinstance(schema, str):
            self.primitive(schema, None, pending)
            return
        kind = schema["type"]
        if isinstance(schema.get("name"), str) and kind in ("record", "enum", "fixed"):
            self.named.setdefault(schema["name"], schema)
        if kind == "record":
            self.record(schema, pending)
        elif kind == "enum":
            self.enum(schema, pending)
        elif kind == "fixed":
            self.fixed(schema, pending)
        elif kind in ("array", "map"):
            self.blocks(schema, pending)
        elif isinstance(kind, str) and (kind in _PRIMITIVE_OPS or kind == "null"):
            self.primitive(kind, schema.get("logicalType"), pending)
        else:
            self.compile(kind, pending)  # {"type": "SomeNamedType"} or a nested definition

    def record(self, schema: Mapping[str, Any], pending: _Pending) -> None:
        name = str(schema.get("name", ""))
        if name in self.expanding:
            raise Unsupported(f"record {name!r} is recursive")
        self.expanding.append(name)
        for path, target in pending:
            if not path:
                self.store_other(target, "record")
        for field in schema["fields"]:
            inner = [(p[1:], t) for p, t in pending if p and p[0] == field["name"]]
            self.compile(field["type"], inner)
        self.expanding.pop()

    def union(self, branches: Sequence[Any], pending: _Pending) -> None:
        at = self.emit(OP_UNION, len(branches), len(self.branches))
        self.branches.extend([0] * len(branches))
        jumps = []
        for i, branch in enumerate(branches):
            self.branches[self.code[at][2] + i] = len(self.code)
            self.compile(branch, pending)
            if i < len(branches) - 1:
                jumps.append(self.emit(OP_JUMP))
        for j in jumps:
            self.code[j][1] = len(self.code)

    def blocks(self, schema: Mapping[str, Any], pending: _Pending) -> None:
        is_map = schema["type"] == "map"
        for path, target in pending:
            if not path:
                self.store_other(target, schema["type"])
            elif is_map:
                raise Unsupported(f"{_describe(target)} reads into a map")
            # a path through an array finds no field: stays missing, as in stages/features.py
        item = schema["values"] if is_map else schema["items"]
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        if self.depth > MAX_NESTING:
            raise Unsupported(f"arrays or maps nested deeper than {MAX_NESTING}")
        item_min = self.min_size(item, ()) + (1 if is_map else 0)  # a map item has its key
        start = self.emit(OP_BLOCKS, 0, item_min)
        if is_map:
            self.emit(OP_STRING)
        self.compile(item, [])
        self.emit(OP_NEXT, start + 1)
        self.code[start][1] = len(self.code)
        self.depth -= 1

    def enum(self, schema: Mapping[str, Any], pending: _Pending) -> None:
        symbols = tuple(str(s) for s in schema["symbols"])
        self.emit(OP_ENUM, len(symbols))
        for path, target in pending:
            if path:
                continue
            if target[0] == "id":
                self.emit(ST_ID, ID_ENUM, len(self.enum_tables))
                self.enum_tables.append(symbols)
            elif target[0] == "feature":
                spec: FeatureSpec = target[2]
                if spec.transform == "category":
                    positions = {c: i for i, c in enumerate(spec.categories)}
                    self.emit(ST_CATEGORY_ENUM, target[1], len(self.enum_lut))
                    self.enum_lut.extend(positions.get(s, -1) for s in symbols)
                    self.lut_symbols.extend(symbols)
                else:
                    self.store_other(target, "enum")

    def fixed(self, schema: Mapping[str, Any], pending: _Pending) -> None:
        size = int(schema["size"])
        if schema.get("logicalType") == "decimal" and size > _MAX_DECIMAL_FIXED:
            raise Unsupported(f"a fixed decimal of {size} bytes")
        self.emit(OP_FIXED, size)
        kind = "decimal" if schema.get("logicalType") == "decimal" else "bytes"
        for path, target in pending:
            if not path:
                if target[0] == "id" and kind == "bytes":
                    self.emit(ST_ID, ID_BYTES)
                else:
                    self.store_other(target, kind)

    def primitive(self, kind: str, logical: Any, pending: _Pending) -> None:
        if kind == "null":
            return  # nothing to read; every target of a null stays missing / absent
        known = (kind, logical) in _CHECKS or (kind, logical) in _TIMESTAMPS
        if logical == "uuid" and kind == "string":
            raise Unsupported("a uuid field (fastavro parses it; not reproduced here)")
        if logical == "decimal" and kind == "bytes":
            raise Unsupported("a bytes decimal (its conversion can overflow; not reproduced)")
        op = _PRIMITIVE_OPS[kind]
        check = _CHECKS.get((kind, logical), CHECK_NONE)
        self.emit(op, check)
        typed = "timestamp" if (kind, logical) in _TIMESTAMPS else ("other" if known else kind)
        for path, target in pending:
            if path:
                continue  # a path that goes on past a primitive finds nothing: missing
            self.store(op, typed, (kind, logical), target)

    # --- stores ----------------------------------------------------------------------------
    def store(self, op: int, typed: str, kind: tuple[str, Any], target: _Target) -> None:
        if target[0] == "id":
            if typed != kind[0]:
                raise Unsupported(f"the id field has logical type {kind[1]!r}")
            self.emit(ST_ID, _ID_KINDS[op])
            return
        if target[0] == "time":
            if typed == "timestamp":
                if kind[1].startswith("local-"):
                    raise Unsupported("the event time is a local timestamp (no time zone)")
                self.emit(ST_TIME, _TIMESTAMPS[kind])
            elif op in (OP_INT, OP_LONG) and typed == kind[0]:
                self.emit(ST_TIME, 1)
            return  # any other type: the Kafka timestamp is used, as in stages/pipeline.py
        col: int = target[1]
        spec: FeatureSpec = target[2]
        if spec.transform == "number":
            if op in (OP_BOOL, OP_INT, OP_LONG) and typed == kind[0]:
                outside = OUT_OF_RANGE_BOOL if op == OP_BOOL else OUT_OF_RANGE_INT
                self.emit(ST_NUMBER_INT, col, outside)
            elif op in (OP_FLOAT, OP_DOUBLE):
                self.emit(ST_NUMBER_FLOAT, col)
            else:
                self.emit(ST_STATE, col, NOT_NUMERIC)
        elif spec.transform == "category":
            if op == OP_STRING and typed == "string":
                first = len(self.cat_spans)
                for category in spec.categories:
                    raw = category.encode("utf-8")
                    self.cat_spans.append((len(self.cat_bytes), len(raw)))
                    self.cat_bytes.extend(raw)
                self.emit(ST_CATEGORY_STRING, col, first, len(spec.categories))
            else:  # any other type: none of the categories (features.py maps only strings)
                self.emit(ST_STATE, col, UNSEEN)
        else:
            st = ST_HOUR if spec.transform == "hour_of_day" else ST_WEEKDAY
            if typed == "timestamp":
                self.emit(st, col, _TIMESTAMPS[kind], 0)
            elif op in (OP_INT, OP_LONG) and typed == kind[0]:
                self.emit(st, col, 1, 1)
            else:
                self.emit(ST_STATE, col, NOT_TIMESTAMP)

    def store_other(self, target: _Target, kind: str) -> None:
        """A path ends at a value that is no number, text or timestamp (record, enum, ...)."""
        if target[0] == "id":
            raise Unsupported(f"the id field is of type {kind} (no plain text form)")
        if target[0] == "time":
            return
        spec: FeatureSpec = target[2]
        if spec.transform == "number":
            self.emit(ST_STATE, target[1], NOT_NUMERIC)
        elif spec.transform in ("hour_of_day", "day_of_week"):
            self.emit(ST_STATE, target[1], NOT_TIMESTAMP)
        else:  # a category
            self.emit(ST_STATE, target[1], UNSEEN)

    # --- sizes -----------------------------------------------------------------------------
    def min_size(self, schema: Any, seen: tuple[str, ...]) -> int:
        """The fewest bytes a value of ``schema`` can take (as ``avro_guard`` counts them)."""
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return 1 + min((self.min_size(b, seen) for b in schema), default=0)
        if isinstance(schema, str):
            return {"null": 0, "float": 4, "double": 8}.get(schema, 1)
        kind = schema["type"]
        if kind == "record":
            name = str(schema.get("name", ""))
            if name in seen:
                raise Unsupported(f"record {name!r} is recursive")
            if isinstance(schema.get("name"), str):
                self.named.setdefault(schema["name"], schema)
            return sum(self.min_size(f["type"], (*seen, name)) for f in schema["fields"])
        if kind == "fixed":
            return int(schema["size"])
        if kind in ("enum", "array", "map"):
            return 1
        return self.min_size(kind, seen)


def _describe(target: _Target) -> str:
    if target[0] == "feature":
        return f"feature {target[2].name!r}"
    return "the id field" if target[0] == "id" else "the event time field"


def compile_program(
    schema: Mapping[str, Any],
    features: Sequence[FeatureSpec],
    *,
    id_field: str,
    event_time_field: str = "",
) -> Program:
    """Compile a parsed record schema and the model's features into a ``Program``.

    Args:
        schema: the writer schema, as fastavro parses it (``decode.load_schema``).
        features: the model's features, in column order.
        id_field: dotted path of the field copied into ``input_id``.
        event_time_field: dotted path of the event time; empty for the Kafka timestamp.

    Raises:
        Unsupported: the schema, or a path in it, cannot be specialised (the message says why).
    """
    named = schema.get("__named_schemas", {})
    compiler = _Compiler(named if isinstance(named, Mapping) else {})
    pending: _Pending = [
        (tuple(spec.field.split(".")), ("feature", col, spec)) for col, spec in enumerate(features)
    ]
    pending.append((tuple(id_field.split(".")), ("id",)))
    if event_time_field:
        pending.append((tuple(event_time_field.split(".")), ("time",)))
    compiler.compile(dict(schema), pending)
    compiler.emit(OP_END)
    spans = compiler.cat_spans or [(0, 0)]
    return Program(
        code=np.asarray(compiler.code, dtype=np.int64).reshape(-1, 4),
        branches=np.asarray(compiler.branches or [0], dtype=np.int64),
        enum_lut=np.asarray(compiler.enum_lut or [-1], dtype=np.int64),
        lut_symbols=tuple(compiler.lut_symbols),
        cat_bytes=np.frombuffer(bytes(compiler.cat_bytes) or b"\x00", dtype=np.uint8).copy(),
        cat_spans=np.asarray(spans, dtype=np.int64).reshape(-1, 2),
        enum_tables=tuple(compiler.enum_tables),
        n_features=len(features),
        depth=max(1, compiler.max_depth),
    )
