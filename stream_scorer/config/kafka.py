"""The one place where the configuration becomes librdkafka's dotted settings.

``consumer_settings`` and ``producer_settings`` for the worker's clients, ``client_settings`` for
the tools' admin and probe clients, ``kafka_client`` for the security settings they share.
"""

from __future__ import annotations

import os
import socket
from typing import Final

from stream_scorer.config.sections import EXACTLY_ONCE, Config, KafkaConfig
from stream_scorer.errors import ConfigError

#: librdkafka's default ``message.max.bytes``: a producer refuses larger records unless told.
CLIENT_MESSAGE_MAX_BYTES: Final = 1_000_000
#: The largest ``message.max.bytes`` librdkafka accepts.
CLIENT_MESSAGE_MAX_BYTES_LIMIT: Final = 1_000_000_000
#: librdkafka's default ``batch.size``: the most bytes of records it batches in one request.
CLIENT_BATCH_SIZE: Final = 1_000_000
#: Room beyond a record's key, value and headers for its framing (record batch, varints).
RECORD_OVERHEAD_BYTES: Final = 65_536


def worker_identity(cfg: Config) -> str:
    """Return the worker id.

    ``worker.id`` when set; else the host name in exactly-once mode (so that the transactional
    id survives restarts); else ``<hostname>-<pid>``.
    """
    if cfg.worker.id:
        return cfg.worker.id
    if cfg.delivery.mode == EXACTLY_ONCE:
        return socket.gethostname()
    return f"{socket.gethostname()}-{os.getpid()}"


def transactional_id(cfg: Config, worker_id: str) -> str:
    """Return the exactly-once producer's transactional id."""
    return cfg.delivery.transactional_id or f"stream-scorer-{cfg.input.group_id}-{worker_id}"


def kafka_client(kafka: KafkaConfig) -> dict[str, str]:
    """Return ``kafka.client`` with the ``kafka.secret_files`` read into it (security settings).

    Raises:
        ConfigError: a secret file cannot be read (names the key, never the content).
    """
    settings = dict(kafka.client)
    for key, path in kafka.secret_files.items():
        try:
            settings[key] = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(
                f"kafka.secret_files.{key}", f"cannot read {path}: {reason}"
            ) from None
    return settings


def client_settings(cfg: Config) -> dict[str, str]:
    """Return the librdkafka settings for the tools' own clients: the brokers and security.

    For admin and probe clients (the start-up topic check, the ``lag`` command), which need
    ``kafka.client`` (SASL, TLS) but none of the consumer's or producer's own settings.
    """
    return {"bootstrap.servers": cfg.kafka.bootstrap_servers, **kafka_client(cfg.kafka)}


def consumer_settings(cfg: Config, worker_id: str) -> dict[str, str]:
    """Return the librdkafka settings for the worker's consumer.

    At-least-once: auto-commit of stored offsets (plus explicit commits on revoke and close).
    Exactly-once: no consumer commits at all; offsets commit inside each transaction.
    """
    exactly_once = cfg.delivery.mode == EXACTLY_ONCE
    settings = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "group.id": cfg.input.group_id,
        "client.id": f"stream-scorer-{worker_id}",
        "enable.auto.commit": "false" if exactly_once else "true",
        "isolation.level": "read_committed",
        "auto.commit.interval.ms": "1000",
        "enable.auto.offset.store": "false",
        "auto.offset.reset": cfg.input.auto_offset_reset,
        "partition.assignment.strategy": "cooperative-sticky",
        "statistics.interval.ms": str(cfg.kafka.statistics_interval_ms),
        "fetch.max.bytes": str(max(52_428_800, cfg.input.max_message_bytes * 2)),
    }
    if cfg.delivery.static_membership:
        settings["group.instance.id"] = f"{cfg.input.group_id}-{worker_id}"
    settings.update(kafka_client(cfg.kafka))
    settings.update(cfg.kafka.consumer)
    if settings.get("group.protocol") == "consumer":  # KIP-848: the broker assigns
        settings.pop("partition.assignment.strategy", None)
    return settings


#: Consumer-group settings librdkafka's share consumer refuses ("not applicable").
_NOT_FOR_SHARE: Final = frozenset(
    {
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "auto.offset.reset",
        "isolation.level",
        "partition.assignment.strategy",
        "group.instance.id",
        "group.protocol",
        "group.remote.assignor",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "enable.partition.eof",
    }
)


def share_consumer_settings(cfg: Config, worker_id: str) -> dict[str, str]:
    """Return the librdkafka settings for the worker's share consumer (``group_type: share``).

    Explicit acknowledgement: each record is acknowledged after its output is delivered. The
    start position, lock duration and delivery limit are the group's settings, not the
    client's (``stream_scorer.worker.share``). ``max.poll.records`` follows
    ``batch.max_records`` (a soft bound: one member can take a whole backlog).
    """
    settings = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "group.id": cfg.input.group_id,
        "client.id": f"stream-scorer-{worker_id}",
        "share.acknowledgement.mode": "explicit",
        "max.poll.records": str(cfg.batch.max_records),
        "statistics.interval.ms": str(cfg.kafka.statistics_interval_ms),
        "fetch.max.bytes": str(max(52_428_800, cfg.input.max_message_bytes * 2)),
    }
    settings.update(kafka_client(cfg.kafka))
    settings.update({k: v for k, v in cfg.kafka.consumer.items() if k not in _NOT_FOR_SHARE})
    return settings


def producer_settings(
    cfg: Config, worker_id: str, dead_letter_max_bytes: int = 0
) -> dict[str, str]:
    """Return the librdkafka settings for the worker's producer (predictions, dead letters).

    A message not acknowledged within ``message.timeout.ms`` (default: two minutes; in
    exactly-once mode at most the transaction timeout) fails its delivery, and the worker stops.

    ``dead_letter_max_bytes``: the dead-letter topic's ``max.message.bytes`` (0: unknown). The
    producer takes records that large (dead letters up to the topic's limit keep their
    payload), and batches no more than that (several dead letters in one batch must fit too).
    """
    txn_ms = int(cfg.delivery.transaction_timeout_s * 1000)
    largest = max(
        CLIENT_MESSAGE_MAX_BYTES,
        cfg.input.max_message_bytes + RECORD_OVERHEAD_BYTES,
        min(dead_letter_max_bytes, CLIENT_MESSAGE_MAX_BYTES_LIMIT),
    )
    settings = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "client.id": f"stream-scorer-{worker_id}",
        "enable.idempotence": "true",
        "acks": "all",
        "linger.ms": "5",
        "message.max.bytes": str(largest),
        "message.timeout.ms": "120000",
    }
    if 0 < dead_letter_max_bytes < CLIENT_BATCH_SIZE:
        settings["batch.size"] = str(dead_letter_max_bytes)
    if cfg.delivery.mode == EXACTLY_ONCE:
        settings["transactional.id"] = transactional_id(cfg, worker_id)
        settings["transaction.timeout.ms"] = str(txn_ms)
        settings["message.timeout.ms"] = str(txn_ms)
    settings.update(kafka_client(cfg.kafka))
    settings.update(cfg.kafka.producer)
    if cfg.delivery.mode == EXACTLY_ONCE and int(settings["message.timeout.ms"]) > txn_ms:
        raise ConfigError(
            "kafka.producer.message.timeout.ms",
            "must not exceed delivery.transaction_timeout_s in exactly-once mode",
        )
    return settings
