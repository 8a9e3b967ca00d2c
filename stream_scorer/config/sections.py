"""The sections of the configuration and the checks across them, declared as pydantic models.

Each key's rules are declared with its type (``values``); the checks involving more than one key
are ``Config``'s, reported together. ``config_schema()`` is the file's JSON Schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from stream_scorer import headers
from stream_scorer.config.evaluate import EvaluateConfig
from stream_scorer.config.keys import PASSTHROUGH, redacted
from stream_scorer.config.values import (
    ExistingDir,
    ExistingFile,
    Int,
    Librdkafka,
    NonEmpty,
    Number,
    Section,
    librdkafka_key,
    log_level,
    no_default,
    none_words,
    resolve_source,
)
from stream_scorer.contracts import PREDICTION_SCHEMA_V1
from stream_scorer.errors import ConfigError
from stream_scorer.retry import RetryPolicy
from stream_scorer.urls import split_userinfo


class KafkaConfig(Section):
    """Connection to Kafka; the three tables pass straight to librdkafka."""

    bootstrap_servers: NonEmpty
    """Comma-separated ``host:port`` list."""
    client: Librdkafka = Field(default_factory=dict)
    """librdkafka settings for every client (security, SASL, TLS, …)."""
    consumer: Librdkafka = Field(default_factory=dict)
    """librdkafka settings for the consumer only."""
    producer: Librdkafka = Field(default_factory=dict)
    """librdkafka settings for the producer only."""
    secret_files: Mapping[Annotated[str, AfterValidator(librdkafka_key)], ExistingFile] = Field(
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
            yield name, (redacted(value) if name in PASSTHROUGH else value)


class InputConfig(Section):
    """The input topic and its contract."""

    topic: NonEmpty
    """Topic to consume."""
    topics: tuple[NonEmpty, ...] = ()
    """More topics consumed by the same group, each a name or a regular expression starting
    with ``^`` (librdkafka's pattern subscription); with ``format: confluent`` each record is
    read with its own writer schema, whatever its topic."""
    group_id: NonEmpty
    """Consumer group; workers of one deployment share it."""
    group_type: Literal["consumer", "share"] = "consumer"
    """``consumer``: a consumer group, each partition read by one worker, in order;
    ``share``: a share group (Kafka 4.2+, client preview, opt-in), every worker takes records
    of any partition, so workers can outnumber partitions; at-least-once only, no order within
    a key (docs/manual/scaling.md, "Share groups")."""
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    """Where a group with nothing committed starts reading. ``share``: set at start-up as the
    group's ``share.auto.offset.reset`` (the broker's default for a new share group is
    ``latest``)."""
    delivery_limit: Int = Field(default=4, ge=1, le=9)
    """``share``: a record the broker delivers this many times is dead-lettered (reason
    ``delivery_limit``) instead of scored again; the group's ``share.delivery.count.limit`` is
    set one above it at start-up, so the broker never archives it unseen."""
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


class OutputConfig(Section):
    """Where predictions go."""

    topic: NonEmpty
    """Prediction topic."""
    schema_file: ExistingFile = Field(
        default=PREDICTION_SCHEMA_V1,
        alias="schema",
        json_schema_extra=no_default,  # an installation's path
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


class DeadLetterConfig(Section):
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
    holder (docs/manual/security.md); ``drop`` and ``encrypt`` also withhold the exception
    message, which can quote field values."""
    public_key: Annotated[ExistingFile | None, BeforeValidator(none_words)] = None
    """PEM RSA public key (2048+ bits) that ``payload: encrypt`` wraps each data key with."""
    signing_key: Annotated[ExistingFile | None, BeforeValidator(none_words)] = None
    """File holding a secret (32+ bytes) every dead letter is signed with (HMAC-SHA256);
    ``dlq replay`` then replays only letters signed with it (docs/manual/security.md)."""


class ModelConfig(Section):
    """The model to score with."""

    path: Annotated[ExistingDir | None, BeforeValidator(none_words)] = None
    """Directory holding ``manifest.json`` and the model file (or give ``source``; ``none``
    unsets it, e.g. from the environment when a file sets it)."""
    source: Annotated[str, AfterValidator(resolve_source)] = ""
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
    threshold: Annotated[float | None, BeforeValidator(none_words)] = Field(
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


#: The name of the one entry of the single ``model:``/``output:`` form (its ``model`` label).
DEFAULT_MODEL_NAME: Final = "default"


class ModelEntryConfig(Section):
    """One model of ``models:``: its source (a ``model`` section) and its ``output``."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
    """Unique name: the ``model`` label of the per-model metrics and the
    ``stream_scorer.model.name`` header of its dead letters."""
    model: ModelConfig
    """Where this model comes from (every key of the top-level ``model`` section)."""
    output: OutputConfig
    """Where this model's predictions go (every key of the top-level ``output`` section)."""
    role: Literal["serve", "shadow"] = "serve"
    """``serve``: its predictions are a product; ``shadow``: a challenger scoring every batch
    into its own topic beside ``shadow_of``, compared with it in metrics, and never stopping it
    (a failure marks it failed and is retried)."""
    shadow_of: str = ""
    """``role: shadow``: the name of the ``serve`` entry it challenges."""


@dataclass(frozen=True)
class ModelEntry:
    """One model a worker scores with, whichever form configured it.

    Attributes:
        name: its name (``DEFAULT_MODEL_NAME`` in the single form).
        model: its source.
        output: where its predictions go.
        role: ``serve`` or ``shadow``.
        shadow_of: the champion's name (shadow only).
        key: the configuration key of the entry, named in errors (``model`` or ``models[i]``).
    """

    name: str
    model: ModelConfig
    output: OutputConfig
    role: str = "serve"
    shadow_of: str = ""
    key: str = "model"

    def field(self, section: str, name: str) -> str:
        """The full key of ``section.name`` here (``model.path``, ``models[1].model.path``)."""
        return f"{section}.{name}" if self.key == "model" else f"{self.key}.{section}.{name}"


class BatchConfig(Section):
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


class WorkerConfig(Section):
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


class MetricsConfig(Section):
    """The Prometheus endpoint."""

    port: Int = Field(default=9400, ge=0, le=65535)
    """HTTP port for ``/metrics``; 0 disables the endpoint."""
    host: str = "0.0.0.0"
    """Address to bind."""
    tls_cert: Annotated[ExistingFile | None, BeforeValidator(none_words)] = None
    """PEM certificate chain: serve HTTPS instead of HTTP (with ``tls_key``)."""
    tls_key: Annotated[ExistingFile | None, BeforeValidator(none_words)] = None
    """PEM private key of ``tls_cert``."""


class DriftConfig(Section):
    """Input and prediction drift against the model's reference bins (docs/manual/watching.md).

    Per feature, PSI of a sliding window of scored events against the training sample's bins
    (``model pack --sample``), the window's missing share, and the predictions' PSI; exported as
    ``stream_scorer_drift_*`` gauges. A model without reference bins is scored without drift.
    """

    enabled: bool = True
    """Compute drift for models that carry reference bins."""
    window_events: Int = Field(default=5000, gt=0)
    """The window: the last this many scored events (with ``window_s`` 0). PSI of a small
    window is noise: about (bins - 1) / window with no drift at all (0.009 at 1,000 events
    for 10 bins, 0.0018 at 5,000)."""
    window_s: Number = Field(default=0.0, ge=0)
    """A window of the last this many seconds instead of ``window_events`` (0: by events)."""
    min_events: Int = Field(default=1000, gt=0)
    """PSI is NaN (and alerts stay quiet) while the window holds fewer events."""
    export_interval_s: Number = Field(default=10.0, gt=0)
    """How often the gauges are computed from the window (not per batch)."""
    threshold: Number = Field(default=0.2, gt=0)
    """A feature or the predictions above this PSI is logged once (a warning) until it falls
    back below; the alert rules carry their own thresholds."""
    ignore: tuple[NonEmpty, ...] = ()
    """Features not watched (no series): those that follow the clock, such as an hour of day,
    whose values in any window shorter than their cycle differ from a training sample spread
    over it; a name no model version has is logged once."""


AT_LEAST_ONCE: Final = "at-least-once"
EXACTLY_ONCE: Final = "exactly-once"


class DeliveryConfig(Section):
    """The delivery guarantee (docs/manual/how-it-works.md, "Guarantees")."""

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


class RegistryConfig(Section):
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


#: A table name: an identifier, optionally qualified by its schema (each at most 63 characters).
_TABLE = r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$"
TableName = Annotated[str, Field(pattern=_TABLE)]


class StoreConfig(Section):
    """``stream-scorer sink postgres``: the predictions stored in a PostgreSQL table.

    See docs/manual/storing.md.
    """

    dsn: str = Field(default="", repr=False)
    """Required by ``sink postgres``: the libpq connection string (``host=db port=5432
    dbname=scores user=sink``) or URI (``postgresql://sink@db:5432/scores``). A password in it
    is never logged; prefer ``password_file``."""
    password_file: Annotated[ExistingFile | None, BeforeValidator(none_words)] = None
    """File holding the database password (a Kubernetes Secret mounted as a file), read at
    start-up, a trailing newline dropped; never logged."""
    table: TableName = "predictions"
    """Table the predictions land in (``schema.table`` allowed): created at start-up from the
    prediction schema, or given the columns of fields the schema gained."""
    offsets_table: TableName = "stream_scorer_offsets"
    """Table of the consumed offsets (group, topic, partition), written in the same
    transaction as the rows: what a member resumes from."""
    group_id: str = ""
    """Required by ``sink postgres``: its consumer group; the members share the prediction
    topics' partitions."""
    topics: tuple[NonEmpty, ...] = ()
    """The prediction topics stored; empty: ``output.topic``."""
    dead_letter_topic: str = ""
    """Required by ``sink postgres``: the topic of the records that cannot be read as
    predictions (original bytes and reason)."""
    max_records: Int = Field(default=10_000, gt=0)
    """Rows written in one transaction at most."""
    max_wait_s: Number = Field(default=1.0, gt=0)
    """A batch is written at most this long after its first record arrived."""
    unavailable_timeout_s: Number = Field(default=120.0, gt=0)
    """While the database does not answer, the batch is written again with the retry policy's
    backoff; after this long the sink exits 1 (nothing lost: the offsets were not stored).
    Must stay below ``max.poll.interval.ms``."""


class RetryConfig(Section):
    """The one retry policy of every outage path (``stream_scorer.retry``).

    A server that does not answer is asked again after ``initial_backoff_s``, doubling up to
    ``max_backoff_s`` (plus jitter), until the path's deadline: ``registry.unavailable_timeout_s``
    for the schema registry, ``kafka.unreachable_timeout_s`` for the brokers,
    ``model_registry_timeout_s`` for MLflow. A refusal (a credential, a forbidden request) is a
    configuration error and never asked again.
    """

    initial_backoff_s: Number = Field(default=0.2, gt=0)
    """The first wait after a try the server did not answer."""
    max_backoff_s: Number = Field(default=5.0, gt=0)
    """The longest wait between two tries."""
    model_registry_timeout_s: Number = Field(default=0.0, ge=0)
    """How long a read of the MLflow model registry is asked again while the server does not
    answer (0: asked once; a running worker asks again at its next model refresh)."""

    def policy(self) -> RetryPolicy:
        """The backoff of these settings."""
        return RetryPolicy(initial_s=self.initial_backoff_s, max_s=self.max_backoff_s)


class HealthConfig(Section):
    """Liveness, readiness and the per-partition progress watchdog.

    See docs/manual/observability.md, "Health".
    """

    liveness_timeout_s: Number = Field(default=60.0, gt=0)
    """``/healthz`` fails when the main loop has not completed an iteration for this long."""
    stall_timeout_s: Number = Field(default=60.0, gt=0)
    """A partition with lag whose committed offset has not moved for this long is stalled:
    metric, ``/readyz`` fails, one warning."""


class LoggingConfig(Section):
    """Log output (docs/manual/observability.md, "Logs")."""

    format: Literal["auto", "json", "text"] = "auto"
    """``json`` (one event per line), ``text``, or ``auto``: text when stderr is a terminal,
    else JSON."""
    level: Annotated[str, AfterValidator(log_level)] = "INFO"
    """``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR`` (any case)."""
    progress_interval_s: Number = Field(default=30.0, ge=0)
    """Seconds between the worker's INFO progress lines (records/s, dead letters by reason,
    lag, model version); 0: none."""


class Config(Section):
    """The whole configuration of one worker."""

    kafka: KafkaConfig
    """Connection to Kafka."""
    input: InputConfig
    """The input topic and its contract."""
    output: OutputConfig | None = None
    """Where predictions go (the single-model form; or give ``models``)."""
    dead_letter: DeadLetterConfig
    """Where records that cannot be scored go."""
    model: ModelConfig | None = None
    """The model to score with (the single-model form; or give ``models``)."""
    models: tuple[ModelEntryConfig, ...] = ()
    """Several models scoring the same stream, each with its own ``output`` (instead of
    ``model`` and ``output``); one consume and one decode per batch for all of them."""
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
    retry: RetryConfig = Field(default_factory=RetryConfig)
    """The backoff of every outage path."""
    drift: DriftConfig = Field(default_factory=DriftConfig)
    """Drift of the inputs and predictions against the model's reference bins."""
    store: StoreConfig = Field(default_factory=StoreConfig)
    """``sink postgres``: where and how the predictions are stored."""

    def stored_topics(self) -> tuple[str, ...]:
        """The topics ``sink postgres`` stores: ``store.topics``, else every output topic."""
        return self.store.topics or tuple(e.output.topic for e in self.entries)

    evaluate: Annotated[EvaluateConfig | None, BeforeValidator(none_words)] = None
    """``stream-scorer evaluate``: live outcomes joined with the predictions (none: unused)."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        _check(self)
        return self

    @property
    def entries(self) -> tuple[ModelEntry, ...]:
        """The models this worker scores with: ``models``, or the one of ``model``/``output``."""
        if not self.models:
            if self.model is None or self.output is None:  # refused by the checks
                raise ConfigError("models", "give models, or model and output")
            return (ModelEntry(DEFAULT_MODEL_NAME, self.model, self.output),)
        return tuple(
            ModelEntry(e.name, e.model, e.output, e.role, e.shadow_of, f"models[{i}]")
            for i, e in enumerate(self.models)
        )

    @property
    def first(self) -> ModelEntry:
        """The first model entry (tools that read one model: the benchmarks)."""
        return self.entries[0]

    def single(self) -> Config:
        """This configuration with its first model entry in the single form (``model``/``output``).

        The commands over stored records (``score``, ``model compare``, Spark) score with one
        model: under ``models:``, the first entry's.
        """
        entry = self.first
        return self.model_copy(update={"models": (), "model": entry.model, "output": entry.output})


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
    yield from _entry_problems(cfg)
    entries = () if _form_problems(cfg) else cfg.entries
    for e in entries:
        own = [h for h in e.output.copy_headers if h.startswith(headers.OWN_PREFIX)]
        if own:
            yield (
                e.field("output", "copy_headers"),
                f"{own[0]!r}: headers named {headers.OWN_PREFIX}* are the prediction's own",
            )
        if (e.model.path is None) == (not e.model.source):
            yield (
                e.field("model", "source"),
                f"give exactly one of {e.field('model', 'path')} and {e.field('model', 'source')}",
            )
    if cfg.input.reader_subject and cfg.input.format != "confluent":
        yield "input.reader_subject", "needs input.format: confluent"
    formats = [("input.format", cfg.input.format)]
    formats += [(e.field("output", "format"), e.output.format) for e in entries]
    framed = [k for k, f in formats if f == "confluent"]
    if framed and not cfg.registry.url:
        yield "registry.url", f"is required by {framed[0]}: confluent"
    # the wait for a registry that does not answer happens between polls (input format only)
    polled = cfg.input.format == "confluent" and poll_ms is not None
    if polled and 1000 * cfg.registry.unavailable_timeout_s >= (poll_ms or 0):
        yield (
            "registry.unavailable_timeout_s",
            f"must be below kafka.consumer.max.poll.interval.ms ({poll_ms} ms)",
        )
    outputs = [(e.field("output", "topic"), e.output.topic) for e in entries]
    for name in cfg.input.topics:
        for key, out in (*outputs, ("dead_letter.topic", cfg.dead_letter.topic)):
            if name == out or (name.startswith("^") and _matches(name, out)):
                yield "input.topics", f"{name!r} would consume {key} {out!r}"
    if cfg.input.group_type == "share" and cfg.delivery.mode == EXACTLY_ONCE:
        yield (
            "input.group_type",
            "share groups are at-least-once only (their acknowledgements are not part of Kafka "
            "transactions): use delivery.mode: at-least-once, or a consumer group for "
            "exactly-once",
        )
    if cfg.dead_letter.payload == "encrypt" and cfg.dead_letter.public_key is None:
        yield "dead_letter.public_key", "is required with dead_letter.payload = encrypt"
    topics = [cfg.input.topic, cfg.dead_letter.topic, *(t for _, t in outputs)]
    if len(set(topics)) != len(topics):
        key = outputs[0][0] if outputs else "output.topic"
        more = " (one output topic per model)" if cfg.models else ""
        yield key, f"input, output and dead-letter topics must differ{more}"
    if cfg.retry.max_backoff_s < cfg.retry.initial_backoff_s:
        yield "retry.max_backoff_s", "must be at least retry.initial_backoff_s"
    if not cfg.drift.window_s and cfg.drift.min_events > cfg.drift.window_events:
        yield "drift.min_events", "must be at most drift.window_events"
    if cfg.store.dsn and entries:
        yield from _store_problems(cfg, cfg.store, poll_ms)
    if cfg.evaluate is not None:
        yield from _evaluate_problems(cfg, cfg.evaluate, tuple(e.output.topic for e in entries))
    if (cfg.metrics.tls_cert is None) != (cfg.metrics.tls_key is None):
        missing = "metrics.tls_key" if cfg.metrics.tls_key is None else "metrics.tls_cert"
        yield missing, "is required with the other of tls_cert and tls_key"


def _store_problems(
    cfg: Config, store: StoreConfig, poll_ms: int | None
) -> Iterator[tuple[str, str]]:
    """The checks of the ``store`` section against the others."""
    taken = {cfg.input.topic, cfg.dead_letter.topic, *cfg.stored_topics()}
    for key in ("group_id", "dead_letter_topic"):
        if not getattr(store, key):
            yield f"store.{key}", "is required with store.dsn"
    if store.dead_letter_topic in taken:
        yield (
            "store.dead_letter_topic",
            "must differ from the input, prediction and worker's dead-letter topics",
        )
    if store.group_id == cfg.input.group_id:
        yield "store.group_id", "must differ from input.group_id (the scoring workers' group)"
    if store.offsets_table == store.table:
        yield "store.offsets_table", "must differ from store.table"
    if poll_ms is not None and 1000 * store.unavailable_timeout_s >= poll_ms:
        yield (
            "store.unavailable_timeout_s",
            f"must be below kafka.consumer.max.poll.interval.ms ({poll_ms} ms)",
        )


def _evaluate_problems(
    cfg: Config, ev: EvaluateConfig, outputs: tuple[str, ...]
) -> Iterator[tuple[str, str]]:
    """The ``evaluate`` section's checks against the rest (``outputs``: the models' topics)."""
    if ev.outcomes.format == "confluent" and not cfg.registry.url:
        yield "registry.url", "is required by evaluate.outcomes.format: confluent"
    read = {*(ev.prediction_topics or outputs), ev.outcomes.topic}
    if ev.topic in read:
        yield "evaluate.topic", f"{ev.topic!r} is also read by the evaluator"
    if ev.outcomes.topic in (ev.prediction_topics or outputs):
        yield "evaluate.outcomes.topic", "must differ from the prediction topics"


def _form_problems(cfg: Config) -> list[tuple[str, str]]:
    """The single form (``model`` and ``output``) or the list (``models``), exactly one."""
    single = cfg.model is not None or cfg.output is not None
    if cfg.models and single:
        given = "model" if cfg.model is not None else "output"
        return [("models", f"give either models or {given} (and its pair), not both")]
    if not cfg.models and (cfg.model is None or cfg.output is None):
        missing = "model" if cfg.model is None else "output"
        return [(missing, "is required (or give models: a list of models with their outputs)")]
    return []


def _entry_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    """The form, and the ``models`` list: unique names, shadows of serve entries."""
    yield from _form_problems(cfg)
    names: dict[str, str] = {}
    for i, e in enumerate(cfg.models):
        if e.name in names:
            yield f"models[{i}].name", f"{e.name!r} is also the name of models[{names[e.name]}]"
        names.setdefault(e.name, str(i))
    roles = {e.name: e.role for e in cfg.models}
    for i, e in enumerate(cfg.models):
        if e.role == "shadow" and roles.get(e.shadow_of) != "serve":
            yield (
                f"models[{i}].shadow_of",
                f"{e.shadow_of!r} is not the name of a serve entry of models "
                f"(serve entries: {', '.join(n for n, r in roles.items() if r == 'serve')})",
            )
        if e.role == "serve" and e.shadow_of:
            yield f"models[{i}].shadow_of", "is only for role: shadow"
    if cfg.models and "serve" not in roles.values():
        yield "models", "needs at least one entry with role: serve"


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
