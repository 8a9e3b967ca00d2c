"""``stream-scorer acl grant``: the ACLs of a role (``kafka.access.role_grants``) created.

The rights themselves, and the words for a refusal, live in ``kafka.access`` (the worker checks
them at start-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaException

from stream_scorer.errors import BrokerError, ConfigError
from stream_scorer.kafka.access import Grant


def acl_bindings(grants: list[Grant], principal: str, host: str = "*") -> list[Any]:
    """The ``AclBinding`` (ALLOW) of every operation of ``grants`` for ``principal``."""
    from confluent_kafka.admin import (  # type: ignore[attr-defined]
        AclBinding,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    kinds = {
        "topic": ResourceType.TOPIC,
        "group": ResourceType.GROUP,
        "transactional_id": ResourceType.TRANSACTIONAL_ID,
    }
    return [
        AclBinding(
            kinds[g.resource],
            g.name,
            ResourcePatternType.PREFIXED if g.prefixed else ResourcePatternType.LITERAL,
            principal,
            host,
            AclOperation[op],
            AclPermissionType.ALLOW,
        )
        for g in grants
        for op in g.operations
    ]


def grant(
    settings: Mapping[str, str], grants: list[Grant], principal: str, timeout_s: float = 30.0
) -> None:
    """Create the ACLs of ``grants`` for ``principal`` (idempotent: existing ones stay).

    Args:
        settings: librdkafka settings of a client allowed to alter ACLs (the admin).
        grants: ``role_grants``.
        principal: ``User:<name>``.
        timeout_s: per request.

    Raises:
        BrokerError: the broker refused or did not answer.
    """
    from confluent_kafka.admin import AdminClient

    if not principal.startswith("User:") or len(principal) == len("User:"):
        raise ConfigError("--principal", f"must look like User:<name>, got {principal!r}")
    admin = AdminClient({**settings, "log_level": "3"})
    try:
        futures = admin.create_acls(acl_bindings(grants, principal), request_timeout=timeout_s)
        for binding, future in futures.items():
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                raise BrokerError(f"cannot create ACL {binding}: {exc.args[0]}") from exc
    except KafkaException as exc:
        raise BrokerError(f"cannot create ACLs: {exc}") from exc
