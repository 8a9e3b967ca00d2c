"""Admin calls shared by the worker, the operator commands, the demo and the tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from stream_scorer.errors import BrokerError, ConfigError, broker_unreachable
from stream_scorer.logs import client_logger
from stream_scorer.retry import retried

log = logging.getLogger(__name__)

#: A partition: (topic, partition).
TP = tuple[str, int]
_RDKAFKA_LOG = client_logger("admin")
#: Each metadata request of ``require_topics`` waits this long before the stop flag is checked.
_PROBE_S = 1.0


def require_topics(
    settings: Mapping[str, str],
    topics: Mapping[str, str],
    *,
    unreachable_timeout_s: float,
    stop: Callable[[], bool] = lambda: False,
    alive: Callable[[], None] = lambda: None,
) -> None:
    """Check, once, that every topic in ``topics`` exists; wait for a broker to answer.

    One metadata request for every topic (a listing, which never auto-creates one), retried
    until a broker answers or ``unreachable_timeout_s`` has passed. The client's own lines
    (one per failed connection attempt) are not logged: its last error goes into the raised
    error instead, and one warning says the wait has begun.

    Args:
        settings: librdkafka client settings (``bootstrap.servers``, security).
        topics: the configuration key naming each topic (``input.topic``) to the topic.
        unreachable_timeout_s: how long to wait for a broker (``kafka.unreachable_timeout_s``).
        stop: returns True once the caller was asked to stop: stop waiting, raise nothing.
        alive: called about once a second while no broker answers (the worker's liveness:
            waiting, bounded, for a broker is progress).

    Raises:
        ConfigError: a topic does not exist (names its key and the topic; the others missing
            too are listed in the message); or ``security.protocol`` does not match the
            listener: the broker speaks TLS to a client without it, or requires SASL of a
            client without it (at once, naming what to set).
        AccessDeniedError: the broker refused the credentials or the TLS handshake failed (at
            once: no retry can fix them).
        BrokerError: no broker answered within ``unreachable_timeout_s``.
    """
    bootstrap = settings.get("bootstrap.servers", "")
    errors: list[KafkaError] = []
    admin_settings: dict[str, Any] = {
        "log_level": "0",
        **settings,
        "logger": _RDKAFKA_LOG,
        "error_cb": errors.append,  # served by poll() below; appending never raises
    }
    admin = AdminClient(admin_settings)
    started = time.monotonic()
    warned = False
    while True:
        try:
            listed = admin.list_topics(timeout=_PROBE_S).topics
            break
        except KafkaException as exc:
            admin.poll(0)
            _raise_refused(errors, settings, probe_tls=not warned)
            last = errors[-1] if errors else (exc.args[0] if exc.args else exc)
            last = last.str() if isinstance(last, KafkaError) else last
            down = time.monotonic() - started
            if stop():
                return
            alive()
            if down >= unreachable_timeout_s:
                raise broker_unreachable(bootstrap, down, unreachable_timeout_s, last) from exc
            if not warned:
                warned = True
                log.warning(
                    "no broker reachable at %s yet (%s): waiting up to %.0f s "
                    "(kafka.unreachable_timeout_s)",
                    bootstrap,
                    last,
                    unreachable_timeout_s,
                )
    missing = [(key, name) for key, name in topics.items() if name not in listed]
    if missing:
        (key, name), others = missing[0], missing[1:]
        also = "".join(f"; {k}: topic {n!r} does not exist either" for k, n in others)
        raise ConfigError(
            key,
            f"topic {name!r} does not exist at {bootstrap} (or this client may not describe it):"
            f" create it before starting{also}",
        )


def topic_max_message_bytes(settings: Mapping[str, str], topic: str, timeout_s: float) -> int:
    """The topic's ``max.message.bytes`` on the broker (a DescribeConfigs request).

    Raises:
        AccessDeniedError: this principal may not describe the topic's configuration.
        BrokerError: the broker did not answer within ``timeout_s`` or refused otherwise.
    """
    from confluent_kafka.admin import ConfigResource  # type: ignore[attr-defined]

    from stream_scorer.kafka.access import Grant, denied, principal_of

    resource = ConfigResource("topic", topic)
    admin = AdminClient({**settings, "log_level": "3"})
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout_s)[resource]
        return int(entries.result(timeout=timeout_s)["max.message.bytes"].value)
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        need = Grant("topic", topic, "configs")
        refused = denied(err, need, principal_of(settings))
        if refused is not None:
            raise refused from None
        raise BrokerError(f"cannot read max.message.bytes of topic {topic!r}: {exc}") from exc
    except (TimeoutError, KeyError, ValueError) as exc:
        raise BrokerError(
            f"cannot read max.message.bytes of topic {topic!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _raise_refused(
    errors: list[KafkaError], settings: Mapping[str, str], *, probe_tls: bool
) -> None:
    """Raise what no retry fixes: refused credentials or TLS, or a security protocol mismatch.

    With ``probe_tls`` (the first failed attempt) the brokers are asked what they speak: TLS to
    a client without it, or SASL (``SaslHandshake``) to a client without it.
    """
    from stream_scorer.kafka.access import refused_connection

    for err in errors:
        refused = refused_connection(err, settings)
        if refused is not None:
            raise refused
    if not probe_tls:
        return
    protocol = settings.get("security.protocol", "plaintext").lower()
    addresses = [a.strip() for a in settings.get("bootstrap.servers", "").split(",") if a.strip()]
    if protocol in ("plaintext", "sasl_plaintext"):
        tls = next((a for a in addresses if _speaks_tls(a)), None)
        if tls is not None:
            raise ConfigError(
                "kafka.client.security.protocol",
                f"the broker at {tls} speaks TLS and this client {protocol.upper()}: set "
                "kafka.client security.protocol to SSL or SASL_SSL (and ssl.ca.location)",
            )
    if protocol in ("plaintext", "ssl"):
        for address in addresses:
            mechanisms = sasl_mechanisms(address, tls=protocol == "ssl")
            if mechanisms:
                wanted = "SASL_SSL" if protocol == "ssl" else "SASL_PLAINTEXT"
                raise ConfigError(
                    "kafka.client.security.protocol",
                    f"the broker at {address} requires SASL ({', '.join(mechanisms)}) and this "
                    f"client speaks {protocol.upper()} without it: set kafka.client "
                    f"security.protocol to {wanted}, sasl.mechanism to {mechanisms[0]}, "
                    "sasl.username, and sasl.password (kafka.secret_files)",
                )


#: Kafka's SaslHandshake request (api key 17, version 1) and its error codes.
_SASL_HANDSHAKE = 17
_SASL_ANSWERS = frozenset({0, 33})  # NONE, UNSUPPORTED_SASL_MECHANISM: the mechanisms follow


def sasl_mechanisms(address: str, *, tls: bool, timeout_s: float = 2.0) -> list[str]:
    """The SASL mechanisms the listener at ``host:port`` requires; empty: none (or no answer).

    Sends one ``SaslHandshake`` request (over TLS, its certificate not checked, when ``tls``),
    as a client does before authenticating: a SASL listener answers with its enabled
    mechanisms, any other answers ``ILLEGAL_SASL_STATE`` or closes the connection. Nothing
    secret is sent.
    """
    import socket
    import ssl
    import struct

    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    client_id, mechanism = b"stream-scorer-probe", b"PLAIN"
    body = struct.pack(">hhih", _SASL_HANDSHAKE, 1, 1, len(client_id)) + client_id
    body += struct.pack(">h", len(mechanism)) + mechanism
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as raw:
            conn: socket.socket = raw
            if tls:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                conn = context.wrap_socket(raw, server_hostname=host or None)
            conn.sendall(struct.pack(">i", len(body)) + body)
            answer = _read_frame(conn)
    except (OSError, ValueError, struct.error):
        return []
    try:
        _correlation, error, count = struct.unpack_from(">ihi", answer)
        if error not in _SASL_ANSWERS:
            return []
        offset, names = 10, []
        for _ in range(count):
            (size,) = struct.unpack_from(">h", answer, offset)
            names.append(answer[offset + 2 : offset + 2 + size].decode("utf-8", "replace"))
            offset += 2 + size
    except struct.error:
        return []
    return names


def _read_frame(conn: Any) -> bytes:
    """One size-prefixed Kafka response (at most 64 KiB); ValueError when the peer closes."""
    import struct

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ValueError("closed")
            data += chunk
        return data

    (size,) = struct.unpack(">i", exactly(4))
    if not 0 < size <= 65_536:
        raise ValueError(f"not a Kafka response of {size} bytes")
    return exactly(size)


def _speaks_tls(address: str, timeout_s: float = 2.0) -> bool:
    """Whether ``host:port`` completes a TLS handshake (its certificate is not checked)."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw,
            context.wrap_socket(raw, server_hostname=host.strip("[]") or None),
        ):
            return True
    except (OSError, ValueError):
        return False


def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    *,
    timeout: float = 30.0,
    config: Mapping[str, str] | None = None,
    replication_factor: int = 1,
    client: Mapping[str, Any] | None = None,
) -> frozenset[str]:
    """Create ``topics`` (name to partition count) unless they exist; return those created.

    A topic that already exists with the asked partition count is fine. Returns once every
    topic appears in the metadata with a leader for each partition: the names it created (the
    others were there already).

    Args:
        bootstrap: the brokers, ``host:port[,host:port...]``.
        topics: topic name to partition count.
        timeout: seconds for the whole operation.
        config: topic configuration applied to the topics created (not to existing ones).
        replication_factor: replicas of each partition of the topics created.
        client: librdkafka settings for the admin client (security: SASL, TLS).

    Raises:
        BrokerError: the broker does not answer, refuses a topic, an existing topic has
            another partition count, or the topics get no leaders within ``timeout``.
    """
    if not topics:
        return frozenset()
    deadline = time.monotonic() + timeout
    settings: dict[str, Any] = {
        **(client or {}),
        "bootstrap.servers": bootstrap,
        "logger": _RDKAFKA_LOG,
    }
    admin = AdminClient(settings)
    new = [
        NewTopic(
            name,
            num_partitions=n,
            replication_factor=replication_factor,
            config=dict(config or {}),
        )
        for name, n in topics.items()
    ]
    try:
        futures = admin.create_topics(new, request_timeout=timeout)
    except (KafkaException, ValueError, TypeError) as exc:
        raise BrokerError(f"cannot create topics {sorted(topics)} at {bootstrap}: {exc}") from exc
    existed: set[str] = set()
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                existed.add(name)
                continue
            raise BrokerError(f"cannot create topic at {bootstrap}: {err}", topic=name) from exc
        except TimeoutError as exc:
            raise BrokerError(
                f"the broker at {bootstrap} did not answer within {timeout:.0f} s", topic=name
            ) from exc
    pending = dict(topics)
    while True:
        try:
            listed = admin.list_topics(timeout=max(0.5, min(5.0, deadline - time.monotonic())))
        except KafkaException:
            listed = None  # retried until the deadline
        found = listed.topics if listed is not None else {}
        for name in list(pending):
            tmeta = found.get(name)
            if tmeta is None or tmeta.error is not None or not tmeta.partitions:
                continue
            if name in existed and len(tmeta.partitions) != pending[name]:
                raise BrokerError(
                    f"topic exists with {len(tmeta.partitions)} partitions, {pending[name]} "
                    "asked: delete it or use another name",
                    topic=name,
                )
            if len(tmeta.partitions) >= pending[name] and all(
                p.leader >= 0 for p in tmeta.partitions.values()
            ):
                del pending[name]
        if not pending:
            return frozenset(topics) - existed
        if time.monotonic() > deadline:
            raise BrokerError(
                f"topics without a leader for every partition at {bootstrap} after "
                f"{timeout:.0f} s: {', '.join(sorted(pending))}"
            )
        time.sleep(0.1)


_COORDINATOR_CODES = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError._TIMED_OUT,
        # a restarted broker answers before its partitions have leaders again
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
    }
)


def coordinator_busy(err: KafkaError) -> bool:
    """Whether ``err`` is retriable: a busy coordinator, a leaderless partition, a timeout.

    The group coordinator loading or moving, a partition without its leader yet (just after a
    broker restart), or a request that timed out.
    """
    return bool(err.retriable()) or err.code() in _COORDINATOR_CODES


def kafka_busy(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``KafkaException`` of a ``coordinator_busy`` error: an outage."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(err, KafkaError) and coordinator_busy(err)


_COORDINATOR_RETRY = retried(30.0, server="group coordinator", outage=kafka_busy)


@_COORDINATOR_RETRY
def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Return ``group``'s committed offset per partition of ``topic`` (-1001 where none).

    Retries while the group coordinator is loading or moving (a fresh broker), for at most 30 s.
    """
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": "false"}
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        return {tp.partition: tp.offset for tp in committed}
    finally:
        consumer.close()


@_COORDINATOR_RETRY
def group_lag(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Return, per partition of ``topic``, the high watermark minus ``group``'s committed offset.

    A partition the group never committed counts from its low watermark
    (docs/manual/observability.md, "Lag").
    Retries while the group coordinator is loading or moving (a fresh broker), for at most 30 s.
    """
    committed = committed_offsets(bootstrap, group, topic)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}-watermarks"})
    try:
        lag = {}
        for partition, offset in committed.items():
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            lag[partition] = high - (offset if offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def describe_group(admin: AdminClient, group: str, timeout_s: float = 10.0) -> Any | None:
    """The group's ``ConsumerGroupDescription``, or None while it cannot be had.

    None: the group does not exist yet (no member ever joined), its coordinator is loading, or
    the broker does not answer; callers polling for a condition simply ask again.
    """
    try:
        return admin.describe_consumer_groups([group], request_timeout=timeout_s)[group].result(
            timeout=timeout_s
        )
    except (KafkaException, TimeoutError):  # the future's own timeout: no answer in time
        return None


def members_holding_partitions(description: Any | None, partitions: int) -> int:
    """How many members hold partitions once all ``partitions`` are held; 0 before that.

    All held means the rebalance is done; 0 too without a description.
    """
    if description is None:
        return 0
    held = [len(m.assignment.topic_partitions) for m in description.members]
    return len([h for h in held if h]) if sum(held) == partitions else 0


def latest_values(
    bootstrap: str,
    topic: str,
    count: int,
    *,
    settings: Mapping[str, Any] | None = None,
    timeout_s: float = 60.0,
) -> list[bytes | None]:
    """The values of the last ``count`` records of ``topic``, about as many from each partition.

    Fewer when the topic holds fewer. Read with a consumer of its own (no group offsets).

    Raises:
        BrokerError: the topic does not exist, a consume error, or the records were not read
            within ``timeout_s``.
    """
    import uuid

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"sample-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": "false",
            "isolation.level": "read_committed",
            "enable.partition.eof": "true",
            **(settings or {}),
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise BrokerError(f"topic {topic!r} does not exist", topic=topic)
        parts = sorted(meta.partitions)
        share = -(-count // len(parts))
        starts, ends = {}, {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            starts[p], ends[p] = max(low, high - share), high
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in parts if ends[p] > starts[p]])
        out: list[bytes | None] = []
        last = {p: starts[p] - 1 for p in parts}
        deadline = time.monotonic() + timeout_s
        while any(last[p] < ends[p] - 1 for p in parts):
            if time.monotonic() > deadline:
                raise BrokerError(f"read {len(out)} records of {topic} in {timeout_s} s, not all")
            for msg in consumer.consume(1000, 0.5):
                err, partition, offset = msg.error(), msg.partition() or 0, msg.offset() or 0
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:  # the rest: markers
                        last[partition] = ends[partition]
                        continue
                    raise BrokerError(f"reading {topic}: {err}", topic=topic)
                last[partition] = offset
                out.append(msg.value())
        return out[-count:] if len(out) > count else out
    finally:
        consumer.close()
