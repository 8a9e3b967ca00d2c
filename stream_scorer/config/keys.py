"""Which librdkafka keys are whose, and which values may be shown: the configuration's key sets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

#: Words that make a key secret (its value never shown in a message); ``dsn``: a database
#: connection string can hold a password.
SECRET_MARKERS: Final = ("password", "secret", "token", "key", "dsn")
#: The librdkafka pass-through tables (``kafka.<name>``): any key, values passed as strings.
PASSTHROUGH: Final = ("client", "consumer", "producer")

# librdkafka keys that stream-scorer derives from its own settings and must not be overridden.
OWNED_KEYS: Final = frozenset(
    {
        "bootstrap.servers",
        "group.id",
        "enable.auto.offset.store",
        "statistics.interval.ms",
        "transactional.id",
        "group.instance.id",
        "isolation.level",
        "enable.auto.commit",
    }
)


def is_secret(name: str) -> bool:
    """Whether a key named ``name`` holds a secret (its value is never shown)."""
    return any(m in name.lower() for m in SECRET_MARKERS)


#: librdkafka keys whose values may be logged (``redacted``); any other key's value is not,
#: whatever its name: a misspelled ``sasl.passwd`` or a new secret-bearing key included.
LOGGABLE_KEYS: Final = frozenset(
    {
        # set by stream-scorer
        *OWNED_KEYS,
        "client.id",
        "auto.commit.interval.ms",
        "auto.offset.reset",
        "share.acknowledgement.mode",
        "max.poll.records",
        "partition.assignment.strategy",
        "fetch.max.bytes",
        "enable.idempotence",
        "acks",
        "linger.ms",
        "message.max.bytes",
        "message.timeout.ms",
        "transaction.timeout.ms",
        # connection and security (no secrets: mechanisms, user names, file locations)
        "security.protocol",
        "sasl.mechanism",
        "sasl.mechanisms",
        "sasl.username",
        "sasl.kerberos.service.name",
        "sasl.kerberos.principal",
        "sasl.oauthbearer.method",
        "sasl.oauthbearer.client.id",
        "sasl.oauthbearer.scope",
        "sasl.oauthbearer.token.endpoint.url",
        "ssl.ca.location",
        "ssl.certificate.location",
        "ssl.endpoint.identification.algorithm",
        "client.rack",
        "broker.address.family",
        "socket.timeout.ms",
        "socket.keepalive.enable",
        "socket.connection.setup.timeout.ms",
        "connections.max.idle.ms",
        "reconnect.backoff.ms",
        "reconnect.backoff.max.ms",
        "retry.backoff.ms",
        "retry.backoff.max.ms",
        "request.timeout.ms",
        "metadata.max.age.ms",
        "topic.metadata.refresh.interval.ms",
        "api.version.request",
        "debug",
        "log_level",
        # consumer
        "group.protocol",
        "group.remote.assignor",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "max.poll.interval.ms",
        "fetch.min.bytes",
        "fetch.wait.max.ms",
        "max.partition.fetch.bytes",
        "fetch.message.max.bytes",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "enable.partition.eof",
        "check.crcs",
        "allow.auto.create.topics",
        # producer
        "batch.size",
        "batch.num.messages",
        "compression.type",
        "compression.codec",
        "compression.level",
        "queue.buffering.max.ms",
        "queue.buffering.max.messages",
        "queue.buffering.max.kbytes",
        "request.required.acks",
        "delivery.timeout.ms",
        "retries",
        "message.send.max.retries",
        "max.in.flight.requests.per.connection",
        "max.in.flight",
        "partitioner",
        "sticky.partitioning.linger.ms",
    }
)


def redacted(settings: Mapping[str, str]) -> dict[str, str]:
    """Return librdkafka ``settings`` for logs: values only of ``LOGGABLE_KEYS``, others ``***``."""
    return {k: (v if k in LOGGABLE_KEYS else "***") for k, v in settings.items()}
