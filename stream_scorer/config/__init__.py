"""The worker's configuration: one typed, frozen tree, declared as pydantic models.

Sources, later ones winning: the defaults below, one YAML or TOML file, environment variables
``STREAM_SCORER_<SECTION>__<KEY>`` (for example ``STREAM_SCORER_INPUT__TOPIC=rides`` or
``STREAM_SCORER_KAFKA__CONSUMER__FETCH_MIN_BYTES=1`` — inside the ``kafka.*`` pass-through
tables a single ``_`` becomes a ``.``), then command-line flags. An unknown key, a missing
required key or a value of the wrong type stops start-up with a ``ConfigError`` naming every such
key (an unknown one with the nearest known key);
a value inside the ``kafka.*`` tables, or of a key that looks secret, is never echoed.
``config_schema()`` is the file's JSON Schema (``stream-scorer config schema``).

This module is also the one place where settings become librdkafka's dotted keys
(``consumer_settings`` and ``producer_settings``).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import tomllib
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, cast

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticKnownError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from stream_scorer import headers
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.errors import ConfigError
from stream_scorer.fast.cache import SEED_ENV
from stream_scorer.urls import split_userinfo

ENV_PREFIX = "STREAM_SCORER_"
#: Variables with the prefix that are not configuration keys.
_NOT_CONFIG = frozenset({"STREAM_SCORER_CACHE", SEED_ENV})
_SECRET_MARKERS = ("password", "secret", "token", "key")
#: The librdkafka pass-through tables (``kafka.<name>``): any key, values passed as strings.
_PASSTHROUGH = ("client", "consumer", "producer")

# librdkafka keys that stream-scorer derives from its own settings and must not be overridden.
_OWNED_KEYS = frozenset(
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


def _is_secret(name: str) -> bool:
    return any(m in name.lower() for m in _SECRET_MARKERS)


#: librdkafka keys whose values may be logged (``redacted``); any other key's value is not,
#: whatever its name: a misspelled ``sasl.passwd`` or a new secret-bearing key included.
LOGGABLE_KEYS: Final = frozenset(
    {
        # set by stream-scorer
        *_OWNED_KEYS,
        "client.id",
        "auto.commit.interval.ms",
        "auto.offset.reset",
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


def _redact(settings: Mapping[str, str]) -> dict[str, str]:
    """``settings`` with the value of every key not in ``LOGGABLE_KEYS`` replaced by ``***``."""
    return {k: (v if k in LOGGABLE_KEYS else "***") for k, v in settings.items()}


# --- value types: what the file may hold, declared once ------------------------------------------


def _refuse_bool(error_type: Literal["int_type", "float_type"]) -> BeforeValidator:
    """Refuse ``true``/``false`` where a number is expected (pydantic would read them as 1/0)."""

    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise PydanticKnownError(error_type)
        return value

    return BeforeValidator(check)


Int = Annotated[int, _refuse_bool("int_type")]
Number = Annotated[float, _refuse_bool("float_type")]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


#: A string that must hold more than white space (topics, group, id field, brokers).
NonEmpty = Annotated[str, Field(min_length=1), AfterValidator(_not_blank)]


def _resolve(value: Path, info: ValidationInfo) -> Path:
    """``~`` expanded; a relative path is relative to the configuration file's folder."""
    path = value.expanduser()
    base = (info.context or {}).get("base")
    return path if path.is_absolute() else Path(base if base is not None else Path.cwd()) / path


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


def _existing_dir(path: Path) -> Path:
    if not path.is_dir():
        raise ValueError(f"no such directory: {path}")
    return path


def _resolve_source(value: str, info: ValidationInfo) -> str:
    """``model.source``: a relative directory or store root made absolute like a path key."""
    if not value or value.startswith("models:/"):
        return value
    scheme = "store:" if value.startswith("store:") else ""
    return scheme + str(_resolve(Path(value[len(scheme) :]), info))


#: A file that must exist when the configuration is loaded.
ExistingFile = Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_file)]
#: A directory that must exist when the configuration is loaded.
ExistingDir = Annotated[Path, AfterValidator(_resolve), AfterValidator(_existing_dir)]


def _librdkafka_key(key: str) -> str:
    if key in _OWNED_KEYS:
        raise ValueError("is set by stream-scorer itself; use the matching stream-scorer key")
    return key


def _librdkafka_value(value: Any) -> str:
    """Every value goes to librdkafka as a string: ``true``/``false``, numbers as written."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ValueError("must be a string, number or boolean")


#: A librdkafka pass-through table: dotted librdkafka keys, scalar values passed as strings.
Librdkafka = Annotated[
    Mapping[
        Annotated[str, AfterValidator(_librdkafka_key)],
        Annotated[
            str,
            BeforeValidator(_librdkafka_value),
            WithJsonSchema({"type": ["string", "number", "boolean"]}),
        ],
    ],
    Field(json_schema_extra={"propertyNames": {"not": {"enum": sorted(_OWNED_KEYS)}}}),
]


def _no_default(schema: dict[str, Any]) -> None:
    """Drop a field's ``default`` from the JSON Schema (a path that differs per installation)."""
    schema.pop("default", None)


def _none_words(value: Any) -> Any:
    """An empty string, ``null`` or ``none`` (an environment variable) means unset."""
    if isinstance(value, str) and value.lower() in ("", "null", "none"):
        return None
    return value


def _log_level(value: str) -> str:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"must be DEBUG, INFO, WARNING or ERROR, got {value!r}")
    return value


class _Section(BaseModel):
    """A frozen section that refuses unknown keys and never puts input values in its errors."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        hide_input_in_errors=True,  # a ValidationError chained to a ConfigError shows no secret
        coerce_numbers_to_str=True,  # topic: 123 in YAML is the topic "123"
        use_attribute_docstrings=True,  # the docstrings below are the JSON Schema's descriptions
    )


# --- the sections -------------------------------------------------------------------------------


class KafkaConfig(_Section):
    """Connection to Kafka; the three tables pass straight to librdkafka."""

    bootstrap_servers: NonEmpty
    """Comma-separated ``host:port`` list."""
    client: Librdkafka = Field(default_factory=dict)
    """librdkafka settings for every client (security, SASL, TLS, …)."""
    consumer: Librdkafka = Field(default_factory=dict)
    """librdkafka settings for the consumer only."""
    producer: Librdkafka = Field(default_factory=dict)
    """librdkafka settings for the producer only."""
    secret_files: Mapping[Annotated[str, AfterValidator(_librdkafka_key)], ExistingFile] = Field(
        default_factory=dict
    )
    """librdkafka settings for every client whose values are read from files at start-up
    (Kubernetes Secrets mounted as files), e.g. ``sasl.password: /etc/kafka-secret/password``;
    a trailing newline is dropped. They win over ``client`` and are never logged."""
    statistics_interval_ms: Int = Field(default=5000, ge=0)
    """How often librdkafka reports statistics (lag metrics); 0 = off."""
    unreachable_timeout_s: Number = Field(default=120.0, gt=0)
    """Exit non-zero when no broker has answered for this long."""

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """The fields; the pass-through tables' values only of ``LOGGABLE_KEYS``, others ``***``."""
        for name, value in super().__repr_args__():
            yield name, (_redact(value) if name in _PASSTHROUGH else value)


class InputConfig(_Section):
    """The input topic and its contract."""

    topic: NonEmpty
    """Topic to consume."""
    topics: tuple[NonEmpty, ...] = ()
    """More topics consumed by the same group, each a name or a regular expression starting
    with ``^`` (librdkafka's pattern subscription); with ``format: confluent`` each record is
    read with its own writer schema, whatever its topic."""
    group_id: NonEmpty
    """Consumer group; workers of one deployment share it."""
    schema_file: ExistingFile = Field(alias="schema")
    """Path of the Avro schema (``.avsc``) the events are written with."""
    id_field: NonEmpty
    """Input field copied into each prediction as ``input_id``."""
    event_time_field: str = ""
    """Input field holding the event time: a long of epoch milliseconds, plain or
    ``timestamp-millis`` (or ``timestamp-micros``), any other type refused at start-up; empty
    means the Kafka record's timestamp."""
    max_message_bytes: Int = Field(default=1_048_576, gt=0)
    """Records larger than this are dead-lettered unread."""
    fast_path: bool = True
    """Decode with the compiled decoder specialised to the schema and model when the schema
    allows it (see ``fast``); false forces the fastavro path."""
    format: Literal["schemaless", "confluent"] = "schemaless"
    """``schemaless``: bare Avro bodies written with ``schema``; ``confluent``: the Confluent
    wire format (magic byte 0 and a schema id, or the ``__value_schema_id`` header), each
    record read with its writer schema from the registry and resolved against ``schema``
    (needs ``registry.url``)."""
    reader_subject: str = ""
    """``confluent``: take the reader schema from this registry subject at start-up instead of
    ``schema`` (which stays the contract ``config check`` checks offline)."""
    reader_version: Annotated[str, Field(pattern=r"^(latest|[1-9][0-9]*)$")] = "latest"
    """The version of ``reader_subject``: a number, or ``latest`` (read once, at start-up)."""

    @property
    def schema(self) -> Path:  # type: ignore[override]
        """Path of the Avro schema the events are written with."""
        return self.schema_file


class OutputConfig(_Section):
    """Where predictions go."""

    topic: NonEmpty
    """Prediction topic."""
    schema_file: ExistingFile = Field(
        default=PREDICTION_SCHEMA_V1,
        alias="schema",
        json_schema_extra=_no_default,  # an installation's path
    )
    """Path of the prediction record's Avro schema (default: the packaged
    ``prediction.v1.avsc``, which ``stream-scorer example init`` also writes out)."""
    copy_headers: tuple[NonEmpty, ...] = ()
    """Input headers copied onto each prediction when the input record has them (trace ids
    such as ``traceparent``); the prediction's own headers are never replaced."""
    format: Literal["schemaless", "confluent"] = "schemaless"
    """``schemaless``: bare Avro; ``confluent``: each prediction framed with the id of the
    prediction schema, registered under ``<output topic>-value`` (needs ``registry.url``)."""
    auto_register: bool = True
    """``confluent``: register the prediction schema at start-up; false: it must already be
    registered under ``<output topic>-value`` (start-up fails naming the subject)."""

    @property
    def schema(self) -> Path:  # type: ignore[override]
        """Path of the prediction record's Avro schema."""
        return self.schema_file


class DeadLetterConfig(_Section):
    """Where records that cannot be scored go."""

    topic: NonEmpty
    """Dead-letter topic."""
    max_ratio: Number = Field(default=0.0, ge=0, lt=1)
    """Stop the worker when more than this fraction of the last ``window`` records were
    dead-lettered (0 = no limit)."""
    window: Int = Field(default=1000, gt=0)
    """How many recent records ``max_ratio`` looks at."""
    max_consecutive: Int = Field(default=0, ge=0)
    """Stop the worker after this many dead letters in a row (0 = no limit)."""
    payload: Literal["keep", "drop", "encrypt"] = "keep"
    """What a dead letter carries of its record: ``keep`` the original key and value, ``drop``
    them (coordinates, headers and reason only), or ``encrypt`` them for ``public_key``'s
    holder (README.md, "Security"); ``drop`` and ``encrypt`` also withhold the exception
    message, which can quote field values."""
    public_key: Annotated[ExistingFile | None, BeforeValidator(_none_words)] = None
    """PEM RSA public key (2048+ bits) that ``payload: encrypt`` wraps each data key with."""
    signing_key: Annotated[ExistingFile | None, BeforeValidator(_none_words)] = None
    """File holding a secret (32+ bytes) every dead letter is signed with (HMAC-SHA256);
    ``dlq replay`` then replays only letters signed with it (README.md, "Security")."""


class ModelConfig(_Section):
    """The model to score with."""

    path: Annotated[ExistingDir | None, BeforeValidator(_none_words)] = None
    """Directory holding ``manifest.json`` and the model file (or give ``source``; ``none``
    unsets it, e.g. from the environment when a file sets it)."""
    source: Annotated[str, AfterValidator(_resolve_source)] = ""
    """Where the model comes from instead of ``path``: a model directory,
    ``store:<root>/<name>@<alias>`` (a model store; or ``…/<name>/<version>``) or
    ``models:/<name>@<alias>`` (an MLflow Model Registry; or ``models:/<name>/<version>``).
    A relative directory or store root is relative to the configuration file's folder."""
    refresh_s: Number = Field(default=30.0, ge=0)
    """How often each worker asks its ``source`` which version its alias points at, to load a
    new one in the background and swap it in between batches (0 = never; a plain directory or
    a pinned version is never asked)."""
    mlflow_tracking_uri: str = ""
    """The MLflow tracking server of a ``models:/`` source (``http(s)://host:port``; empty:
    ``$MLFLOW_TRACKING_URI``). Basic auth from ``$MLFLOW_TRACKING_USERNAME`` and
    ``$MLFLOW_TRACKING_PASSWORD``."""
    threshold: Annotated[float | None, BeforeValidator(_none_words)] = Field(
        default=None, gt=0, lt=1
    )
    """Binary classifiers: probability at or above which the label is 1; overrides the
    manifest's threshold when set."""
    nthread: Int = Field(default=1, gt=0)
    """XGBoost threads per worker process."""

    @property
    def directory(self) -> Path:
        """``path``, for tools that read a model directory only.

        Raises:
            ConfigError: the model comes from a ``source``.
        """
        if self.path is None:
            raise ConfigError("model.path", "this tool needs a model directory, not a source")
        return self.path


class BatchConfig(_Section):
    """Micro-batching."""

    max_records: Int = Field(default=1000, gt=0)
    """A batch is scored as soon as it holds this many records."""
    max_wait_ms: Int = Field(default=10, gt=0)
    """A partial batch is scored after waiting this long."""
    max_processing_s: Number = Field(default=30.0, gt=0)
    """Target upper bound for processing one batch; when a batch takes longer (a slow model),
    the batch size shrinks so the worker keeps calling poll well within
    ``max.poll.interval.ms`` (which must be at least twice this)."""
    max_in_flight: Int = Field(default=50_000, gt=0)
    """At-least-once mode: when this many records wait for their outputs' acknowledgement (a
    backed-up producer), the worker pauses its partitions until half of them are acknowledged."""


class WorkerConfig(_Section):
    """The worker process."""

    id: str = ""
    """Worker id used in client ids, logs and dead-letter headers (default:
    ``<hostname>-<pid>``; exactly-once: ``<hostname>``)."""
    max_messages: Int = Field(default=0, ge=0)
    """Stop after consuming this many records (0 = never)."""
    idle_timeout_s: Number = Field(default=0.0, ge=0)
    """Stop after this many seconds idle (0 = never): joined, group settled, every assigned
    partition read to its end, nothing in flight (``worker.flow.IdleClock``)."""
    shutdown_timeout_s: Number = Field(default=30.0, gt=0)
    """How long shutdown waits for outstanding deliveries."""


class MetricsConfig(_Section):
    """The Prometheus endpoint."""

    port: Int = Field(default=9400, ge=0, le=65535)
    """HTTP port for ``/metrics``; 0 disables the endpoint."""
    host: str = "0.0.0.0"
    """Address to bind."""
    tls_cert: Annotated[ExistingFile | None, BeforeValidator(_none_words)] = None
    """PEM certificate chain: serve HTTPS instead of HTTP (with ``tls_key``)."""
    tls_key: Annotated[ExistingFile | None, BeforeValidator(_none_words)] = None
    """PEM private key of ``tls_cert``."""


#: librdkafka's default ``message.max.bytes``: a producer refuses larger records unless told.
CLIENT_MESSAGE_MAX_BYTES: Final = 1_000_000
#: The largest ``message.max.bytes`` librdkafka accepts.
CLIENT_MESSAGE_MAX_BYTES_LIMIT: Final = 1_000_000_000
#: librdkafka's default ``batch.size``: the most bytes of records it batches in one request.
CLIENT_BATCH_SIZE: Final = 1_000_000
#: Room beyond a record's key, value and headers for its framing (record batch, varints).
RECORD_OVERHEAD_BYTES: Final = 65_536

AT_LEAST_ONCE: Final = "at-least-once"
EXACTLY_ONCE: Final = "exactly-once"


class DeliveryConfig(_Section):
    """The delivery guarantee (README.md, "Guarantees")."""

    mode: Literal["at-least-once", "exactly-once"] = AT_LEAST_ONCE
    """``at-least-once`` (outputs first, then offsets; a crash can repeat outputs) or
    ``exactly-once`` (each batch's outputs and input offsets in one transaction)."""
    transactional_id: str = ""
    """Exactly-once: the producer's transactional id; default
    ``stream-scorer-<group>-<worker id>``, stable across restarts when the worker id is (it
    defaults to the host name in this mode)."""
    transaction_timeout_s: Number = Field(default=60.0, gt=0)
    """Exactly-once: the broker aborts a transaction open this long."""
    static_membership: bool = False
    """Use the worker id as ``group.instance.id`` so a quick restart keeps its partitions
    without a rebalance (pair with a larger ``session.timeout.ms``)."""


class RegistryConfig(_Section):
    """The Schema Registry (Confluent-compatible REST API) of ``format: confluent``."""

    url: str = ""
    """Base URL of the Confluent-compatible API, e.g. ``http://registry:8080/apis/ccompat/v7``
    (Apicurio) or ``https://sr.example:8081`` (Confluent). Credentials in it
    (``https://user:password@sr:8081``) become ``username`` and ``password``."""
    username: str = ""
    """HTTP basic authentication user (empty: none)."""
    password: str = Field(default="", repr=False)
    """HTTP basic authentication password; never logged."""
    ca_location: str = ""
    """PEM file of the CA that signed the registry's certificate (empty: the system's)."""
    certificate_location: str = ""
    """PEM client certificate for mutual TLS (with ``key_location``)."""
    key_location: str = ""
    """PEM private key of ``certificate_location``."""
    timeout_s: Number = Field(default=10.0, gt=0)
    """Timeout of one request."""
    unavailable_timeout_s: Number = Field(default=120.0, gt=0)
    """While the registry does not answer, records needing an unknown schema wait (retried with
    backoff, never dead-lettered, offsets uncommitted); after this long the worker exits 1.
    Must stay below ``max.poll.interval.ms``."""
    max_schemas: Int = Field(default=1000, gt=0)
    """Writer schemas (and their compiled plans) kept in memory, least recently seen dropped."""

    @model_validator(mode="before")
    @classmethod
    def _credentials_in_url(cls, data: Any) -> Any:
        """``http://user:password@host/...``: the credentials move to ``username``/``password``.

        The URL kept (requested, logged, in messages) never holds them. Credentials given both
        ways must agree.
        """
        if not isinstance(data, dict) or not isinstance(data.get("url"), str):
            return data
        url, user, password = split_userinfo(data["url"])
        if url == data["url"]:
            return data
        for key, value in (("username", user), ("password", password)):
            given = data.get(key)
            if given and value and given != value:
                raise ConfigError(
                    "registry.url", f"holds a {key} other than registry.{key}: give it once"
                )
        return {
            **data,
            "url": url,
            "username": data.get("username") or user,
            "password": data.get("password") or password,
        }


class HealthConfig(_Section):
    """Liveness, readiness and the per-partition progress watchdog (README.md, "Health")."""

    liveness_timeout_s: Number = Field(default=60.0, gt=0)
    """``/healthz`` fails when the main loop has not completed an iteration for this long."""
    stall_timeout_s: Number = Field(default=60.0, gt=0)
    """A partition with lag whose committed offset has not moved for this long is stalled:
    metric, ``/readyz`` fails, one warning."""


class LoggingConfig(_Section):
    """Log output (README.md, "Logs")."""

    format: Literal["auto", "json", "text"] = "auto"
    """``json`` (one event per line), ``text``, or ``auto``: text when stderr is a terminal,
    else JSON."""
    level: Annotated[str, AfterValidator(_log_level)] = "INFO"
    """``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR`` (any case)."""
    progress_interval_s: Number = Field(default=30.0, ge=0)
    """Seconds between the worker's INFO progress lines (records/s, dead letters by reason,
    lag, model version); 0: none."""


class Config(_Section):
    """The whole configuration of one worker."""

    kafka: KafkaConfig
    """Connection to Kafka."""
    input: InputConfig
    """The input topic and its contract."""
    output: OutputConfig
    """Where predictions go."""
    dead_letter: DeadLetterConfig
    """Where records that cannot be scored go."""
    model: ModelConfig
    """The model to score with."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Micro-batching."""
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    """The worker process."""
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    """The Prometheus endpoint."""
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    """The delivery guarantee."""
    health: HealthConfig = Field(default_factory=HealthConfig)
    """Liveness, readiness and the progress watchdog."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    """Log output."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    """The Schema Registry (``format: confluent``)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _check(self)
        return self


def _check(cfg: Config) -> None:
    """The checks that involve more than one key (each key's own rules are declared above).

    Raises:
        ConfigError: every check that failed, in one error.
    """
    problems = list(_cross_problems(cfg))
    if problems:
        (field, message), *more = problems
        raise ConfigError(field, message, more=more)


def _cross_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    """Each failed check across keys as (key, problem)."""
    raw_poll = cfg.kafka.consumer.get("max.poll.interval.ms", "300000")
    poll_ms: int | None = None
    try:
        poll_ms = int(raw_poll)
    except ValueError:
        yield "kafka.consumer.max.poll.interval.ms", "must be an integer"
    if poll_ms is not None and poll_ms < 2000 * cfg.batch.max_processing_s:
        yield (
            "batch.max_processing_s",
            f"must be at most half of kafka.consumer.max.poll.interval.ms ({poll_ms} ms)",
        )
    own = [h for h in cfg.output.copy_headers if h.startswith(headers.OWN_PREFIX)]
    if own:
        yield (
            "output.copy_headers",
            f"{own[0]!r}: headers named {headers.OWN_PREFIX}* are the prediction's own",
        )
    if (cfg.model.path is None) == (not cfg.model.source):
        yield "model.source", "give exactly one of model.path and model.source"
    if cfg.input.reader_subject and cfg.input.format != "confluent":
        yield "input.reader_subject", "needs input.format: confluent"
    framed = [
        k
        for k, f in (("input.format", cfg.input.format), ("output.format", cfg.output.format))
        if f == "confluent"
    ]
    if framed and not cfg.registry.url:
        yield "registry.url", f"is required by {framed[0]}: confluent"
    # the wait for a registry that does not answer happens between polls (input format only)
    polled = cfg.input.format == "confluent" and poll_ms is not None
    if polled and 1000 * cfg.registry.unavailable_timeout_s >= (poll_ms or 0):
        yield (
            "registry.unavailable_timeout_s",
            f"must be below kafka.consumer.max.poll.interval.ms ({poll_ms} ms)",
        )
    for name in cfg.input.topics:
        for key, out in (
            ("output.topic", cfg.output.topic),
            ("dead_letter.topic", cfg.dead_letter.topic),
        ):
            if name == out or (name.startswith("^") and _matches(name, out)):
                yield "input.topics", f"{name!r} would consume {key} {out!r}"
    if cfg.dead_letter.payload == "encrypt" and cfg.dead_letter.public_key is None:
        yield "dead_letter.public_key", "is required with dead_letter.payload = encrypt"
    topics = {cfg.input.topic, cfg.output.topic, cfg.dead_letter.topic}
    if len(topics) != 3:
        yield "output.topic", "input, output and dead-letter topics must differ"
    if (cfg.metrics.tls_cert is None) != (cfg.metrics.tls_key is None):
        missing = "metrics.tls_key" if cfg.metrics.tls_key is None else "metrics.tls_cert"
        yield missing, "is required with the other of tls_cert and tls_key"


def _matches(pattern: str, topic: str) -> bool:
    try:
        return re.search(pattern, topic) is not None
    except re.error as exc:
        raise ConfigError(
            "input.topics", f"{pattern!r} is not a regular expression: {exc}"
        ) from None


def config_schema() -> dict[str, Any]:
    """Return the JSON Schema of the configuration file (for editors and ``config schema``)."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "stream-scorer configuration"
    return schema


# --- validation errors → ConfigError ------------------------------------------------------------


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The section model that ``loc`` (a path of field names or aliases) points into."""
    model: type[BaseModel] = Config
    for part in loc:
        field = _field(model, part)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _field(model: type[BaseModel], name: str | int) -> FieldInfo | None:
    for field_name, info in model.model_fields.items():
        if name in (field_name, info.alias):
            return info
    return None


_LIMIT_WORDS = {"gt": "greater than", "ge": "at least", "lt": "below", "le": "at most"}


def _range(loc: tuple[str | int, ...], ctx: Mapping[str, Any]) -> str:
    """``must be …``: the range declared for the key at ``loc`` (else the bound ``ctx`` names)."""
    model = _model_at(loc[:-1])
    field = _field(model, loc[-1]) if model is not None and loc else None
    metadata = field.metadata if field is not None else []
    limits = {k: getattr(m, k) for m in metadata for k in _LIMIT_WORDS if hasattr(m, k)} or ctx
    low = next(((k, limits[k]) for k in ("gt", "ge") if k in limits), None)
    high = next(((k, limits[k]) for k in ("lt", "le") if k in limits), None)
    if low == ("ge", 0) and high is None:
        return "must not be negative"
    if low is not None and high is not None and (low[0], high[0]) in (("gt", "lt"), ("ge", "le")):
        strictly = "strictly " if low[0] == "gt" else ""
        return f"must be {strictly}between {low[1]} and {high[1]}"
    words = [f"{_LIMIT_WORDS[b[0]]} {b[1]}" for b in (low, high) if b is not None]
    return "must be " + " and ".join(words)


#: pydantic error types whose meaning is one phrase of ours.
_PHRASES = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "path_type": "must be a path",
    "string_too_short": "must not be empty",
}
_TABLE_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type", "mapping_type"})
_RANGE_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than", "less_than_equal"})


def _message(err: ErrorDetails, loc: tuple[str | int, ...], secret: bool) -> str:
    """Our wording of one pydantic error; ``secret``: never show the value."""
    kind, ctx, value = err["type"], err.get("ctx", {}), err.get("input")
    got = "" if secret else f", got {value!r}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = sorted(f.alias or n for n, f in model.model_fields.items()) if model else []
        return f"unknown key (known: {', '.join(known)})"
    if kind in _TABLE_ERRORS:
        return f"must be a table, got {type(value).__name__}"
    if kind in _RANGE_ERRORS:
        return _range(loc, ctx) + got
    if kind == "value_error":
        return str(ctx.get("error", err["msg"]))
    if kind == "literal_error":
        return f"must be {ctx['expected']}{got}"
    if kind in _PHRASES:
        return _PHRASES[kind] + ("" if kind == "string_too_short" else got)
    return err["msg"]  # pydantic's words (which never include the value)


def _config_error(exc: ValidationError) -> ConfigError:
    """Every error of ``exc`` in one ConfigError naming each dotted key.

    Unknown keys come first, each with the nearest key of its table (``did you mean``; a
    required key missing beside it first): a misspelled key is the cause of that key missing.
    """
    errors = [
        (e, tuple(p for p in e["loc"] if p != "[key]")) for e in exc.errors(include_url=False)
    ]
    missing = [loc for e, loc in errors if e["type"] == "missing"]
    problems = []
    for err, loc in errors:
        name = ".".join(str(p) for p in loc) or "config"
        secret = (len(loc) > 1 and loc[0] == "kafka" and loc[1] in _PASSTHROUGH) or any(
            _is_secret(str(p)) for p in loc
        )
        message = _message(err, loc, secret)
        if err["type"] == "extra_forbidden":
            absent = [str(m[-1]) for m in missing if m[:-1] == loc[:-1]]
            message = _nearest(str(loc[-1]), absent, loc) or message
        problems.append((err["type"] != "extra_forbidden", name, message))
    (_, field, message), *more = sorted(problems, key=lambda p: p[0])
    return ConfigError(field, message, more=[(f, m) for _, f, m in more])


def _nearest(unknown: str, absent: list[str], loc: tuple[str | int, ...]) -> str:
    """``unknown key; did you mean 'x'?`` with the missing or known key nearest ``unknown``."""
    model = _model_at(loc[:-1])
    known = [f.alias or n for n, f in model.model_fields.items()] if model else []
    for candidates in (absent, known):
        near = difflib.get_close_matches(unknown, candidates, n=1, cutoff=0.6)
        if near:
            return f"unknown key; did you mean {near[0]!r}?"
    return ""


# --- sources: file, environment, command line ---------------------------------------------------

#: The settings sources read a model's fields (which keys are tables) and nothing else of a
#: BaseSettings; Config stays a plain model so that validating one never reads the environment.
_SOURCE_MODEL = cast(type[BaseSettings], Config)


class _Environment(EnvSettingsSource):
    """``STREAM_SCORER_<SECTION>__<KEY>`` variables of a given environment, as a nested table."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = {
            k: v for k, v in environ.items() if k.startswith(ENV_PREFIX) and k not in _NOT_CONFIG
        }
        super().__init__(
            _SOURCE_MODEL,
            case_sensitive=False,
            env_prefix=ENV_PREFIX,
            env_nested_delimiter="__",
            env_parse_none_str=None,
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}

    def values(self) -> dict[str, Any]:
        """The variables' table; a single ``_`` in a ``kafka.*`` table's key becomes a ``.``."""
        for name in self._environ:  # the source skips names that match no section: refuse them
            section = name[len(ENV_PREFIX) :].split("__")[0].lower()
            if _field(Config, section) is None:
                known = ", ".join(Config.model_fields)
                raise ConfigError(section, f"unknown key (known: {known}) in {name}")
        try:
            tree = self()
        except ValueError as exc:  # SettingsError: a variable setting a whole table is no JSON
            raise ConfigError("environment", f"{ENV_PREFIX}* variables: {exc}") from exc
        kafka = tree.get("kafka")
        if isinstance(kafka, dict):
            for table in _PASSTHROUGH:
                if isinstance(kafka.get(table), dict):
                    kafka[table] = {k.replace("_", "."): v for k, v in kafka[table].items()}
        return tree


class _TableCheck:
    """Refuse a file whose top level is not a table (the sources would fail obscurely)."""

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        data = super()._read_file(file_path)  # type: ignore[misc]
        if data is None:  # an empty YAML file
            return {}
        if not isinstance(data, dict):
            raise ConfigError("config", f"{file_path} must hold a table at the top level")
        return data


class _Yaml(_TableCheck, YamlConfigSettingsSource):
    pass


class _Toml(_TableCheck, TomlConfigSettingsSource):
    pass


def read_file(path: Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) configuration file."""
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError("config", f"{path}: use a .yaml, .yml or .toml file")
    try:
        with path.open("rb"):  # the sources skip a missing or unreadable file silently
            pass
        if path.suffix == ".toml":
            table: dict[str, Any] = _Toml(_SOURCE_MODEL, path)()
        else:
            table = _Yaml(_SOURCE_MODEL, path, yaml_file_encoding="utf-8")()
        return table
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError("config", f"{path} is not valid: {exc}") from exc


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def load_config(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Load, merge and validate the configuration.

    Args:
        path: the YAML or TOML file; relative paths inside it are relative to its folder.
        environ: environment to read ``STREAM_SCORER_*`` overrides from (default: os.environ).
        overrides: a nested table applied last (command-line flags).

    Raises:
        ConfigError: naming every offending key.
    """
    raw: dict[str, Any] = read_file(path) if path is not None else {}
    base = path.resolve().parent if path is not None else Path.cwd()
    raw = _merge(raw, _Environment(os.environ if environ is None else environ).values())
    raw = _merge(raw, overrides or {})
    return _validate(raw, base)


def _validate(raw: Mapping[str, Any], base: Path) -> Config:
    try:
        return Config.model_validate(raw, context={"base": base})
    except ValidationError as exc:
        raise _config_error(exc) from exc


def with_worker(cfg: Config, **changes: Any) -> Config:
    """Return ``cfg`` with fields of its ``worker`` section replaced (validated again)."""
    raw = cfg.model_dump(by_alias=True)
    raw["worker"].update(changes)
    return _validate(raw, Path.cwd())


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
        "auto.offset.reset": "earliest",
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


def redacted(settings: Mapping[str, str]) -> dict[str, str]:
    """Return librdkafka ``settings`` for logs: values only of ``LOGGABLE_KEYS``, others ``***``."""
    return _redact(settings)


# --- librdkafka's own checks --------------------------------------------------------------------

#: A librdkafka property named in one of its messages (``"sasl.passwd"``, ssl.ca.location).
_PROPERTY = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")
_CREATE_PREFIX = re.compile(r"^Failed to create [a-z ]+: ")


def check_clients(cfg: Config, worker_id: str) -> None:
    """Have librdkafka check the settings of every client the worker builds, without connecting.

    The consumer, the producer (transactional in exactly-once mode) and the admin client of the
    start-up checks are built from exactly the settings the worker uses, without
    ``bootstrap.servers`` (so that nothing connects), and closed: librdkafka refuses an unknown
    key, a value it cannot parse or out of range, an unsupported SASL mechanism, a missing SASL
    user or password, or a TLS file it cannot read.

    Raises:
        ConfigError: librdkafka refused a setting; names the configuration key (the table it
            came from: ``kafka.client``, ``kafka.consumer``, ``kafka.producer`` or
            ``kafka.secret_files``) and never the value of a key outside ``LOGGABLE_KEYS``.
    """
    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    clients: tuple[tuple[str, Any, dict[str, str]], ...] = (
        ("consumer", Consumer, consumer_settings(cfg, worker_id)),
        ("producer", Producer, producer_settings(cfg, worker_id)),
        ("client", AdminClient, client_settings(cfg)),
    )
    for role, make, settings in clients:
        try:
            _build_unconnected(make, settings)
        except KafkaException as exc:
            raise _refused(cfg, role, make, settings, exc) from None


def _build_unconnected(make: Any, settings: Mapping[str, str]) -> None:
    """Build a client from ``settings`` without its brokers (it never connects), then close it."""
    unconnected = {k: v for k, v in settings.items() if k != "bootstrap.servers"}
    client = make({**unconnected, "log_level": "0"})  # its lines come again at the real start
    if hasattr(client, "close"):
        client.close()


def _refused(
    cfg: Config, role: str, make: Any, settings: Mapping[str, str], exc: Exception
) -> ConfigError:
    """The ConfigError for librdkafka's refusal ``exc`` of the ``role`` client's ``settings``."""
    err = exc.args[0] if exc.args else exc
    text = err.str() if hasattr(err, "str") else str(err)
    reason = _CREATE_PREFIX.sub("", text.strip())
    for name, value in settings.items():  # librdkafka may quote a value it refuses
        if name not in LOGGABLE_KEYS and value:
            reason = re.sub(_token(value), "***", reason)
    tables = _user_tables(cfg, role)
    key = _culprit(text, [k for t in tables.values() for k in t], settings, make)
    if key is not None:
        table = next(name for name, t in tables.items() if key in t)
        field = f"{table}.{key}"
    else:  # a key it needs and nobody set, or one of stream-scorer's own
        named = _PROPERTY.findall(text)
        field = f"kafka.client.{named[0]}" if named else f"kafka.{role}"
    client = {"client": "admin client", "consumer": "consumer", "producer": "producer"}[role]
    return ConfigError(field, f"librdkafka refuses the {client}'s settings: {reason}")


def _token(value: str) -> str:
    """A pattern of ``value`` as a whole word of a message (not a part of a longer one)."""
    return rf"(?<![\w.]){re.escape(value)}(?![\w.])"


def _user_tables(cfg: Config, role: str) -> dict[str, Collection[str]]:
    """The configuration's librdkafka keys that reach the ``role`` client, by table.

    The table that wins comes first (a consumer's own key over ``secret_files`` over ``client``).
    """
    tables: dict[str, Collection[str]] = {}
    if role in ("consumer", "producer"):
        tables[f"kafka.{role}"] = getattr(cfg.kafka, role).keys()
    tables["kafka.secret_files"] = cfg.kafka.secret_files.keys()
    tables["kafka.client"] = cfg.kafka.client.keys()
    return tables


def _culprit(text: str, mine: Sequence[str], settings: Mapping[str, str], make: Any) -> str | None:
    """Which of the configuration's own librdkafka keys (``mine``) librdkafka's ``text`` is about.

    A key the message names (quoted or not, or as words: ``SASL mechanism``); else the one key
    that alone gets the same refusal (an alias: ``linger.ms`` is refused as
    ``queue.buffering.max.ms``); else a key whose value it quotes (``Unsupported hash function:
    SCRAM-SHA-999``); else None.
    """
    from confluent_kafka import Consumer, KafkaException

    named: list[str] = _PROPERTY.findall(text)
    for name in named:
        if name in mine:
            return name
    lower = text.lower()
    for name in mine:
        if name.replace(".", " ") in lower:
            return name
    reason = _CREATE_PREFIX.sub("", text.strip())
    alone = {"group.id": "check"} if make is Consumer else {}
    for name in mine:
        try:
            _build_unconnected(make, {**alone, name: settings[name]})
        except KafkaException as exc:
            err = exc.args[0] if exc.args else exc
            again = err.str() if hasattr(err, "str") else str(err)
            if _CREATE_PREFIX.sub("", again.strip()) == reason:
                return name
    for name in mine:  # the value it quotes (an unsupported mechanism or hash)
        if settings[name] and re.search(_token(settings[name]), text):
            return name
    return None
