"""Avro schemas for the decoder's guard and property tests (not the example, not payments)."""

from __future__ import annotations

from typing import Any

# Every kind of Avro type: named, recursive and logical types, unions inside records, arrays
# and maps, zero-byte items.
EVERYTHING: dict[str, Any] = {
    "type": "record",
    "name": "Everything",
    "namespace": "test.guard",
    "fields": [
        {"name": "i", "type": "int"},
        {"name": "l", "type": "long"},
        {"name": "f", "type": "float"},
        {"name": "d", "type": "double"},
        {"name": "flag", "type": "boolean"},
        {"name": "s", "type": "string"},
        {"name": "raw", "type": "bytes"},
        {"name": "color", "type": {"type": "enum", "name": "Color", "symbols": ["R", "G", "B"]}},
        {"name": "four", "type": {"type": "fixed", "name": "Four", "size": 4}},
        {"name": "choice", "type": ["null", "string", "Color", "Four"]},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "nulls", "type": {"type": "array", "items": "null"}},
        {
            "name": "scores",
            "type": {"type": "map", "values": ["null", {"type": "array", "items": "int"}]},
        },
        {"name": "when", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {
            "name": "price",
            "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2},
        },
        {"name": "uid", "type": {"type": "string", "logicalType": "uuid"}},
        {
            "name": "tree",
            "type": {
                "type": "record",
                "name": "Node",
                "fields": [
                    {"name": "label", "type": "string"},
                    {"name": "children", "type": {"type": "array", "items": "Node"}},
                    {"name": "next", "type": ["null", "Node"]},
                ],
            },
        },
        {
            "name": "nothings",
            "type": {"type": "array", "items": {"type": "record", "name": "Nothing", "fields": []}},
        },
        {"name": "nested", "type": {"type": "array", "items": {"type": "array", "items": "null"}}},
        {"name": "lookup", "type": {"type": "map", "values": ["null", "long", "Node"]}},
    ],
}

# A linked list: recursion through a union.
LINKED: dict[str, Any] = {
    "type": "record",
    "name": "Link",
    "fields": [{"name": "v", "type": "int"}, {"name": "next", "type": ["null", "Link"]}],
}
