"""The worker's configuration: one typed, frozen tree, validated at start-up.

Sources, later ones winning: the defaults below, one YAML or TOML file, environment variables
``STREAM_SCORER_<SECTION>__<KEY>`` (for example ``STREAM_SCORER_INPUT__TOPIC=rides`` or
``STREAM_SCORER_KAFKA__CONSUMER__FETCH_MIN_BYTES=1`` — inside the ``kafka.*`` pass-through
tables a single ``_`` becomes a ``.``), then command-line flags. An unknown key, a missing
required key or a value of the wrong type stops start-up with a ``ConfigError`` naming the key.

This module is also the one place where settings become librdkafka's dotted keys
(``consumer_settings`` and ``producer_settings``).
"""

from __future__ import annotations

import os
import socket
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from stream_scorer.errors import ConfigError

ENV_PREFIX = "STREAM_SCORER_"
#: Variables with the prefix that are not configuration keys.
_NOT_CONFIG = frozenset({"STREAM_SCORER_CACHE"})
_SECRET_MARKERS = ("password", "secret", "token", "key")


def _redact(settings: Mapping[str, str]) -> dict[str, str]:
    return {
        k: ("***" if any(m in k.lower() for m in _SECRET_MARKERS) else v)
        for k, v in settings.items()
    }


@dataclass(frozen=True)
class KafkaConfig:
    """Connection to Kafka; the three tables pass straight to librdkafka.

    Attributes:
        bootstrap_servers: comma-separated ``host:port`` list.
        client: librdkafka settings for every client (security, SASL, TLS, …).
        consumer: librdkafka settings for the consumer only.
        producer: librdkafka settings for the producer only.
        statistics_interval_ms: how often librdkafka reports statistics (lag metrics); 0 = off.
        unreachable_timeout_s: exit non-zero when no broker has answered for this long.
    """

    bootstrap_servers: str
    client: Mapping[str, str] = field(default_factory=dict)
    consumer: Mapping[str, str] = field(default_factory=dict)
    producer: Mapping[str, str] = field(default_factory=dict)
    statistics_interval_ms: int = 5000
    unreachable_timeout_s: float = 120.0

    def __repr__(self) -> str:
        return (
            f"KafkaConfig(bootstrap_servers={self.bootstrap_servers!r}, "
            f"client={_redact(self.client)}, consumer={_redact(self.consumer)}, "
            f"producer={_redact(self.producer)}, "
            f"statistics_interval_ms={self.statistics_interval_ms}, "
            f"unreachable_timeout_s={self.unreachable_timeout_s})"
        )


@dataclass(frozen=True)
class InputConfig:
    """The input topic and its contract.

    Attributes:
        topic: topic to consume.
        group_id: consumer group; workers of one deployment share it.
        schema: path of the Avro schema (``.avsc``) the events are written with.
        id_field: input field copied into each prediction as ``input_id``.
        event_time_field: input field holding the event time (timestamp-millis or long
            milliseconds); empty means the Kafka record's timestamp.
        max_message_bytes: records larger than this are dead-lettered unread.
        fast_path: decode with the compiled decoder specialised to the schema and model when the
            schema allows it (see ``fastpath``); false forces the fastavro path.
    """

    topic: str
    group_id: str
    schema: Path
    id_field: str
    event_time_field: str = ""
    max_message_bytes: int = 1_048_576
    fast_path: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """Where predictions go.

    Attributes:
        topic: prediction topic.
        schema: path of the prediction record's Avro schema.
    """

    topic: str
    schema: Path


@dataclass(frozen=True)
class DeadLetterConfig:
    """Where records that cannot be scored go.

    Attributes:
        topic: dead-letter topic.
        max_ratio: stop the worker when more than this fraction of the last ``window``
            records were dead-lettered (0 = no limit).
        window: how many recent records ``max_ratio`` looks at.
        max_consecutive: stop the worker after this many dead letters in a row (0 = no limit).
    """

    topic: str
    max_ratio: float = 0.0
    window: int = 1000
    max_consecutive: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """The model to score with.

    Attributes:
        path: directory holding ``manifest.json`` and the model file.
        threshold: binary classifiers: probability at or above which the label is 1;
            overrides the manifest's threshold when set.
        nthread: XGBoost threads per worker process.
    """

    path: Path
    threshold: float | None = None
    nthread: int = 1


@dataclass(frozen=True)
class BatchConfig:
    """Micro-batching.

    Attributes:
        max_records: a batch is scored as soon as it holds this many records.
        max_wait_ms: a partial batch is scored after waiting this long.
        max_processing_s: target upper bound for processing one batch; when a batch takes
            longer (a slow model), the batch size shrinks so the worker keeps calling poll well
            within ``max.poll.interval.ms`` (which must be at least twice this).
        max_in_flight: at-least-once mode: when this many records wait for their outputs'
            acknowledgement (a backed-up producer), the worker pauses its partitions until
            half of them are acknowledged.
    """

    max_records: int = 1000
    max_wait_ms: int = 10
    max_processing_s: float = 30.0
    max_in_flight: int = 50_000


@dataclass(frozen=True)
class WorkerConfig:
    """The worker process.

    Attributes:
        id: worker id used in client ids, logs and dead-letter headers
            (default: ``<hostname>-<pid>``).
        max_messages: stop after consuming this many records (0 = never).
        idle_timeout_s: stop after this many seconds idle (0 = never): joined, group settled,
            every assigned partition read to its end, nothing in flight (``flow.IdleClock``).
        shutdown_timeout_s: how long shutdown waits for outstanding deliveries.
    """

    id: str = ""
    max_messages: int = 0
    idle_timeout_s: float = 0.0
    shutdown_timeout_s: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint.

    Attributes:
        port: HTTP port for ``/metrics``; 0 disables the endpoint.
        host: address to bind.
    """

    port: int = 9400
    host: str = "0.0.0.0"


#: librdkafka's default ``message.max.bytes``: a producer refuses larger records unless told.
CLIENT_MESSAGE_MAX_BYTES = 1_000_000
#: Room beyond a record's key, value and headers for its framing (record batch, varints).
RECORD_OVERHEAD_BYTES = 65_536

AT_LEAST_ONCE = "at-least-once"
EXACTLY_ONCE = "exactly-once"


@dataclass(frozen=True)
class DeliveryConfig:
    """The delivery guarantee (README.md, "Guarantees").

    Attributes:
        mode: ``at-least-once`` (outputs first, then offsets; a crash can repeat outputs) or
            ``exactly-once`` (each batch's outputs and input offsets in one transaction).
        transactional_id: exactly-once: the producer's transactional id; default
            ``stream-scorer-<group>-<worker id>``, stable across restarts when the worker id is
            (it defaults to the host name in this mode).
        transaction_timeout_s: exactly-once: the broker aborts a transaction open this long.
        static_membership: use the worker id as ``group.instance.id`` so a quick restart keeps
            its partitions without a rebalance (pair with a larger ``session.timeout.ms``).
    """

    mode: str = AT_LEAST_ONCE
    transactional_id: str = ""
    transaction_timeout_s: float = 60.0
    static_membership: bool = False


@dataclass(frozen=True)
class HealthConfig:
    """Liveness, readiness and the per-partition progress watchdog (README.md, "Health").

    Attributes:
        liveness_timeout_s: ``/healthz`` fails when the main loop has not completed an
            iteration for this long.
        stall_timeout_s: a partition with lag whose committed offset has not moved for this
            long is stalled: metric, ``/readyz`` fails, one warning.
    """

    liveness_timeout_s: float = 60.0
    stall_timeout_s: float = 60.0


@dataclass(frozen=True)
class LoggingConfig:
    """Log output (README.md, "Logs").

    Attributes:
        format: ``json`` (one event per line), ``text``, or ``auto``: text when stderr is a
            terminal, else JSON.
        level: ``DEBUG``, ``INFO``, ``WARNING`` or ``ERROR``.
    """

    format: str = "auto"
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one worker."""

    kafka: KafkaConfig
    input: InputConfig
    output: OutputConfig
    dead_letter: DeadLetterConfig
    model: ModelConfig
    batch: BatchConfig = field(default_factory=BatchConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _check(self)


_POSITIVE = {
    "input.max_message_bytes",
    "batch.max_records",
    "batch.max_wait_ms",
    "model.nthread",
    "worker.shutdown_timeout_s",
    "kafka.unreachable_timeout_s",
    "batch.max_processing_s",
    "batch.max_in_flight",
    "dead_letter.window",
    "delivery.transaction_timeout_s",
    "health.liveness_timeout_s",
    "health.stall_timeout_s",
}
_NON_NEGATIVE = {
    "dead_letter.max_consecutive",
    "worker.max_messages",
    "worker.idle_timeout_s",
    "kafka.statistics_interval_ms",
}
_NON_EMPTY = {
    "kafka.bootstrap_servers",
    "input.topic",
    "input.group_id",
    "input.id_field",
    "output.topic",
    "dead_letter.topic",
}


def _check(cfg: Config) -> None:
    for name in _POSITIVE | _NON_NEGATIVE | _NON_EMPTY:
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if name in _POSITIVE and not value > 0:
            raise ConfigError(name, f"must be greater than 0, got {value!r}")
        if name in _NON_NEGATIVE and value < 0:
            raise ConfigError(name, f"must not be negative, got {value!r}")
        if name in _NON_EMPTY and not str(value).strip():
            raise ConfigError(name, "must not be empty")
    if cfg.logging.format not in ("auto", "json", "text"):
        raise ConfigError(
            "logging.format", f"must be auto, json or text, got {cfg.logging.format!r}"
        )
    if cfg.logging.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            "logging.level", f"must be DEBUG, INFO, WARNING or ERROR, got {cfg.logging.level!r}"
        )
    if not 0 <= cfg.metrics.port <= 65535:
        raise ConfigError("metrics.port", f"must be a port number, got {cfg.metrics.port}")
    if cfg.model.threshold is not None and not 0.0 < cfg.model.threshold < 1.0:
        raise ConfigError("model.threshold", "must be strictly between 0 and 1")
    if cfg.delivery.mode not in (AT_LEAST_ONCE, EXACTLY_ONCE):
        raise ConfigError(
            "delivery.mode", f"must be {AT_LEAST_ONCE} or {EXACTLY_ONCE}, got {cfg.delivery.mode!r}"
        )
    if not 0.0 <= cfg.dead_letter.max_ratio < 1.0:
        raise ConfigError("dead_letter.max_ratio", "must be at least 0 and below 1 (0 = no limit)")
    raw_poll = cfg.kafka.consumer.get("max.poll.interval.ms", "300000")
    try:
        poll_ms = int(raw_poll)
    except ValueError:
        raise ConfigError(
            "kafka.consumer.max.poll.interval.ms", f"must be an integer, got {raw_poll!r}"
        ) from None
    if poll_ms < 2000 * cfg.batch.max_processing_s:
        raise ConfigError(
            "batch.max_processing_s",
            f"must be at most half of kafka.consumer.max.poll.interval.ms ({poll_ms} ms)",
        )
    topics = {cfg.input.topic, cfg.output.topic, cfg.dead_letter.topic}
    if len(topics) != 3:
        raise ConfigError("output.topic", "input, output and dead-letter topics must differ")
    for name, path in (("input.schema", cfg.input.schema), ("output.schema", cfg.output.schema)):
        if not path.is_file():
            raise ConfigError(name, f"no such file: {path}")
    if not cfg.model.path.is_dir():
        raise ConfigError("model.path", f"no such directory: {cfg.model.path}")
    for section in ("client", "consumer", "producer"):
        for key in getattr(cfg.kafka, section):
            if key in _OWNED_KEYS:
                raise ConfigError(
                    f"kafka.{section}.{key}",
                    "is set by stream-scorer itself; use the matching stream-scorer key",
                )


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

T = TypeVar("T")


def _coerce(name: str, hint: Any, value: Any, base: Path) -> Any:
    """Convert ``value`` to the type ``hint`` or raise ConfigError naming ``name``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("", "null", "none")):
            return None
        return _coerce(name, args[0], value, base)
    if is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"must be a table, got {type(value).__name__}")
        return _build(hint, value, name, base)  # type: ignore[arg-type]
    if origin is Mapping or hint is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(name, f"must be a table of librdkafka settings, got {value!r}")
        return {str(k): _scalar_str(f"{name}.{k}", v) for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be a number, got {value!r}") from None
    if hint is Path:
        if not isinstance(value, str | Path):
            raise ConfigError(name, f"must be a path, got {value!r}")
        path = Path(value).expanduser()
        return path if path.is_absolute() else (base / path)
    if hint is str:
        if isinstance(value, Mapping | list):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return str(value)
    raise ConfigError(name, f"unsupported type {hint!r}")  # pragma: no cover


def _scalar_str(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise ConfigError(name, f"must be a string, number or boolean, got {value!r}")


def _build(cls: type[T], raw: Mapping[str, Any], prefix: str, base: Path) -> T:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in raw:
        if key not in known:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        where = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            kwargs[f.name] = _coerce(where, hints[f.name], raw[f.name], base)
        elif is_dataclass(hints[f.name]) and f.default_factory is not MISSING:
            kwargs[f.name] = _build(hints[f.name], {}, where, base)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(where, "is required")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - guarded above
        raise ConfigError(prefix or "config", str(exc)) from exc


def _set_path(tree: dict[str, Any], path: list[str], value: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(path), "overrides a value that is not a table")
        node = child
    node[path[-1]] = value


_PASSTHROUGH = ("client", "consumer", "producer")


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Turn ``STREAM_SCORER_*`` variables into a nested override table."""
    tree: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_CONFIG:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) == 3 and parts[0] == "kafka" and parts[1] in _PASSTHROUGH:
            parts[2] = parts[2].replace("_", ".")
        _set_path(tree, parts, value)
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def read_file(path: Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) configuration file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if path.suffix == ".toml":
            raw: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError("config", f"{path}: use a .yaml, .yml or .toml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError("config", f"{path} is not valid: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{path} must hold a table at the top level")
    return raw


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
        ConfigError: naming the first offending key.
    """
    raw: dict[str, Any] = read_file(path) if path is not None else {}
    base = path.resolve().parent if path is not None else Path.cwd()
    raw = _merge(raw, env_overrides(os.environ if environ is None else environ))
    raw = _merge(raw, overrides or {})
    return _build(Config, raw, "", base)


def with_worker(cfg: Config, **changes: Any) -> Config:
    """Return ``cfg`` with fields of its ``worker`` section replaced."""
    return replace(cfg, worker=replace(cfg.worker, **changes))


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
    settings.update(cfg.kafka.client)
    settings.update(cfg.kafka.consumer)
    if settings.get("group.protocol") == "consumer":  # KIP-848: the broker assigns
        settings.pop("partition.assignment.strategy", None)
    return settings


def producer_settings(cfg: Config, worker_id: str) -> dict[str, str]:
    """Return the librdkafka settings for the worker's producer (predictions, dead letters).

    A message not acknowledged within ``message.timeout.ms`` (default: two minutes; in
    exactly-once mode at most the transaction timeout) fails its delivery, and the worker stops.
    """
    txn_ms = int(cfg.delivery.transaction_timeout_s * 1000)
    settings = {
        "bootstrap.servers": cfg.kafka.bootstrap_servers,
        "client.id": f"stream-scorer-{worker_id}",
        "enable.idempotence": "true",
        "acks": "all",
        "linger.ms": "5",
        "message.max.bytes": str(
            max(CLIENT_MESSAGE_MAX_BYTES, cfg.input.max_message_bytes + RECORD_OVERHEAD_BYTES)
        ),
        "message.timeout.ms": "120000",
    }
    if cfg.delivery.mode == EXACTLY_ONCE:
        settings["transactional.id"] = transactional_id(cfg, worker_id)
        settings["transaction.timeout.ms"] = str(txn_ms)
        settings["message.timeout.ms"] = str(txn_ms)
    settings.update(cfg.kafka.client)
    settings.update(cfg.kafka.producer)
    if cfg.delivery.mode == EXACTLY_ONCE and int(settings["message.timeout.ms"]) > txn_ms:
        raise ConfigError(
            "kafka.producer.message.timeout.ms",
            "must not exceed delivery.transaction_timeout_s in exactly-once mode",
        )
    return settings


def redacted(settings: Mapping[str, str]) -> dict[str, str]:
    """Return librdkafka ``settings`` with secret values replaced by ``***``, for logs."""
    return _redact(settings)
