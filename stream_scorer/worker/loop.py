"""The worker: wire the stages together and run the main loop.

poll a batch → decode/features/score/encode (``Pipeline``) → deliver (``delivery.py``: produce
and store acknowledged offsets, or one transaction per batch) → health, until a signal, a limit
or an error stops it. Then: drain, commit, leave the group.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import fastavro
from confluent_kafka import Producer

from stream_scorer.config import (
    CLIENT_MESSAGE_MAX_BYTES,
    EXACTLY_ONCE,
    Config,
    ModelEntry,
    check_clients,
    client_settings,
    consumer_settings,
    producer_settings,
    redacted,
    share_consumer_settings,
    transactional_id,
    worker_identity,
)
from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.envelope import Protector, load_public_key
from stream_scorer.errors import (
    BrokerError,
    ConfigError,
    RefusedError,
    SchemaError,
    StreamScorerError,
)
from stream_scorer.fast.encode import write_v1_batch
from stream_scorer.fast.framed import build_framed_columns
from stream_scorer.fast.path import build_fast_path
from stream_scorer.kafka.access import check_access, principal_of, role_grants
from stream_scorer.kafka.groups import OrphanedLag, orphaned_lag
from stream_scorer.kafka.topics import require_topics, topic_max_message_bytes
from stream_scorer.letters import Signer
from stream_scorer.logs import set_context as set_log_context
from stream_scorer.model.store import (
    MLFLOW_SCHEME,
    STORE_SCHEME,
    DirectorySource,
    ModelSource,
    open_source,
    parse_ref,
)
from stream_scorer.registry import NotFound, RegistryClient
from stream_scorer.retry import retrying
from stream_scorer.stages.columns import EVENT_TIME_TYPES, AvroColumns
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.drift import bins_of
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.features import FeatureBuilder, check_schema
from stream_scorer.stages.fields import resolve, type_name
from stream_scorer.stages.framing import MAGIC_ID, FramedColumns
from stream_scorer.stages.multi import (
    ModelOutput,
    MultiResult,
    compare,
    score_batch,
    share_columns,
)
from stream_scorer.stages.pipeline import ColumnBuilder, Pipeline
from stream_scorer.stages.records import Message
from stream_scorer.stages.score import Scorer
from stream_scorer.worker.delivery import AtLeastOnce, Delivery, ExactlyOnce, Input, ProducerEvents
from stream_scorer.worker.drift import DriftWatch, warm_up_drift
from stream_scorer.worker.flow import (
    IDLE_GAP_SLACK_S,
    REQUESTED_STOPS,
    BatchSizer,
    IdleClock,
    PoisonGuard,
    StopFlag,
)
from stream_scorer.worker.health import Monitor
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.progress import Progress
from stream_scorer.worker.refresh import LoadedModel, columns_of
from stream_scorer.worker.schemas import WriterSchemas
from stream_scorer.worker.share import ShareSource, configure_group, share_group_configs
from stream_scorer.worker.sink import Sink, SinkContext
from stream_scorer.worker.slots import Slot
from stream_scorer.worker.source import Source

log = logging.getLogger(__name__)


@dataclass
class WorkerReport:
    """What one worker did; printed as JSON when it exits."""

    worker_id: str
    consumed: int = 0
    predictions: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    elapsed_s: float = 0.0
    stopped_by: str = ""
    #: Stopped by idle timeout: the group's records left in partitions nobody consumes (None:
    #: not checked, another stop, or the check failed).
    orphaned_lag: OrphanedLag | None = None


def model_source(cfg: Config, entry: ModelEntry | None = None) -> ModelSource:
    """The configured model source (``model.source``, or the directory ``model.path``).

    ``entry``: the model entry's (default: the first).
    """
    model = (entry or cfg.first).model
    if model.path is not None:
        return DirectorySource(model.path)
    return open_source(
        model.source,
        tracking_uri=model.mlflow_tracking_uri,
        retry_deadline_s=cfg.retry.model_registry_timeout_s,
        policy=cfg.retry.policy(),
    )


def model_name(cfg: Config, entry: ModelEntry | None = None) -> str:
    """The ``model`` label of a model entry's drift gauges (``entry``: default the first).

    Under ``models:`` the entry's name; the single ``model:`` form: the store's or MLflow's
    model name, else the model directory's name.
    """
    entry = entry or cfg.first
    if cfg.models:
        return entry.name
    spec = entry.model.source
    if spec.startswith((STORE_SCHEME, MLFLOW_SCHEME)):
        return parse_ref(spec).name
    path = entry.model.path if entry.model.path is not None else Path(spec)
    return path.resolve().name or "model"


def output_prefix(
    cfg: Config, client: RegistryClient | None = None, entry: ModelEntry | None = None
) -> bytes:
    """``output.format: confluent``: the frame before every prediction (magic 0 and the id).

    Registers the prediction schema under ``<output topic>-value`` (``output.auto_register``)
    or looks it up there, retrying while the registry is unreachable.

    Raises:
        ConfigError: auto-registration is off and the subject lacks the schema (exit 2).
        RefusedError: the registry refused the credentials (401/403) or the schema (409, 422:
            its message quoted, field ``output.schema``).
        RegistryError: the registry did not answer for ``registry.unavailable_timeout_s``.

    ``entry``: the model entry whose output it is (default: the first).
    """
    entry = entry or cfg.first
    output = entry.output
    if output.format != "confluent":
        return b""
    client = client or RegistryClient.from_config(cfg.registry)
    subject = f"{output.topic}-value"
    text = json.dumps(json.loads(output.schema.read_text(encoding="utf-8")))
    for attempt in retrying(
        cfg.registry.unavailable_timeout_s,
        f"subject {subject}",
        server="registry",
        policy=cfg.retry.policy(),
    ):
        with attempt:
            try:
                schema_id = (
                    client.register(subject, text)
                    if output.auto_register
                    else client.lookup(subject, text)
                )
            except RefusedError as exc:
                if exc.status in (401, 403):
                    raise
                raise RefusedError(  # 409 incompatible, 422 invalid: the schema is to fix
                    entry.field("output", "schema"),
                    f"{output.schema} under subject {subject!r}: {exc.detail}",
                    url=exc.url,
                    status=exc.status,
                    principal=exc.principal,
                ) from exc
            except NotFound:
                raise ConfigError(
                    entry.field("output", "auto_register"),
                    f"is false and subject {subject!r} at {cfg.registry.url} does not hold "
                    f"the prediction schema {output.schema}: register it first",
                ) from None
    log.info("predictions framed with schema id %d (subject %s)", schema_id, subject)
    return bytes([MAGIC_ID]) + schema_id.to_bytes(4, "big")


def reader_schema(cfg: Config, client: RegistryClient | None = None) -> dict[str, Any] | None:
    """``input.reader_subject``: the reader schema from the registry (None: ``input.schema``).

    Raises:
        ConfigError: the subject or version does not exist (exit 2).
        SchemaError: its schema is not an Avro record.
        RegistryError: the registry did not answer for ``registry.unavailable_timeout_s``.
    """
    subject, version = cfg.input.reader_subject, cfg.input.reader_version
    if not subject:
        return None
    client = client or RegistryClient.from_config(cfg.registry)
    for attempt in retrying(
        cfg.registry.unavailable_timeout_s,
        f"subject {subject}",
        server="registry",
        policy=cfg.retry.policy(),
    ):
        with attempt:
            try:
                schema_id, text = client.subject_version(subject, version)
            except NotFound:
                raise ConfigError(
                    "input.reader_subject",
                    f"subject {subject!r} has no version {version!r} at {cfg.registry.url}",
                ) from None
    try:
        parsed = fastavro.parse_schema(json.loads(text))
    except (ValueError, fastavro.schema.SchemaParseException) as exc:
        raise SchemaError(f"reader schema {subject} v{version}: {exc}") from exc
    if not isinstance(parsed, dict) or parsed.get("type") != "record":
        raise SchemaError(f"reader schema {subject} v{version}: not an Avro record")
    log.info("reader schema: subject %s version %s (id %d)", subject, version, schema_id)
    return dict(parsed)


def build_pipeline(
    cfg: Config,
    metrics: Metrics,
    model_dir: Path | None = None,
    *,
    prefix: bytes = b"",
    reader: dict[str, Any] | None = None,
    entry: ModelEntry | None = None,
    builders: dict[str, ColumnBuilder] | None = None,
) -> tuple[Pipeline, Scorer]:
    """Load the schemas and the model and check they fit each other.

    Args:
        cfg: the configuration.
        metrics: the worker's metrics.
        model_dir: the model's directory (default ``model.path``).
        prefix: written before every prediction (``output_prefix``).
        reader: the input's reader schema when it does not come from ``input.schema``
            (``reader_schema``).
        entry: the model entry (default: the first).
        builders: the decode + features steps built so far, by feature list: a model whose
            manifest lists the same features (and policies) shares one (``multi``).
    """
    entry = entry or cfg.first
    model_dir = model_dir or entry.model.path
    if model_dir is None:
        raise ConfigError(entry.field("model", "path"), "no model directory")
    scorer = Scorer(model_dir, nthread=entry.model.nthread, threshold=entry.model.threshold)
    input_schema = reader if reader is not None else load_schema(cfg.input.schema)
    check_schema(scorer.manifest.features, input_schema)
    # a malformed reference is refused here; the drift counts' kernel compiled (or loaded from
    # numba's cache) at start-up, not at the first batch
    bins = bins_of(scorer.manifest.reference, scorer.manifest.features)
    if bins is not None and cfg.drift.enabled:
        warm_up_drift(bins)
    # every category feature's series exists from the start, at 0
    metrics.count_unseen({f.name: 0 for f in scorer.manifest.features if f.transform == "category"})
    for key, name in (
        ("input.id_field", cfg.input.id_field),
        ("input.event_time_field", cfg.input.event_time_field),
    ):
        if name:
            try:
                types = resolve(input_schema, name)
            except SchemaError as exc:
                raise ConfigError(key, f"{exc} (input schema {cfg.input.schema})") from None
            timed = key == "input.event_time_field"
            wrong = [type_name(t) for t in types if timed and type_name(t) not in EVENT_TIME_TYPES]
            if wrong:
                raise ConfigError(
                    key,
                    f"field {name!r} is of type {', '.join(wrong)} "
                    f"(input schema {cfg.input.schema}): "
                    "an event time must be a long of epoch milliseconds (logical type "
                    "timestamp-millis, or timestamp-micros); leave the key empty to use the "
                    "Kafka record's timestamp",
                )
    try:
        encoder = PredictionEncoder(
            load_schema(entry.output.schema), prefix=prefix, batch_writer=write_v1_batch
        )
    except SchemaError as exc:
        raise ConfigError(entry.field("output", "schema"), str(exc)) from exc
    features = scorer.manifest.features
    columns = share_columns(
        {} if builders is None else builders,
        feature_key(features),
        partial(_columns, cfg, input_schema, features),
    )
    if isinstance(columns, FramedColumns):
        log.info("decoder: confluent wire format, each writer schema resolved against %s",
                 cfg.input.schema)  # fmt: skip
    return Pipeline(columns, scorer, encoder, timer=metrics.observe_stage), scorer


def feature_key(features: Sequence[FeatureSpec]) -> str:
    """What makes two models' decode + features steps the same (their sharing key).

    Each feature, in order, with the value policy that applies to it (the manifest-wide one
    with its overrides).
    """
    return repr([(f, f.effective_policy) for f in features])


def _columns(
    cfg: Config, input_schema: dict[str, Any], features: Sequence[FeatureSpec]
) -> ColumnBuilder:
    """The decode + features step for ``features``: framed, compiled, or fastavro."""
    if cfg.input.format == "confluent":
        return build_framed_columns(
            input_schema,
            features,
            id_field=cfg.input.id_field,
            event_time_field=cfg.input.event_time_field,
            max_message_bytes=cfg.input.max_message_bytes,
            fast_path=cfg.input.fast_path,
            max_schemas=cfg.registry.max_schemas,
        )
    fast = build_fast_path(
        input_schema,
        features,
        id_field=cfg.input.id_field,
        event_time_field=cfg.input.event_time_field,
        max_message_bytes=cfg.input.max_message_bytes,
        enabled=cfg.input.fast_path,
    )
    return fast or AvroColumns(
        Decoder(input_schema, cfg.input.max_message_bytes),
        FeatureBuilder(features),
        id_field=cfg.input.id_field,
        event_time_field=cfg.input.event_time_field,
    )


def _writer_schemas(cfg: Config, columns: ColumnBuilder, metrics: Metrics) -> WriterSchemas | None:
    """``input.format: confluent``: the registry fetches behind the framed decoder."""
    if not isinstance(columns, FramedColumns):
        return None
    return WriterSchemas(
        columns,
        RegistryClient.from_config(cfg.registry),
        unavailable_timeout_s=cfg.registry.unavailable_timeout_s,
        keepalive=lambda: metrics.last_progress.set(time.time()),
        policy=cfg.retry.policy(),
    )


def _protector(cfg: Config) -> Protector | None:
    """What dead letters carry of their records (``dead_letter.payload``); None: all of it."""
    mode = cfg.dead_letter.payload
    if mode == "keep":
        return None
    path = cfg.dead_letter.public_key
    return Protector(mode, None if path is None else load_public_key(path))


def _signer(cfg: Config) -> Signer | None:
    """What signs dead letters (``dead_letter.signing_key``); None: unsigned."""
    path = cfg.dead_letter.signing_key
    return None if path is None else Signer.from_file(path, "dead_letter.signing_key")


def _delivery(
    cfg: Config,
    worker_id: str,
    ctx: SinkContext,
    source: Input,
    tracker: OffsetTracker,
    metrics: Metrics,
) -> Delivery:
    """Create the producer side of the configured delivery mode.

    Dead letters are sized to the least of the dead-letter topic's ``max.message.bytes``
    (``ctx.dead_letter_max_bytes``, read at start-up) and the producer's ``message.max.bytes``.
    """
    topic_limit = ctx.dead_letter_max_bytes
    psettings = producer_settings(cfg, worker_id, topic_limit)
    client_limit = int(psettings.get("message.max.bytes", CLIENT_MESSAGE_MAX_BYTES))
    ctx = replace(
        ctx, dead_letter_max_bytes=min(client_limit, topic_limit) if topic_limit else client_limit
    )
    log.info("producer settings: %s", redacted(psettings))
    producer_events = ProducerEvents()
    settings = {**psettings, **producer_events.callbacks()}  # its log lines and errors
    if cfg.delivery.mode == EXACTLY_ONCE:
        return ExactlyOnce(
            lambda: Producer(settings),
            ctx,
            source,
            tracker,
            metrics,
            timeout_s=cfg.delivery.transaction_timeout_s,
            producer_events=producer_events,
            bootstrap=cfg.kafka.bootstrap_servers,
            unreachable_timeout_s=cfg.kafka.unreachable_timeout_s,
            group_id=cfg.input.group_id,
            transactional_id=transactional_id(cfg, worker_id),
            principal=ctx.principal,
            grants=role_grants(cfg, "worker"),
        )
    return AtLeastOnce(
        Sink(Producer(settings), ctx, tracker, metrics),
        source,
        tracker,
        max_in_flight=cfg.batch.max_in_flight,
        flush_timeout_s=cfg.worker.shutdown_timeout_s,
        wait=cfg.input.group_type == "share",
    )


def _source(
    cfg: Config, settings: dict[str, str], metrics: Metrics, delivery: Callable[[], Delivery]
) -> Source | ShareSource:
    """The input: a consumer group's ``Source`` or a share group's ``ShareSource``.

    A share group's configs (start position, delivery limit) are set first.
    """
    if cfg.input.group_type == "share":
        configs = share_group_configs(cfg.input.auto_offset_reset, cfg.input.delivery_limit)
        configure_group(client_settings(cfg), cfg.input.group_id, configs)
        return ShareSource(
            settings,
            cfg.input.topic,
            unreachable_timeout_s=cfg.kafka.unreachable_timeout_s,
            delivery_limit=cfg.input.delivery_limit,
            extra_topics=cfg.input.topics,
            admin_settings=client_settings(cfg),
        )
    return Source(
        settings,
        cfg.input.topic,
        metrics,
        unreachable_timeout_s=cfg.kafka.unreachable_timeout_s,
        on_revoke=lambda parts: delivery().on_revoke(parts),
        on_lost=lambda parts: delivery().on_lost(parts),
        extra_topics=cfg.input.topics,
    )


def run_worker(cfg: Config, stop: StopFlag | None = None) -> WorkerReport:
    """Run one worker until stopped; return what it did.

    Whatever stopped it (a signal, ``max_messages``, idle), it returns only when every record it
    consumed and still owns was delivered (outputs acknowledged and offsets stored for the final
    commit, or its transaction committed with its offsets); otherwise it raises
    (``check_clean_stop``) and those records stay uncommitted, for redelivery.

    Raises:
        StreamScorerError: a configuration, model, broker or delivery failure (exit non-zero).
    """
    worker_id = worker_identity(cfg)
    check_clients(cfg, worker_id)  # a setting librdkafka refuses stops start-up naming its key
    report = WorkerReport(worker_id)
    set_log_context(worker_id=worker_id, group=cfg.input.group_id)
    stop = stop if stop is not None else StopFlag()
    metrics = Metrics()
    tracker = OffsetTracker()
    with ExitStack() as stack:
        stack.enter_context(stop.on_signals())  # first: a SIGTERM during start-up stops cleanly
        reader = reader_schema(cfg)
        slots = _slots(cfg, metrics, reader)
        for slot in slots:
            stack.callback(slot.close)
            slot.start()
        main = next(slot for slot in slots if not slot.shadow)
        model = main.loaded
        assert model is not None  # a serve slot that cannot load raised
        scorer = model.scorer
        metrics.model_swapped(None, scorer.model_version)
        monitor = stack.enter_context(Monitor(cfg, metrics, scorer.model_version))
        drift = {s.name: DriftWatch(model_name(cfg, s.entry), cfg.drift, metrics) for s in slots}
        models = Models(slots, metrics, monitor, drift)
        schemas = _writer_schemas(cfg, models.columns()[0], metrics)
        if schemas is not None:
            schemas.follow(*models.columns())  # a rollout's or another entry's decoders too
        ctx = SinkContext(
            main.entry.output.topic,
            cfg.dead_letter.topic,
            cfg.input.group_id,
            worker_id,
            scorer.model_version,
            cfg.kafka.unreachable_timeout_s,
            frozenset(main.entry.output.copy_headers),
            principal_of(client_settings(cfg)),
            _protector(cfg),
            signer=_signer(cfg),
        )
        share = cfg.input.group_type == "share"
        csettings = (share_consumer_settings if share else consumer_settings)(cfg, worker_id)
        log.info("consumer settings: %s", redacted(csettings))
        require_topics(  # before consuming anything: a missing topic is a deployment error
            client_settings(cfg),
            {
                "input.topic": cfg.input.topic,
                **{
                    f"input.topics[{i}]": t
                    for i, t in enumerate(cfg.input.topics)
                    if not t.startswith("^")
                },
                **{e.field("output", "topic"): e.output.topic for e in cfg.entries},
                "dead_letter.topic": cfg.dead_letter.topic,
            },
            unreachable_timeout_s=cfg.kafka.unreachable_timeout_s,
            stop=lambda: bool(stop),
            alive=lambda: metrics.last_progress.set(time.time()),
        )
        # a missing ACL stops the worker here, before it consumes anything
        check_access(client_settings(cfg), role_grants(cfg, "worker"))
        # every dead letter is sized to fit its topic: no record can stop a partition
        ctx = replace(
            ctx,
            dead_letter_max_bytes=topic_max_message_bytes(
                client_settings(cfg), cfg.dead_letter.topic, cfg.kafka.unreachable_timeout_s
            ),
        )
        source = _source(cfg, csettings, metrics, lambda: delivery)
        stack.enter_context(source)
        delivery = _delivery(cfg, worker_id, ctx, source, tracker, metrics)
        monitor.watch(source)
        # the ~130k objects of start-up (xgboost, numba, numpy, the clients) live as long as
        # the worker: frozen, the collector's full passes skip them (each took ~50 ms and
        # showed as periodic latency spikes under load)
        gc.collect()
        gc.freeze()
        if schemas is not None:

            def keepalive() -> None:  # while the registry is down: acks and health go on
                metrics.registry_retries.inc()
                metrics.registry_waiting.set(1)
                delivery.service()
                metrics.last_progress.set(time.time())

            schemas.keepalive = keepalive
            schemas.stopping = lambda: bool(stop)
        models.score([])  # warm-up: the first real batch can be scored at once
        metrics.could_score()
        monitor.scorable()
        rolled_back = _loop(
            cfg,
            source,
            models,
            delivery,
            tracker,
            metrics,
            report,
            stop,
            schemas=schemas,
            progress=Progress(metrics, cfg.logging.progress_interval_s),
        )
        remaining = delivery.drain()
        metrics.in_flight.set(tracker.pending)
        check_clean_stop(
            report.stopped_by,
            unacknowledged=remaining,
            rolled_back=rolled_back,
            in_flight=tracker.pending,
            shutdown_timeout_s=cfg.worker.shutdown_timeout_s,
        )
        own = source.assignment
    if report.stopped_by == "idle_timeout" and not share:  # what it leaves behind
        report.orphaned_lag = check_orphaned_lag(cfg, own)
    report.dead_letters = {
        f"{s.labels['stage']}/{s.labels['reason']}": int(s.value)
        for m in metrics.dead_letters.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    report.predictions = int(
        metrics.prometheus.get_sample_value("stream_scorer_predictions_produced_total") or 0
    )
    return report


def check_orphaned_lag(cfg: Config, own: set[tuple[str, int]]) -> OrphanedLag | None:
    """After an idle stop: the group's records in partitions no live member consumes.

    Logged as a warning when there are any (``cli`` then exits ``EXIT_ORPHANED_LAG``); None
    when the broker could not tell (a warning says so).
    """
    try:
        found = orphaned_lag(client_settings(cfg), cfg.input.group_id, own)
    except StreamScorerError as exc:
        log.warning("stopped idle; could not check the group's lag elsewhere: %s", exc)
        return None
    if found:
        log.warning(
            "stopped idle with %d records left in %d partitions no live member consumes: %s "
            "(a member that died keeps its partitions until its session.timeout.ms runs out; "
            "start a worker to take them over)",
            found.records,
            len(found.partitions),
            ", ".join(found.partitions),
        )
    return found


def check_clean_stop(
    stopped_by: str,
    *,
    unacknowledged: int,
    rolled_back: int,
    in_flight: int,
    shutdown_timeout_s: float,
) -> None:
    """Raise unless the worker stopped with everything it consumed delivered (exit 0 = done).

    Called after the loop and the drain, whatever stopped the loop (a signal, a limit, idle).

    Args:
        stopped_by: what stopped the loop.
        unacknowledged: outputs still unacknowledged after the drain.
        rolled_back: records of the last batch, if its transaction was rolled back.
        in_flight: consumed records whose outputs were not acknowledged.
        shutdown_timeout_s: ``worker.shutdown_timeout_s``, for the message.

    Raises:
        BrokerError: something consumed was not delivered; its offset stays uncommitted and the
            partition's next reader gets the records again.
    """
    if unacknowledged:
        raise BrokerError(
            f"{unacknowledged} outputs not acknowledged within worker.shutdown_timeout_s = "
            f"{shutdown_timeout_s}; their records stay uncommitted (redelivered)"
        )
    if rolled_back and stopped_by in REQUESTED_STOPS:
        # asked to stop right after a transaction was rolled back (a rebalance aborts one, for
        # example): its records were rewound, nothing of them is committed, and whoever reads
        # the partition next consumes them again, so the stop itself is clean
        log.warning(
            "stopped (%s) right after a rolled-back transaction: its %d records stay uncommitted "
            "and are consumed again by the partition's next reader",
            stopped_by,
            rolled_back,
        )
    elif rolled_back:
        raise BrokerError(
            f"stopped ({stopped_by}) with the last transaction rolled back: its {rolled_back} "
            "records were neither delivered nor committed (redelivered)"
        )
    if in_flight:
        raise BrokerError(
            f"stopped ({stopped_by}) with {in_flight} consumed records not delivered; they "
            "stay uncommitted (redelivered)"
        )


def _slots(cfg: Config, metrics: Metrics, reader: dict[str, Any] | None) -> list[Slot]:
    """A slot per model entry; those with the same features share one decode + features step."""
    builders: dict[str, ColumnBuilder] = {}
    slots = []
    for entry in cfg.entries:
        load = partial(
            _load_entry, cfg, metrics, entry, output_prefix(cfg, entry=entry), reader, builders
        )
        slots.append(
            Slot(
                entry,
                model_source(cfg, entry),
                load,
                metrics,
                refresh_s=entry.model.refresh_s,
                policy=cfg.retry.policy(),
                named=bool(cfg.models),
            )
        )
    return slots


def _load_entry(
    cfg: Config,
    metrics: Metrics,
    entry: ModelEntry,
    prefix: bytes,
    reader: dict[str, Any] | None,
    builders: dict[str, ColumnBuilder],
    directory: Path,
) -> tuple[Pipeline, Scorer]:
    """Build the pipeline of ``entry``'s model in ``directory`` (a ``refresh.Loader``)."""
    return build_pipeline(
        cfg, metrics, directory, prefix=prefix, reader=reader, entry=entry, builders=builders
    )


class Models:
    """The worker's model slots as the main loop sees them: score a batch, swap between batches.

    The single ``model:`` form is one unnamed slot, scored and delivered as before ``models:``.
    Each slot may be a rollout (its records routed by key over its versions); each has its own
    drift watch (``drift``: by slot name).
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        metrics: Metrics,
        monitor: Monitor,
        drift: Mapping[str, DriftWatch] | None = None,
    ) -> None:
        """Score with ``slots`` (in configuration order; at least one serve slot)."""
        self._slots = list(slots)
        self._metrics = metrics
        self._monitor = monitor
        self._drift = dict(drift or {})
        self._main = next(s for s in self._slots if not s.shadow)
        self._by_name = {s.name: s for s in self._slots}
        self._named = any(s.scoring_name for s in self._slots)

    @property
    def model_version(self) -> str:
        """The first serve model's version (the worker's in health and logs)."""
        return self._main.loaded.model_version if self._main.loaded else ""

    def columns(self) -> list[ColumnBuilder]:
        """The distinct decode + features steps scoring now (every version of a rollout's)."""
        found: dict[int, ColumnBuilder] = {}
        for s in self._slots:
            for columns in [] if s.loaded is None else columns_of(s.loaded):
                found.setdefault(id(columns), columns)
        return list(found.values())

    def _slot(self, out: ModelOutput) -> Slot | None:
        return self._by_name.get(out.name) if out.name else self._main

    def score(self, messages: Sequence[Message]) -> MultiResult:
        """Score a batch with every model that scores now; note shadows' failures and agreement."""
        scorings = [x for x in (s.scoring() for s in self._slots) if x is not None]
        result = score_batch(scorings, messages, self._metrics.observe_stage)
        serve = {o.name: o.result for o in result.outputs if not o.shadow}
        for out in result.outputs:
            slot = self._slot(out)
            self._metrics.model_stage_seconds.labels(slot.name if slot else "").observe(out.seconds)
            if not out.shadow or slot is None:
                continue
            if out.failed is not None:
                slot.fail(out.failed)
                continue
            slot.scored()
            name = slot.name
            if out.refused:
                self._metrics.shadow_refused.labels(name).inc(out.refused)
            champion = serve.get(slot.entry.shadow_of)
            if champion is not None and messages:
                seen = compare(champion, out.result)
                self._metrics.shadow_compared.labels(name).inc(seen.compared)
                self._metrics.shadow_agreed.labels(name).inc(seen.agreed)
                self._metrics.shadow_delta.observe_many(seen.deltas, name)
        return result

    def delivered(self, result: MultiResult) -> None:
        """A batch was delivered: each model's predictions counted per version, drift observed.

        Called before ``swap``: each slot still holds the model that scored the batch.
        """
        for out in result.outputs:
            slot = self._slot(out)
            if slot is None or slot.loaded is None:
                continue
            r = out.result
            self._metrics.count_versions(slot.name, r.scored, r.model_version)
            watch = self._drift.get(slot.name)
            if watch is not None:  # a rollout's merged batch has no features: not observed
                watch.observe(slot.loaded.scorer.manifest, r.features, r.values)

    def tick(self) -> None:
        """Between batches: drift exported on time (a time window slides without traffic)."""
        for watch in self._drift.values():
            watch.tick()

    def swap(self) -> bool:
        """Between batches: swap in each slot's ready version or split; True if any changed."""
        changed = False
        for slot in self._slots:
            old = slot.loaded
            new = slot.swap()
            if new is None:
                continue
            changed = True
            if slot is self._main and old is not None:
                self._metrics.model_swapped(old.model_version, new.model_version)
                self._monitor.set_model_version(new.model_version)
            _log_swap(old, new, f" (model {slot.name})" if self._named else "")
        return changed


def _log_swap(old: LoadedModel | None, new: LoadedModel, of: str) -> None:
    """The swap's log line (``of``: which model, under ``models:``)."""
    if (old is None or old.split is None) and new.split is None:
        log.info(
            "model swapped: %s -> %s (version %s); every batch from now on is scored by it%s",
            None if old is None else old.model_version,
            new.model_version,
            new.source_version,
            of,
        )
    else:
        log.info(
            "routing swapped: %s -> %s; every batch from now on is routed by it%s",
            None if old is None else old.describe(),
            new.describe(),
            of,
        )


def _loop(
    cfg: Config,
    source: Source | ShareSource,
    models: Models,
    delivery: Delivery,
    tracker: OffsetTracker,
    metrics: Metrics,
    report: WorkerReport,
    stop: StopFlag,
    *,
    schemas: WriterSchemas | None = None,
    progress: Progress | None = None,
) -> int:
    """The main loop: poll → score → deliver (→ offsets) → swap the model → health.

    Models are swapped only here, between batches: after ``deliver`` returned, the batch's
    transaction has committed (or was rolled back, its records to be consumed again) or its
    outputs are with the producer (at-least-once); a batch is scored by one version per model.

    Returns how many records the last batch had if its delivery was rolled back (0 when the
    last batch was delivered).
    """
    limit = cfg.worker.max_messages
    max_wait = cfg.batch.max_wait_ms / 1000.0
    idle = IdleClock(cfg.worker.idle_timeout_s, max_wait + IDLE_GAP_SLACK_S)
    sizer = BatchSizer(cfg.batch.max_records, cfg.batch.max_processing_s)
    poison = PoisonGuard(
        cfg.dead_letter.max_ratio, cfg.dead_letter.window, cfg.dead_letter.max_consecutive
    )
    rolled_back = 0
    started = time.monotonic()
    while not stop:
        want = sizer.size if not limit else min(sizer.size, limit - report.consumed)
        batch = source.poll_batch(want, max_wait)
        if batch:
            if schemas is not None:  # unknown writer schemas: fetched, waiting out an outage
                schemas.prepare(batch)  # every decoder scoring now learns them
                metrics.registry_waiting.set(0)
            t0 = time.monotonic()
            ticket = tracker.track(batch)
            metrics.records_consumed.inc(len(batch))
            metrics.batch_size.observe(len(batch))
            fresh, spent = source.split(batch)  # share groups: past the delivery limit
            result = models.score(fresh)
            result.dead.extend(spent)
            if poison.enabled:
                dead = {id(d.message) for d in result.dead}
                dead.update(id(d.message) for o in result.outputs for d in o.result.dead)
                poison.observe([id(m) in dead for m in batch])
            t1 = time.perf_counter()
            delivered = delivery.deliver(ticket, result)  # False: rolled back, consumed again
            metrics.observe_stage("produce", time.perf_counter() - t1)
            rolled_back = 0 if delivered else len(batch)
            if delivered:
                report.consumed += len(batch)
                report.batches += 1
                if report.batches == 1:
                    metrics.first_batch()
                metrics.observe_latency(result.main.scored.event_ms)
                if progress is None:
                    metrics.count_unseen(result.unseen)
                else:
                    progress.unseen(result.unseen, result.main.model_version)
                models.delivered(result)  # per model: versions counted, drift observed
            metrics.batch_limit.set(sizer.observe(len(batch), time.monotonic() - t0))
        if models.swap() and schemas is not None:
            schemas.follow(*models.columns())  # the writer schemas fetched so far
        if progress is not None:
            progress.tick(models.model_version)
        models.tick()
        delivery.service()
        source.raise_errors()
        metrics.in_flight.set(tracker.pending)
        metrics.paused.set(delivery.paused)
        metrics.last_progress.set(time.time())
        if limit and report.consumed >= limit:
            stop.set("max_messages")
        elif idle.limit_s and idle.observe(
            time.monotonic(),
            records=len(batch),
            rebalances=source.rebalances,
            joined=source.joined,
            settled=source.group_settled,
            at_end=not batch and source.fetched_to_end(),
            in_flight=tracker.pending,
            rolled_back=rolled_back,
        ):
            stop.set("idle_timeout")
    report.stopped_by = stop.reason
    report.elapsed_s = time.monotonic() - started
    return rolled_back
