"""``stream-scorer lag``: a consumer group's exact lag in records and seconds, no worker needed.

The reading is ``stream_scorer.kafka.groups.describe_group``; this module renders it: a table like
``kafka-consumer-groups --describe`` plus seconds, or JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from stream_scorer.kafka.groups import PartitionLag


def totals(rows: list[PartitionLag]) -> dict[str, Any]:
    """Sum of the lag in records and the largest lag in seconds over ``rows``."""
    seconds = [r.lag_seconds for r in rows if r.lag_seconds is not None]
    return {
        "partitions": len(rows),
        "lag_records": sum(r.lag_records for r in rows),
        "max_lag_seconds": max(seconds) if seconds else 0.0,
    }


def to_json(group: str, rows: list[PartitionLag]) -> str:
    """The ``--json`` output: the group, one object per partition, and the totals."""
    return json.dumps(
        {"group": group, "partitions": [asdict(r) for r in rows], "total": totals(rows)}
    )


def to_table(group: str, rows: list[PartitionLag]) -> str:
    """The default output: a table like ``kafka-consumer-groups --describe`` plus seconds."""
    head = ("TOPIC", "PARTITION", "COMMITTED", "HIGH-WATERMARK", "LAG", "LAG-SECONDS")
    lines = [head]
    for r in rows:
        lines.append(
            (
                r.topic,
                str(r.partition),
                "-" if r.committed is None else str(r.committed),
                str(r.high),
                str(r.lag_records),
                "-" if r.lag_seconds is None else f"{r.lag_seconds:.1f}",
            )
        )
    tot = totals(rows)
    lines.append(("TOTAL", "", "", "", str(tot["lag_records"]), f"{tot['max_lag_seconds']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [f"GROUP {group}"]
    for line in lines:
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(out)
