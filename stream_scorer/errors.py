"""The exceptions stream-scorer raises.

Every error the service raises on purpose derives from one root, so callers can catch
``StreamScorerError`` and nothing else. Bad *records* are not exceptions: they travel as
``DeadLetter`` values (see ``stages/decode.py``) and end on the dead-letter topic.

::

    StreamScorerError
    ├── ConfigError          bad configuration; names the offending field
    │   └── RefusedError     a server (registry, MLflow) refused the credentials (401), forbade
    │                        the request (403) or rejected it for good (409, 422, other 4xx)
    ├── ModelError           model file or manifest missing, corrupt or inconsistent
    │   └── RolloutError     a rollout record (canary, A/B, blue-green split) is malformed
    ├── SchemaError          an Avro schema that cannot be parsed or does not fit
    ├── BrokerError          Kafka unreachable or a request refused (topic/partition/offset)
    │   ├── DeliveryError    the broker did not acknowledge a prediction or dead letter
    │   ├── FencedError      exactly-once: another producer took this transactional id
    │   └── AccessDeniedError  the broker refused the credentials, the TLS setup or an ACL
    ├── ScoringError         the model failed on a batch
    ├── UnavailableError     a server the worker reads from did not answer (asked again later)
    │   ├── RegistryError    the schema registry, past registry.unavailable_timeout_s (exit 1)
    │   └── DatabaseError    the database of ``sink postgres``, past store.unavailable_timeout_s
    ├── PoisonLimitError     dead letters above the configured tolerance (ratio or run)
    ├── GroupActiveError     an operator command refused: the consumer group has members
    ├── LocalKafkaError      the local development broker could not be fetched, started or stopped
    ├── LocalRegistryError   the local development registry could not be fetched or started
    └── LocalPostgresError   the local development PostgreSQL server could not be started

Exit codes of the command line (docs/manual/commands.md, "Exit codes"): 0 a clean stop; 2 the
deployment must be fixed before a restart can help (``DEPLOYMENT_ERRORS``: configuration, model,
schema); 1 any other failure (broker, delivery, poison limit, fenced, ...); 130 interrupted.
"""

from __future__ import annotations

from collections.abc import Sequence


class StreamScorerError(Exception):
    """Root of every exception stream-scorer raises on purpose."""


class ConfigError(StreamScorerError):
    """The configuration is invalid.

    One error, or several found at once (``more``): the message lists them all,
    ``config: <key>: <problem>; <key>: <problem>``.

    Attributes:
        field: dotted name of the (first) offending key, e.g. ``batch.max_records``.
        problems: every offending key with its problem, the first one first.
        detail: the (first) message without the field.
    """

    def __init__(self, field: str, message: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        problems = ((field, message), *more)
        super().__init__("config: " + "; ".join(f"{f}: {m}" for f, m in problems))
        self.field = field
        self.problems = problems
        self.detail = message


class RefusedError(ConfigError):
    """A server the worker talks to over HTTP refused it: a configuration error, not an outage.

    HTTP 401 (the credentials), 403 (the principal may not do this) or another 4xx the server
    will answer again (409 incompatible schema, 422 invalid schema, ...): asking again cannot
    help, a restart in a loop neither (exit 2). 404 is not one (a missing schema or version is
    the caller's to judge); 408, 429 and 5xx are outages (``UnavailableError``).

    Attributes:
        url: the server's URL, without credentials.
        status: the HTTP status.
        principal: the user the request was sent as (empty: none).
    """

    def __init__(
        self, field: str, message: str, *, url: str, status: int, principal: str = ""
    ) -> None:
        super().__init__(field, message)
        self.url = url
        self.status = status
        self.principal = principal


#: HTTP statuses that are an outage (asked again with backoff), not a refusal.
TRANSIENT_HTTP = frozenset({408, 425, 429})


def http_refusal(status: int) -> bool:
    """Whether an HTTP error ``status`` is a refusal (``RefusedError``), not an outage.

    A 4xx other than 404 and the transient ones (408, 425, 429); 5xx are outages.
    """
    return 400 <= status < 500 and status != 404 and status not in TRANSIENT_HTTP


def refused(
    field: str, server: str, url: str, status: int, principal: str, detail: str, what: str
) -> RefusedError:
    """The ``RefusedError`` of ``server`` at ``url`` answering ``what`` with ``status``.

    Args:
        field: the configuration to fix (credentials for 401/403).
        server: ``schema registry``, ``MLflow server``.
        url: the server's URL, without credentials.
        status: the HTTP status.
        principal: the user the request was sent as; empty: no credentials were sent.
        detail: the server's own message (quoted).
        what: the request, ``GET /subjects/x/versions``.
    """
    who = f"user {principal!r}" if principal else "no credentials (anonymous)"
    if status == 401:
        why = f"refused the credentials of {who}"
    elif status == 403:
        why = f"forbids {who} to {what}"
    else:
        why = f"refused {what} (HTTP {status})"
    quoted = f": {detail.strip()}" if detail.strip() else ""
    return RefusedError(
        field,
        f"{server} {url} {why}{quoted} (HTTP {status}: a configuration error, not retried)",
        url=url, status=status, principal=principal,
    )  # fmt: skip


class ModelError(StreamScorerError):
    """The model or its manifest cannot be loaded or is inconsistent."""


class RolloutError(ModelError):
    """A rollout record cannot be read: not JSON, another format, bad weights."""


class SchemaError(StreamScorerError):
    """An Avro schema cannot be parsed or does not fit its use."""


class BrokerError(StreamScorerError):
    """Kafka could not be reached or refused a request.

    Attributes:
        topic: topic involved, if any.
        partition: partition involved, if any.
        offset: offset involved, if any.
    """

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> None:
        where = ""
        if topic is not None:
            where = f" [{topic}"
            if partition is not None:
                where += f"[{partition}]"
            if offset is not None:
                where += f"@{offset}"
            where += "]"
        super().__init__(message + where)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class DeliveryError(BrokerError):
    """The broker did not acknowledge a produced prediction or dead letter."""


class FencedError(BrokerError):
    """A newer producer with the same transactional id (or group generation) fenced this one."""


class AccessDeniedError(BrokerError):
    """The broker refused this client: authentication, TLS, or a missing ACL.

    The message names what is missing and what to grant (``stream_scorer.kafka.access``); it never
    holds a secret. A runtime failure (exit 1): fixing the credentials or ACLs needs no new
    deployment, and the orchestrator's restart then succeeds.
    """


class PoisonLimitError(StreamScorerError):
    """Too many records were dead-lettered (``dead_letter.max_ratio`` / ``max_consecutive``)."""


class GroupActiveError(StreamScorerError):
    """An operator command refused to change a consumer group that has active members.

    Attributes:
        group: the consumer group.
        members: one description per member (client id, member id, host).
    """

    def __init__(self, group: str, members: list[str]) -> None:
        super().__init__(
            f"group {group!r} has {len(members)} active member(s): {'; '.join(members)}; "
            "stop its workers first (the broker only changes the offsets of an empty group)"
        )
        self.group = group
        self.members = members


class ScoringError(StreamScorerError):
    """The model failed to score a batch."""


class InputError(StreamScorerError):
    """A stored input (a file ``score`` reads) cannot be read past some point (exit 1)."""


class UnavailableError(StreamScorerError):
    """A server the worker reads from (a registry) did not answer: not a bad input.

    A running worker asks again later; at start-up it exits 1 (a restart can help).
    """


class LocalKafkaError(StreamScorerError):
    """The local development broker could not be fetched, started or stopped."""


class RegistryError(UnavailableError):
    """The schema registry could not be reached, or answered with a server error, past the bound.

    Attributes:
        status: the HTTP status of the last answer; None when there was none (unreachable).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class LocalRegistryError(StreamScorerError):
    """The local development schema registry could not be fetched, started or stopped."""


class LocalMlflowError(StreamScorerError):
    """The local MLflow server could not be installed, started or stopped."""


class DatabaseError(UnavailableError):
    """The database of ``sink postgres`` did not answer, past ``store.unavailable_timeout_s``.

    A refused credential is a ``RefusedError`` instead (a configuration error, exit 2).
    """


class LocalPostgresError(StreamScorerError):
    """The local development PostgreSQL server could not be found, started or stopped."""


#: Errors no restart can fix: the deployment (configuration, model, schemas) must change.
DEPLOYMENT_ERRORS = (ConfigError, ModelError, SchemaError)
EXIT_OK = 0
#: A runtime failure (broker, delivery, poison limit, fenced, ...): a restart may help.
EXIT_FAILURE = 1
#: ``DEPLOYMENT_ERRORS``: do not restart, fix the deployment.
EXIT_DEPLOYMENT = 2
#: A worker stopped by ``--idle-timeout`` while the group had records left in partitions no
#: live member works on (a member killed without leaving holds them until its session ends):
#: the worker's own work is done, the group's is not (the report names them).
EXIT_ORPHANED_LAG = 3
EXIT_INTERRUPTED = 130


def exit_code(exc: StreamScorerError) -> int:
    """The command line's exit code for ``exc``: 2 for ``DEPLOYMENT_ERRORS``, else 1."""
    return EXIT_DEPLOYMENT if isinstance(exc, DEPLOYMENT_ERRORS) else EXIT_FAILURE


def broker_unreachable(
    bootstrap: str, down_s: float, timeout_s: float, last_error: object = None
) -> BrokerError:
    """The error for no broker at ``bootstrap`` answering for ``down_s`` seconds.

    Args:
        bootstrap: the configured ``kafka.bootstrap_servers``.
        down_s: how long no broker answered.
        timeout_s: ``kafka.unreachable_timeout_s``, the limit that was reached.
        last_error: the client's last error, if known (why connecting failed).
    """
    why = "" if last_error is None else f"; last error: {last_error}"
    return BrokerError(
        f"no broker reachable at {bootstrap} for {down_s:.0f} s "
        f"(kafka.unreachable_timeout_s = {timeout_s:.0f}){why}"
    )
