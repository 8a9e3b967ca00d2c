"""``stream-scorer lag`` for a share group (``input.group_type: share``).

confluent-kafka's admin client has no share-group calls (2.16), so the lag comes from the broker's
own tool, ``ShareGroupCommand`` (``kafka-share-groups.sh``), run with the local Java from the
broker jars ``local-kafka`` fetches with Maven. Per partition it reports the share-partition's
start offset (the earliest record not yet acknowledged; later ones may be done already) and the
lag in records. On a secured broker the client's security settings reach the tool as a Java
client properties file (``--command-config``, ``java_client_properties``), written with mode 0600
into a temporary folder and removed when the tool ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from stream_scorer.errors import BrokerError, ConfigError

TOOL = "org.apache.kafka.tools.consumer.group.ShareGroupCommand"

#: librdkafka settings that the Java properties below carry over, one way or another.
_CARRIED = frozenset(
    {
        "bootstrap.servers",
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.password",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.key.location",
        "ssl.key.password",
        "ssl.endpoint.identification.algorithm",
    }
)
_LOGIN_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def _jaas_quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _properties_value(value: str) -> str:
    """A value as a Java properties file reads it back (backslashes and line ends escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def java_client_properties(settings: Mapping[str, str], folder: Path) -> str:
    """The Java client properties of librdkafka ``settings`` (security only), as file text.

    SASL (PLAIN, SCRAM) becomes ``sasl.jaas.config``; ``ssl.ca.location`` a PEM trust store;
    a client certificate and key (mutual TLS) a PEM key store, written into ``folder``.

    Raises:
        ConfigError: a security setting the tool's Java client cannot be given this way
            (Kerberos, OAuth, a key store, ...), named.
    """
    props: dict[str, str] = {}
    protocol = settings.get("security.protocol", "plaintext").upper()
    props["security.protocol"] = protocol
    for key in sorted(settings):
        if key.startswith(("sasl.", "ssl.")) and key not in _CARRIED:
            raise ConfigError(
                f"kafka.client.{key}",
                "lag of a share group runs the broker's ShareGroupCommand, which this command "
                "gives SASL PLAIN/SCRAM and PEM TLS settings only; run kafka-share-groups.sh "
                "--describe with your client properties instead",
            )
    if protocol.startswith("SASL"):
        mechanism = settings.get("sasl.mechanism") or settings.get("sasl.mechanisms") or "GSSAPI"
        module = _LOGIN_MODULES.get(mechanism.upper())
        if module is None:
            raise ConfigError(
                "kafka.client.sasl.mechanism",
                f"lag of a share group supports SASL PLAIN and SCRAM, not {mechanism}",
            )
        props["sasl.mechanism"] = mechanism.upper()
        user, password = settings.get("sasl.username", ""), settings.get("sasl.password", "")
        props["sasl.jaas.config"] = (
            f"{module} required username={_jaas_quoted(user)} password={_jaas_quoted(password)};"
        )
    if "ssl.ca.location" in settings:
        props["ssl.truststore.type"] = "PEM"
        props["ssl.truststore.location"] = settings["ssl.ca.location"]
    if "ssl.certificate.location" in settings or "ssl.key.location" in settings:
        for key in ("ssl.certificate.location", "ssl.key.location"):
            if key not in settings:
                raise ConfigError(
                    f"kafka.client.{key}", "mutual TLS needs both the certificate and key"
                )
        pem = folder / "client.pem"  # the Java PEM key store: the key, then the certificates
        fd = os.open(pem, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            for key in ("ssl.key.location", "ssl.certificate.location"):
                fh.write(Path(settings[key]).read_text() + "\n")
        props["ssl.keystore.type"] = "PEM"
        props["ssl.keystore.location"] = str(pem)
        if "ssl.key.password" in settings:
            props["ssl.key.password"] = settings["ssl.key.password"]
    algorithm = settings.get("ssl.endpoint.identification.algorithm")
    if algorithm is not None:
        props["ssl.endpoint.identification.algorithm"] = "" if algorithm == "none" else algorithm
    return "".join(f"{k}={_properties_value(v)}\n" for k, v in props.items())


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
        settings: the librdkafka client settings (``bootstrap.servers``, security settings).
        group: the share group.
        topic: only this topic's partitions; None: all.
        java: the Java 17+ to run the tool with.
        libs: the folder of the broker's jars (``kafka-tools`` among them).
        timeout: seconds the tool may take.

    Raises:
        ConfigError: a security setting the tool cannot be given (``java_client_properties``).
        BrokerError: the tool failed or reported an error.
    """
    cmd = [java, "-cp", f"{libs}/*", TOOL, "--bootstrap-server", settings["bootstrap.servers"]]
    cmd += ["--describe", "--group", group]
    with tempfile.TemporaryDirectory(prefix="stream-scorer-sharelag-") as tmp:
        folder = Path(tmp)  # mode 0700; the password file inside 0600; removed on the way out
        if settings.get("security.protocol", "plaintext").lower() != "plaintext":
            config = folder / "client.properties"
            text = java_client_properties(settings, folder)
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            cmd += ["--command-config", str(config)]
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
