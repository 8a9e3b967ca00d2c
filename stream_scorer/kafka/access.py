"""Least-privilege ACLs: what each role needs, the start-up access check, refusals' words.

The one home of the rights stream-scorer's clients need (docs/manual/security.md):

- ``worker``: READ + DESCRIBE on the input topic, READ on its group, WRITE + DESCRIBE on the
  output and dead-letter topics, DESCRIBE_CONFIGS on the dead-letter topic (its
  ``max.message.bytes``, which every dead letter is sized to); exactly-once adds WRITE +
  DESCRIBE on its transactional ids (prefixed ``stream-scorer-<group>-``, or
  ``delivery.transactional_id`` itself). A share group (``input.group_type: share``) adds
  ALTER_CONFIGS on the group: the worker sets its start position and delivery limit
  (``worker.share.configure_group``); READ on the group covers joining, fetching and
  acknowledging.
  IDEMPOTENT_WRITE on the cluster is implied by WRITE on a topic (Kafka 3.0+, KIP-679) and
  not granted.
- ``lag``: DESCRIBE on the group, READ + DESCRIBE on the input topic (the record at the
  committed offset gives the lag in seconds).
- ``replay``: READ + DESCRIBE on the dead-letter topic, READ on the groups and WRITE + DESCRIBE
  on the transactional ids prefixed ``stream-scorer-replay-``, WRITE + DESCRIBE on the target
  (the input topic).

The same table words the error a worker stops with when the broker refuses one of them
(``denied``): what was refused, the broker's code, and what to grant to whom.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from confluent_kafka import KafkaError, KafkaException

from stream_scorer.config import EXACTLY_ONCE, Config, transactional_id
from stream_scorer.errors import AccessDeniedError, ConfigError
from stream_scorer.kafka.topics import kafka_busy
from stream_scorer.retry import retrying

log = logging.getLogger(__name__)

Resource = Literal["topic", "group", "transactional_id"]
#: What a client does with a resource, and the ACL operations that allows.
Use = Literal["read", "write", "member", "describe", "configs", "configure"]
_OPERATIONS: Final[dict[tuple[Resource, Use], tuple[str, ...]]] = {
    ("topic", "read"): ("READ", "DESCRIBE"),
    ("topic", "write"): ("WRITE", "DESCRIBE"),
    ("topic", "describe"): ("DESCRIBE",),
    ("topic", "configs"): ("DESCRIBE_CONFIGS",),
    ("group", "member"): ("READ",),
    ("group", "describe"): ("DESCRIBE",),
    ("group", "configure"): ("ALTER_CONFIGS",),
    ("transactional_id", "write"): ("WRITE", "DESCRIBE"),
}
ROLES: Final = ("worker", "lag", "replay")
#: The prefix of the groups and transactional ids of ``stream-scorer replay`` (``ops.replay``).
REPLAY_PREFIX: Final = "stream-scorer-replay-"
_WORDS: Final[dict[Resource, str]] = {
    "topic": "topic",
    "group": "group",
    "transactional_id": "transactional id",
}


@dataclass(frozen=True)
class Grant:
    """One resource (or resource prefix) and what a role does with it."""

    resource: Resource
    name: str
    use: Use
    prefixed: bool = False

    @property
    def operations(self) -> tuple[str, ...]:
        """The ACL operations this use needs."""
        return _OPERATIONS[(self.resource, self.use)]

    def covers(self, other: Grant) -> bool:
        """Whether this grant allows what ``other`` needs (same use, name or prefix)."""
        if (self.resource, self.use) != (other.resource, other.use):
            return False
        return other.name.startswith(self.name) if self.prefixed else other.name == self.name

    def describe(self) -> str:
        """``WRITE and DESCRIBE on topic 'x'`` (or ``... on transactional ids prefixed 'x'``)."""
        ops = " and ".join(self.operations)
        word = _WORDS[self.resource]
        where = f"{word}s prefixed {self.name!r}" if self.prefixed else f"{word} {self.name!r}"
        return f"{ops} on {where}"


def transactional_prefix(cfg: Config) -> tuple[str, bool]:
    """The worker's transactional ids: (``delivery.transactional_id``, False) or (prefix, True)."""
    if cfg.delivery.transactional_id:
        return cfg.delivery.transactional_id, False
    return transactional_id(cfg, ""), True


def role_grants(cfg: Config, role: str) -> list[Grant]:
    """What ``role`` needs for the deployment ``cfg`` describes (the worker: in its mode).

    Raises:
        ConfigError: an unknown role.
    """
    topic, group = cfg.input.topic, cfg.input.group_id
    # input.topics: the named ones; a ^pattern has no ACL of its kind (grant its topics apart)
    more = [Grant("topic", t, "read") for t in cfg.input.topics if not t.startswith("^")]
    if role == "worker":
        grants = [
            Grant("topic", topic, "read"),
            *more,
            Grant("group", group, "member"),
            *(Grant("topic", e.output.topic, "write") for e in cfg.entries),
            Grant("topic", cfg.dead_letter.topic, "write"),
            Grant("topic", cfg.dead_letter.topic, "configs"),
        ]
        if cfg.input.group_type == "share":  # the start position and delivery limit it sets
            grants.append(Grant("group", group, "configure"))
        if cfg.delivery.mode == EXACTLY_ONCE:
            name, prefixed = transactional_prefix(cfg)
            grants.append(Grant("transactional_id", name, "write", prefixed))
        return grants
    if role == "lag":
        return [Grant("group", group, "describe"), Grant("topic", topic, "read"), *more]
    if role == "replay":
        return [
            Grant("topic", cfg.dead_letter.topic, "read"),
            Grant("group", REPLAY_PREFIX, "member", prefixed=True),
            Grant("transactional_id", REPLAY_PREFIX, "write", prefixed=True),
            Grant("topic", topic, "write"),
        ]
    raise ConfigError("--role", f"must be one of {', '.join(ROLES)}, got {role!r}")


# --- the words for a refusal ---------------------------------------------------------------------

#: The broker's authorization codes, and the resource each is about.
AUTHORIZATION_CODES: Final[dict[int, Resource | None]] = {
    KafkaError.TOPIC_AUTHORIZATION_FAILED: "topic",
    KafkaError.GROUP_AUTHORIZATION_FAILED: "group",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "transactional_id",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: None,
}
_VERBS: Final[dict[Use, str]] = {
    "read": "read",
    "write": "write",
    "member": "join",
    "describe": "describe",
    "configs": "read the configuration of",
    "configure": "change the configuration of",
}


def denied(
    err: KafkaError | None,
    need: Grant,
    principal: str = "",
    role: str = "worker",
    grants: Sequence[Grant] = (),
) -> AccessDeniedError | None:
    """The error for ``err`` when it is an authorization refusal of ``need``, else None.

    Args:
        err: the broker's error.
        need: what the client tried (``Grant("topic", "x", "write")``).
        principal: ``User:<name>`` when known (``sasl.username``), for the hint.
        role: the ``acl grant`` role that includes ``need``.
        grants: the role's grants (``role_grants``): the hint names the one covering
            ``need`` (a prefix, for transactional ids), else ``need`` itself.
    """
    if err is None or err.code() not in AUTHORIZATION_CODES:
        return None
    who = principal or "this client's principal"
    if AUTHORIZATION_CODES[err.code()] is None:
        return AccessDeniedError(
            f"not authorized on the cluster ({err.name()}): grant IDEMPOTENT_WRITE on the "
            f"cluster to {who}"
        )
    word = _WORDS[need.resource]
    verb = "use" if need.resource == "transactional_id" else _VERBS[need.use]
    hint = next((g for g in grants if g.covers(need)), need)
    return AccessDeniedError(
        f"not authorized to {verb} {word} {need.name!r} ({err.name()}): grant "
        f"{hint.describe()} to {who} (stream-scorer acl grant --role {role})"
    )


def principal_of(settings: Mapping[str, Any]) -> str:
    """``User:<sasl.username>`` when the settings authenticate with SASL, else empty."""
    user = settings.get("sasl.username")
    return f"User:{user}" if user else ""


def refused_connection(err: KafkaError, settings: Mapping[str, Any]) -> AccessDeniedError | None:
    """The error for a client error that no retry can fix: bad credentials or TLS, else None.

    Authentication failures (wrong user or password, wrong mechanism) and TLS handshake
    failures (an untrusted broker certificate) repeat identically on every attempt.
    """
    bootstrap = settings.get("bootstrap.servers", "")
    if err.code() == KafkaError._AUTHENTICATION:
        user = settings.get("sasl.username", "")
        return AccessDeniedError(
            f"authentication failed at {bootstrap} as user {user!r} "
            f"({settings.get('sasl.mechanism', 'no SASL mechanism')}): the broker refused the "
            "credentials; check kafka.client sasl.username and the password "
            f"(kafka.secret_files); broker said: {_without_address(err.str())}"
        )
    if err.code() == KafkaError._SSL:
        return AccessDeniedError(
            f"TLS handshake with {bootstrap} failed: {_without_address(err.str())}; check "
            "kafka.client ssl.ca.location (the CA that signed the broker's certificate)"
        )
    return None


def _without_address(text: str) -> str:
    """Librdkafka's ``proto://host:port/id: message`` without its prefix."""
    head, sep, rest = text.partition(": ")
    return rest if sep and "://" in head else text


def _describe_groups(
    admin: Any, names: list[str], deadline: float
) -> dict[tuple[Resource, str], Any]:
    """The groups' descriptions with their authorized operations.

    Retried while the group coordinator is busy until ``deadline``: on a fresh broker the first
    asks get NOT_COORDINATOR while the offsets topic is being created.
    """

    def ask() -> dict[tuple[Resource, str], Any]:
        timeout_s = max(1.0, deadline - time.monotonic())
        futures = admin.describe_consumer_groups(
            names, request_timeout=timeout_s, include_authorized_operations=True
        )
        return {("group", n): f.result(timeout=timeout_s) for n, f in futures.items()}

    left = max(0.0, deadline - time.monotonic())
    return retrying(left, "describe groups", server="group coordinator", outage=kafka_busy)(ask)


def check_access(
    settings: Mapping[str, Any],
    grants: Sequence[Grant],
    *,
    role: str = "worker",
    timeout_s: float = 30.0,
) -> None:
    """Check, before anything is consumed, that the topics and groups of ``grants`` allow them.

    One describe request for the topics and one for the groups, asking the broker which
    operations this client may perform (``include_authorized_operations``). A broker that does
    not say (no authorizer: every operation allowed, or an old broker) passes. Transactional
    ids cannot be asked about: ``init_transactions`` finds a missing one at start-up.

    Raises:
        AccessDeniedError: a right is missing (names the resource, the operation and the grant).
    """
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AdminClient

    principal = principal_of(settings)
    admin = AdminClient({**settings, "log_level": "3"})
    topics = [g for g in grants if g.resource == "topic" and not g.prefixed]
    groups = [g for g in grants if g.resource == "group" and not g.prefixed]
    found: dict[tuple[Resource, str], Any] = {}
    try:
        if topics:
            names = sorted({g.name for g in topics})
            futures = admin.describe_topics(
                TopicCollection(names),
                request_timeout=timeout_s,
                include_authorized_operations=True,
            )
            for name, future in futures.items():
                found[("topic", name)] = future.result(timeout=timeout_s)
        if groups:
            names = sorted({g.name for g in groups})
            found.update(_describe_groups(admin, names, time.monotonic() + timeout_s))
    except TimeoutError:
        log.warning("the broker did not say within %.0f s which operations are allowed", timeout_s)
        return
    except KafkaException as exc:
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        kind = AUTHORIZATION_CODES.get(err.code()) if err is not None else None
        need = next((g for g in [*topics, *groups] if g.resource == kind), None)
        refused = denied(err, need, principal, role, grants) if need is not None else None
        if refused is not None:
            raise refused from None
        log.warning("cannot ask the broker which operations are allowed (%s): not checked", exc)
        return
    for need in [*topics, *groups]:
        allowed = getattr(found.get((need.resource, need.name)), "authorized_operations", None)
        if not allowed:
            continue  # the broker did not say (no authorizer, or an old broker)
        ops = {op.name for op in allowed}
        missing = [op for op in need.operations if op not in ops and "ALL" not in ops]
        if missing:
            word = _WORDS[need.resource]
            verb = "use" if need.resource == "transactional_id" else _VERBS[need.use]
            who = principal or "this client's principal"
            raise AccessDeniedError(
                f"not authorized to {verb} {word} {need.name!r} (no {' and '.join(missing)} "
                f"ACL): grant {need.describe()} to {who} (stream-scorer acl grant --role {role})"
            )
