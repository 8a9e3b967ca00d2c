"""The worker's configuration: one typed, frozen tree, declared as pydantic models.

Sources, later ones winning: the sections' defaults, one YAML or TOML file, environment variables
``STREAM_SCORER_<SECTION>__<KEY>`` (for example ``STREAM_SCORER_INPUT__TOPIC=rides`` or
``STREAM_SCORER_KAFKA__CONSUMER__FETCH_MIN_BYTES=1`` — inside the ``kafka.*`` pass-through
tables a single ``_`` becomes a ``.``), then command-line flags. An unknown key, a missing
required key or a value of the wrong type stops start-up with a ``ConfigError`` naming every such
key (an unknown one with the nearest known key);
a value inside the ``kafka.*`` tables, or of a key that looks secret, is never echoed.
``config_schema()`` is the file's JSON Schema (``stream-scorer config schema``).

The package's modules: ``keys`` (librdkafka key sets, what may be logged), ``values`` (the value
types), ``sections`` (the models and the checks across keys), ``messages`` (pydantic's errors in
our words), ``sources`` (file, environment, flags), ``kafka`` (the one place where settings become
librdkafka's dotted keys) and ``check`` (librdkafka's own checks at start-up).
"""

from stream_scorer.config.check import check_clients
from stream_scorer.config.evaluate import DecideConfig, EvaluateConfig, OutcomesConfig
from stream_scorer.config.kafka import (
    CLIENT_BATCH_SIZE,
    CLIENT_MESSAGE_MAX_BYTES,
    CLIENT_MESSAGE_MAX_BYTES_LIMIT,
    RECORD_OVERHEAD_BYTES,
    client_settings,
    consumer_settings,
    kafka_client,
    producer_settings,
    share_consumer_settings,
    transactional_id,
    worker_identity,
)
from stream_scorer.config.keys import (
    LOGGABLE_KEYS,
    OWNED_KEYS,
    PASSTHROUGH,
    SECRET_MARKERS,
    is_secret,
    redacted,
)
from stream_scorer.config.sections import (
    AT_LEAST_ONCE,
    DEFAULT_MODEL_NAME,
    EXACTLY_ONCE,
    BatchConfig,
    Config,
    DeadLetterConfig,
    DeliveryConfig,
    DriftConfig,
    HealthConfig,
    InputConfig,
    KafkaConfig,
    LoggingConfig,
    MetricsConfig,
    ModelConfig,
    ModelEntry,
    ModelEntryConfig,
    OutputConfig,
    RegistryConfig,
    StoreConfig,
    WorkerConfig,
    config_schema,
)
from stream_scorer.config.sources import ENV_PREFIX, load_config, read_file, with_worker

# the names devtools/manual.py reads (kept while it reads them)
_SECRET_MARKERS = SECRET_MARKERS
_PASSTHROUGH = PASSTHROUGH
_is_secret = is_secret

__all__ = [
    "AT_LEAST_ONCE",
    "CLIENT_BATCH_SIZE",
    "CLIENT_MESSAGE_MAX_BYTES",
    "CLIENT_MESSAGE_MAX_BYTES_LIMIT",
    "DEFAULT_MODEL_NAME",
    "ENV_PREFIX",
    "EXACTLY_ONCE",
    "LOGGABLE_KEYS",
    "OWNED_KEYS",
    "PASSTHROUGH",
    "RECORD_OVERHEAD_BYTES",
    "SECRET_MARKERS",
    "BatchConfig",
    "Config",
    "DeadLetterConfig",
    "DecideConfig",
    "DeliveryConfig",
    "DriftConfig",
    "EvaluateConfig",
    "HealthConfig",
    "InputConfig",
    "KafkaConfig",
    "LoggingConfig",
    "MetricsConfig",
    "ModelConfig",
    "ModelEntry",
    "ModelEntryConfig",
    "OutcomesConfig",
    "OutputConfig",
    "RegistryConfig",
    "StoreConfig",
    "WorkerConfig",
    "check_clients",
    "client_settings",
    "config_schema",
    "consumer_settings",
    "is_secret",
    "kafka_client",
    "load_config",
    "producer_settings",
    "read_file",
    "redacted",
    "share_consumer_settings",
    "transactional_id",
    "with_worker",
    "worker_identity",
]
