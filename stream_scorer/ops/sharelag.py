"""``stream-scorer lag`` for a share group (``input.group_type: share``).

confluent-kafka's admin client has no share-group calls (2.16), so the lag comes from the broker's
own tool, ``ShareGroupCommand`` (``kafka-share-groups.sh``), run with the local Java from the
broker jars ``local-kafka`` fetches with Maven. Per partition it reports the share-partition's
start offset (the earliest record not yet acknowledged; later ones may be done already) and the
lag in records. Plaintext brokers only for now (the tool's ``--command-config`` is not written).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from stream_scorer.errors import BrokerError, ConfigError

TOOL = "org.apache.kafka.tools.consumer.group.ShareGroupCommand"


@dataclass(frozen=True)
class ShareLag:
    """One partition of a share group, as ``ShareGroupCommand --describe`` reports it.

    Attributes:
        topic: the topic.
        partition: the partition.
        start_offset: the earliest offset not yet acknowledged (None: nothing consumed here).
        lag_records: records not yet delivered, per the broker (None: unknown).
    """

    topic: str
    partition: int
    start_offset: int | None
    lag_records: int | None


def parse_describe(text: str, group: str) -> list[ShareLag]:
    """The rows of ``ShareGroupCommand --describe --group GROUP``'s table (``-``: None).

    Raises:
        BrokerError: the tool printed an error (it exits 0 on e.g. an unknown group).
    """
    rows: list[ShareLag] = []
    header = False
    for line in text.splitlines():
        cells = line.split()
        if cells[:1] == ["GROUP"] and "LAG" in cells:
            header = True
        elif header and len(cells) == 5 and cells[0] == group:
            _g, topic, partition, start, lag = cells
            rows.append(
                ShareLag(
                    topic,
                    int(partition),
                    None if start == "-" else int(start),
                    None if lag == "-" else int(lag),
                )
            )
    if not header:
        error = next((ln for ln in text.splitlines() if ln.startswith("Error")), text.strip())
        raise BrokerError(f"share group {group!r}: {error[:300]}")
    return rows


def describe_share_group(
    settings: Mapping[str, str],
    group: str,
    topic: str | None = None,
    *,
    java: str,
    libs: Path,
    timeout: float = 120.0,
) -> list[ShareLag]:
    """Run ``ShareGroupCommand --describe`` against the brokers of ``settings``.

    Args:
        settings: the librdkafka client settings (``bootstrap.servers``; plaintext only).
        group: the share group.
        topic: only this topic's partitions; None: all.
        java: the Java 17+ to run the tool with.
        libs: the folder of the broker's jars (``kafka-tools`` among them).
        timeout: seconds the tool may take.

    Raises:
        ConfigError: a secured connection (not supported by this command yet).
        BrokerError: the tool failed or reported an error.
    """
    if settings.get("security.protocol", "plaintext").lower() != "plaintext":
        raise ConfigError(
            "kafka.client.security.protocol",
            "lag of a share group runs the broker's ShareGroupCommand, which this command "
            "connects in plaintext only; run kafka-share-groups.sh --describe with your "
            "client properties instead",
        )
    cmd = [java, "-cp", f"{libs}/*", TOOL, "--bootstrap-server", settings["bootstrap.servers"]]
    cmd += ["--describe", "--group", group]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"ShareGroupCommand did not finish: {exc}") from exc
    rows = parse_describe(out.stdout + "\n" + out.stderr, group)
    return [r for r in rows if topic is None or r.topic == topic]


def to_json(group: str, rows: list[ShareLag]) -> str:
    """The share group's lag as one JSON document."""
    total = sum(r.lag_records or 0 for r in rows)
    return json.dumps(
        {
            "group": group,
            "type": "share",
            "partitions": [asdict(r) for r in rows],
            "total_lag_records": total,
        }
    )


def to_table(group: str, rows: list[ShareLag]) -> str:
    """The share group's lag as a table, one line per partition and a total."""
    lines = [f"share group {group}", f"{'TOPIC':<30} {'PART':>4} {'START':>12} {'LAG':>10}"]
    for r in rows:
        start = "-" if r.start_offset is None else str(r.start_offset)
        lag = "-" if r.lag_records is None else str(r.lag_records)
        lines.append(f"{r.topic:<30} {r.partition:>4} {start:>12} {lag:>10}")
    lines.append(f"total lag: {sum(r.lag_records or 0 for r in rows)} records")
    return "\n".join(lines)
