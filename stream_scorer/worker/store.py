"""``stream-scorer sink postgres``: the prediction topics stored in PostgreSQL, exactly once.

A consumer group (``store.group_id``) reads the prediction topics; each member decodes the
predictions with the decode stage (``stages.decode.Decoder``: plain Avro, or the Confluent frame
of ``output.format: confluent`` read with its writer schema from the registry), and writes each
batch in one database transaction: the rows, by binary ``COPY``, and the next offset of every
partition in the batch (``postgres.OffsetsTable``). The offsets live in the database, not in
Kafka: a member that is assigned a partition seeks to the offset stored for it (the
consumer's "offsets stored outside Kafka" pattern), so a batch is stored once whatever crashes
when: the transaction holds both or neither. The offsets are also committed to Kafka after each
transaction, only so that lag tools (``stream-scorer lag``, Kafka's own) see the group's progress;
nothing reads them back.

Every offset write is guarded by the offset the member read (``OffsetsTable.advance``): a member
that lost a partition in a rebalance and still writes a batch of it finds the stored offset
moved, rolls back and drops what it holds of that partition. The primary key (event id, model
version) makes any other duplicate visible: a prediction topic written at-least-once can hold a
prediction twice; such a batch is stored through a staging table keeping the first of each key
(the ``duplicates`` count of the report).

A record that does not decode as a prediction goes to ``store.dead_letter_topic`` with its
original bytes and reason (``worker.sink.dead_letter``, the worker's own letters), acknowledged
by the broker before the batch's transaction commits (at-least-once: a crash in between writes
a letter twice). A database that does not answer is asked again with the retry policy
(``retry``) until ``store.unavailable_timeout_s``, then the sink exits 1; a refused credential is
a configuration error (exit 2).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    Producer,
    TopicPartition,
)

from stream_scorer import postgres as pg
from stream_scorer.config import Config, consumer_settings, producer_settings
from stream_scorer.config.sections import StoreConfig
from stream_scorer.errors import BrokerError, ConfigError, DatabaseError, DeliveryError
from stream_scorer.fast.read import PredictionReader, build_prediction_reader
from stream_scorer.logs import client_logger
from stream_scorer.registry import RegistryClient, SchemaKey
from stream_scorer.retry import retrying
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.framing import frame_of
from stream_scorer.stages.records import DeadLetter, Decoded, Message, Reason, Stage
from stream_scorer.worker.flow import StopFlag
from stream_scorer.worker.health import Monitor
from stream_scorer.worker.lag import LagTracker
from stream_scorer.worker.metrics import StoreMetrics
from stream_scorer.worker.sink import SinkContext, dead_letter
from stream_scorer.worker.source import ConsumerErrors

log = logging.getLogger(__name__)

#: A topic partition, as the database stores it.
TP = tuple[str, int]


@dataclass
class StoreReport:
    """What one sink member did (printed as JSON when it stops).

    Attributes:
        stored: rows written.
        dead_letters: records sent to ``store.dead_letter_topic``.
        duplicates: predictions whose (event id, model version) was already stored (kept once).
        batches: transactions committed.
        fenced: batches (partitions) dropped because another member had moved their offsets.
        stop_reason: why it stopped.
    """

    stored: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    batches: int = 0
    fenced: int = 0
    stop_reason: str = ""


@dataclass
class _Batch:
    """The records consumed and not yet stored, per partition in offset order."""

    records: dict[TP, list[Message]] = field(default_factory=lambda: defaultdict(list))
    started: float = 0.0

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())

    def extend(self, msgs: Sequence[Message]) -> None:
        """Add consumed records, in consume order."""
        records = self.records
        if msgs and not records:
            self.started = time.monotonic()
        for msg in msgs:
            records[(msg.topic() or "", msg.partition() or 0)].append(msg)

    def drop(self, tp: TP, below: int | None = None) -> None:
        """Forget ``tp``'s records (only those below offset ``below`` when given)."""
        if below is None:
            self.records.pop(tp, None)
            return
        kept = [m for m in self.records.get(tp, []) if (m.offset() or 0) >= below]
        if kept:
            self.records[tp] = kept
        else:
            self.records.pop(tp, None)


@dataclass
class _Tuples:
    """One partition's rows as binary COPY tuples (the compiled reader's), in offset order."""

    data: bytes
    ends: list[int]
    offsets: list[int]

    def __len__(self) -> int:
        return len(self.ends)

    def since(self, first: int) -> _Tuples:
        """The rows at offset ``first`` and after."""
        k = bisect.bisect_left(self.offsets, first)
        if k == 0:
            return self
        cut = self.ends[k - 1]
        return _Tuples(self.data[cut:], [e - cut for e in self.ends[k:]], self.offsets[k:])


#: One partition's rows: tuples of values (the generic decoder's), or COPY tuples.
PartRows = list[tuple[Any, ...]] | _Tuples


def _since(rows: PartRows, first: int) -> PartRows:
    """The rows of ``rows`` at offset ``first`` and after (a value row's offset is its last)."""
    if isinstance(rows, _Tuples):
        return rows.since(first)
    return [r for r in rows if r[-1] >= first]


def _joined(parts: Sequence[PartRows]) -> pg.Rows:
    """Partitions' rows as one ``COPY``'s."""
    tuples = [p for p in parts if isinstance(p, _Tuples)]
    if tuples:
        assert len(tuples) == len(parts), "one decoder per sink: never both kinds of rows"
        return pg.BinaryTuples(b"".join(p.data for p in tuples), sum(map(len, tuples)))
    return [row for p in parts for row in p]  # type: ignore[union-attr]


def _count(rows: pg.Rows) -> int:
    return rows.count if isinstance(rows, pg.BinaryTuples) else len(rows)  # type: ignore[arg-type]


def store_config(cfg: Config) -> StoreConfig:
    """``cfg.store``, which ``sink postgres`` needs (its ``dsn`` at least).

    Raises:
        ConfigError: the configuration has no ``store.dsn`` (the other required keys are
            checked with it, when the configuration is loaded).
    """
    if not cfg.store.dsn:
        raise ConfigError("store.dsn", "is required by sink postgres (docs/manual/storing.md)")
    return cfg.store


def read_password(store: StoreConfig) -> str | None:
    """The password in ``store.password_file`` (a trailing newline dropped), or None.

    Raises:
        ConfigError: the file cannot be read (never its content).
    """
    if store.password_file is None:
        return None
    try:
        return store.password_file.read_text().rstrip("\n")
    except OSError as exc:
        raise ConfigError("store.password_file", f"cannot read it: {exc.strerror}") from None


class PredictionDecoder:
    """Predictions from record values: plain Avro, or Confluent frames (the decode stage's).

    Plain records of the v1 prediction schema are read a batch at a time by the compiled
    reader (``fast.read``, proved against the decode stage at start-up) straight into binary
    COPY tuples; any other schema, and framed records, by the decode stage, record by record.
    """

    def __init__(self, cfg: Config) -> None:
        """Decode with ``output.schema``, framed when ``output.format`` is ``confluent``.

        Under ``models:``: the first entry's output (the stored topics share one table).

        Raises:
            SchemaError: the compiled reader disagrees with the decode stage on a probe.
        """
        output = cfg.first.output
        self.schema = load_schema(output.schema)
        self._max = cfg.input.max_message_bytes
        self._framed = output.format == "confluent"
        self._plain = Decoder(self.schema, self._max)
        self._registry = RegistryClient.from_config(cfg.registry) if self._framed else None
        self._by_key: dict[tuple[SchemaKey, int], Decoder | None] = {}
        self._fields = [c.name for c in pg.table_columns(self.schema)[: -len(pg.COORDINATES)]]
        #: the compiled reader, when the records are plain v1 predictions
        self.fast: PredictionReader | None = (
            None if self._framed else build_prediction_reader(self.schema, self._max)
        )

    def rows(self, records: dict[TP, list[Message]]) -> tuple[dict[TP, PartRows], list[DeadLetter]]:
        """Each partition's rows, and the dead letters of the records that are not predictions.

        A row is the record's fields, then its coordinates; the dead letters are in order.
        """
        if self.fast is not None:
            return self._fast_rows(self.fast, records)
        rows_of: dict[TP, PartRows] = {}
        dead: list[DeadLetter] = []
        for tp, msgs in records.items():
            rows: list[tuple[Any, ...]] = []
            for msg in msgs:
                out = self.decode(msg)
                if isinstance(out, Decoded):
                    record = out.record
                    rows.append((*(record.get(n) for n in self._fields), *tp, msg.offset()))
                else:
                    dead.append(out)
            rows_of[tp] = rows
        return rows_of, dead

    @staticmethod
    def _fast_rows(
        reader: PredictionReader, records: dict[TP, list[Message]]
    ) -> tuple[dict[TP, PartRows], list[DeadLetter]]:
        messages = [m for msgs in records.values() for m in msgs]
        cols = reader.read(messages)
        topics = sorted({t for t, _ in records})
        index = {t: i for i, t in enumerate(topics)}
        coordinates = np.empty((len(messages), 3), dtype=np.int64)
        bounds = [0]
        for (topic, partition), msgs in records.items():
            a, b = bounds[-1], bounds[-1] + len(msgs)
            coordinates[a:b, 0] = index[topic]
            coordinates[a:b, 1] = partition
            coordinates[a:b, 2] = [m.offset() or 0 for m in msgs]
            bounds.append(b)
        good = cols.good
        data, ends = reader.copy_tuples(cols, topics, coordinates, good)
        cuts = np.searchsorted(good, bounds).tolist()  # each partition's first good row
        all_ends = [0, *ends.tolist()]
        offsets = coordinates[good, 2].tolist()
        rows_of: dict[TP, PartRows] = {}
        for k, tp in enumerate(records):
            a, b = cuts[k], cuts[k + 1]
            start = all_ends[a]
            rows_of[tp] = _Tuples(
                data[start : all_ends[b]], [e - start for e in all_ends[a + 1 : b + 1]],
                offsets[a:b],
            )  # fmt: skip
        return rows_of, reader.dead_letters(cols)

    def _framed_decoder(self, key: SchemaKey, skip: int) -> Decoder | None:
        if (key, skip) not in self._by_key:
            import fastavro

            assert self._registry is not None
            text = self._registry.writer_schema(key)
            parsed: Any = None if text is None else fastavro.parse_schema(json.loads(text))
            self._by_key[(key, skip)] = (
                None
                if parsed is None
                else Decoder(dict(parsed), self._max, reader=self.schema, skip=skip, hints=False)
            )
        return self._by_key[(key, skip)]

    def decode(self, msg: Message) -> Decoded | DeadLetter:
        """One record's prediction, or its dead letter."""
        if not self._framed:
            return self._plain.decode(msg)
        frame = frame_of(msg)
        if isinstance(frame, Reason):
            return DeadLetter(msg, Stage.DECODE, frame, "stream_scorer", f"no frame: {frame}")
        decoder = self._framed_decoder(*frame)
        if decoder is None:
            return DeadLetter(
                msg, Stage.DECODE, Reason.UNKNOWN_SCHEMA_ID, "stream_scorer",
                f"the registry has no schema {frame[0]}",
            )  # fmt: skip
        return decoder.decode(msg)


class PredictionStore(ConsumerErrors):
    """One member of the sink's consumer group (see the module docstring).

    Observed as a worker is (``worker.health.Monitor`` on ``metrics.port``): ``/metrics``
    (``StoreMetrics`` and the consumer lag), ``/healthz`` and ``/readyz`` (the broker, the
    assignment, no stalled partition, and the database). No broker answering for
    ``kafka.unreachable_timeout_s`` stops it (``BrokerError``, exit 1), as it stops a worker.
    """

    def __init__(
        self,
        cfg: Config,
        stop: StopFlag,
        *,
        member_id: str = "",
        idle_timeout_s: float | None = None,
        connect: Callable[[], psycopg.Connection] | None = None,
    ) -> None:
        """Prepare the member: decoder, columns, clients (nothing connects yet).

        Args:
            cfg: the configuration (``store`` required).
            stop: set by a signal: the member stores what it holds and stops.
            member_id: its id (client id, dead-letter headers); default host-pid.
            idle_timeout_s: stop after this many seconds with nothing consumed (None: never).
            connect: opens a database connection (default: ``store.dsn``); tests pass theirs.
        """
        self.cfg = cfg
        self.store = store_config(cfg)
        self.stop = stop
        self.member_id = member_id or f"{socket.gethostname()}-{os.getpid()}"
        self.idle_timeout_s = idle_timeout_s
        self.decoder = PredictionDecoder(cfg)
        self.columns = pg.table_columns(self.decoder.schema)
        self.offsets = pg.OffsetsTable(self.store.offsets_table, self.store.group_id)
        password = read_password(self.store)
        self._connect = connect or (lambda: pg.connect(self.store.dsn, password))
        self._conn: psycopg.Connection | None = None
        self._policy = cfg.retry.policy()
        self.report = StoreReport()
        self._expected: dict[TP, int | None] = {}  # per assigned partition: the stored offset
        self._batch = _Batch()
        self._callback_error: BaseException | None = None
        settings = consumer_settings(cfg, self.member_id)
        settings.update({"group.id": self.store.group_id, "enable.auto.commit": "false"})
        self._incremental = settings.get("partition.assignment.strategy") in (
            None,
            "cooperative-sticky",
        )
        self._consumer_settings = settings
        # what ConsumerErrors (the error callback) and the Monitor (SourceView) read
        self._settings = settings
        self._topic = ", ".join(cfg.stored_topics())
        self._errors: list[BrokerError] = []
        self._down_since: float | None = None
        self._broker_seen = False
        self._unreachable_timeout = cfg.kafka.unreachable_timeout_s
        self._client_log = client_logger("consumer")
        self.lag = LagTracker()
        self.joined = False
        self.backlog = None
        self.metrics = StoreMetrics()
        self._monitor: Monitor | None = None
        self._ctx = SinkContext(
            output_topic=self.store.dead_letter_topic,
            dead_letter_topic=self.store.dead_letter_topic,
            group_id=self.store.group_id,
            worker_id=self.member_id,
            model_version="",
        )
        self._producer_settings = producer_settings(cfg, self.member_id)
        self._producer_settings.pop("transactional.id", None)
        self._producer_settings.pop("transaction.timeout.ms", None)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None

    # -- the database -------------------------------------------------------------------

    def _retrying(self, what: str) -> Any:
        return retrying(
            self.store.unavailable_timeout_s,
            what,
            server="PostgreSQL",
            policy=self._policy,
            outage=pg.is_outage,  # a stop signal waits: it never drops a held batch
            keepalive=self._retried,
        )

    def _retried(self) -> None:
        """Before asking the database again: count it, and say it is not ready meanwhile."""
        self.metrics.database_retries.inc()
        self.metrics.last_progress.set(time.time())  # retrying is progress: alive, not ready
        if self._monitor is not None:
            self._monitor.check("database_reachable", False)

    # -- what the monitor reads (worker.health.SourceView) ---------------------------------

    @property
    def broker_reachable(self) -> bool:
        """A broker has answered since start and not every broker is down now."""
        return self._broker_seen and self._down_since is None

    @property
    def assignment(self) -> set[TP]:
        """The partitions assigned."""
        return set(self._expected)

    def _on_stats(self, stats_json: str) -> None:
        try:
            stats = json.loads(stats_json)
            self.lag.update_from_stats(stats, self.assignment)
            self._saw_brokers(stats)
        except Exception as exc:  # statistics are advisory; a callback never raises
            log.warning("cannot parse librdkafka statistics: %s", exc)

    def _db(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _reset(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _call(self, what: str, fn: Callable[[psycopg.Connection], Any]) -> Any:
        """``fn(connection)`` asked again on outages (a fresh connection each try)."""

        def attempt() -> Any:
            try:
                return fn(self._db())
            except psycopg.Error as exc:
                self._reset()
                if pg.refused(exc):
                    raise ConfigError("store.dsn", f"PostgreSQL refused: {exc}") from exc
                if pg.is_outage(exc):
                    raise DatabaseError(f"{what}: {exc}") from exc
                raise

        try:
            out = self._retrying(what)(attempt)
        except DatabaseError as exc:
            raise DatabaseError(
                f"{what}: PostgreSQL did not answer for store.unavailable_timeout_s "
                f"({self.store.unavailable_timeout_s:g} s): {exc}"
            ) from exc
        if self._monitor is not None:
            self._monitor.check("database_reachable", True)
        return out

    def prepare(self) -> list[str]:
        """Create or migrate the prediction table and the offsets table; return added columns."""

        def run(conn: psycopg.Connection) -> list[str]:
            added = pg.migrate(conn, self.store.table, self.columns)
            self.offsets.create(conn)
            return added

        added: list[str] = self._call("create the tables", run)
        if added:
            log.info("table %s: added columns %s", self.store.table, ", ".join(added))
        return added

    # -- the consumer's rebalance callbacks (they record; the loop raises) ----------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            tps = [(p.topic, p.partition) for p in partitions]
            stored = self._call("read the stored offsets", lambda c: self._read(c, tps))
            start = (
                OFFSET_BEGINNING if self.cfg.input.auto_offset_reset == "earliest" else OFFSET_END
            )
            self.joined = self._broker_seen = True
            for p in partitions:
                offset = stored.get((p.topic, p.partition))
                self._expected[(p.topic, p.partition)] = offset
                p.offset = start if offset is None else offset
            log.info(
                "assigned %s",
                ", ".join(f"{p.topic}[{p.partition}]@{stored.get((p.topic, p.partition), 'start')}"
                          for p in partitions),
            )  # fmt: skip
        except BaseException as exc:  # a callback never raises: the loop does
            self._callback_error = exc
            partitions = []
        if self._incremental:
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)

    def _read(self, conn: psycopg.Connection, tps: Sequence[TP]) -> dict[TP, int]:
        stored = self.offsets.read(conn, tps)
        conn.rollback()  # a read-only transaction: end it
        return stored

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:
            tps = [(p.topic, p.partition) for p in partitions]
            for tp in tps:  # what is held of them is the next owner's to store
                self._batch.drop(tp)
                self._expected.pop(tp, None)
            self.lag.forget(tps)
            self.metrics.forget_partitions(tps)
        except BaseException as exc:
            self._callback_error = exc
        if self._incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    # -- a batch ---------------------------------------------------------------------------

    def _dead_letters(self, dead: list[DeadLetter]) -> None:
        """Produce ``dead`` and wait for the broker's acknowledgements (before the commit)."""
        if not dead:
            return
        assert self._producer is not None
        failures: list[str] = []

        def done(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(str(err))

        for dl in dead:
            key, value, headers, _stripped = dead_letter(dl, self._ctx)
            self._producer.produce(
                self.store.dead_letter_topic, value, key, headers=list(headers), on_delivery=done
            )
        left = self._producer.flush(self.cfg.kafka.unreachable_timeout_s)
        if failures or left:
            raise DeliveryError(
                f"dead letters to {self.store.dead_letter_topic} not acknowledged: "
                f"{failures[:1] or [f'{left} left after flush']}"
            )
        self.report.dead_letters += len(dead)
        for dl in dead:
            self.metrics.dead_letters.labels(dl.stage, dl.reason).inc()

    def _write(self, conn: psycopg.Connection, rows_of: dict[TP, PartRows],
               ends: dict[TP, int]) -> tuple[int, int, list[TP]]:  # fmt: skip
        """One transaction: the offsets advanced, then the rows; (stored, duplicates, fenced)."""
        fenced: list[TP] = []
        with conn.cursor() as cur:
            for tp, end in ends.items():
                if not self.offsets.advance(cur, tp, self._expected.get(tp), end):
                    fenced.append(tp)
            if fenced:
                conn.rollback()
                return 0, 0, fenced
            rows = _joined([rows_of[tp] for tp in ends if tp in rows_of])
            try:
                with conn.transaction():  # a savepoint: a repeated key retries below
                    pg.copy_rows(cur, self.store.table, self.columns, rows)
                stored, duplicates = _count(rows), 0
            except psycopg.errors.UniqueViolation:
                stored = pg.insert_new_rows(cur, self.store.table, self.columns, rows)
                duplicates = _count(rows) - stored
        conn.commit()
        return stored, duplicates, []

    def _resync(self, conn: psycopg.Connection, tps: Sequence[TP]) -> dict[TP, int]:
        """After a failed try: the stored offsets, what is held below them dropped."""
        stored = self._read(conn, tps)
        for tp in tps:
            if tp in stored and stored[tp] != self._expected.get(tp):
                self._batch.drop(tp, below=stored[tp])  # our commit landed before the failure
                self._expected[tp] = stored[tp]
        return stored

    def flush(self) -> None:
        """Store the batch held: dead letters first, then one transaction; Kafka told after."""
        if not len(self._batch):
            return
        rows_of, dead = self.decoder.rows(self._batch.records)
        ends = {tp: (msgs[-1].offset() or 0) + 1 for tp, msgs in self._batch.records.items()}
        self._dead_letters(dead)
        tries = 0

        def attempt(conn: psycopg.Connection) -> tuple[int, int, list[TP]]:
            nonlocal tries
            tries += 1
            if tries > 1:  # the last try may have committed before its connection failed
                self._resync(conn, list(ends))
                held = {tp: ms for tp, ms in self._batch.records.items()}
                for tp in list(ends):
                    if tp not in held:
                        ends.pop(tp)
                        rows_of.pop(tp, None)
                    else:
                        first = held[tp][0].offset() or 0
                        rows_of[tp] = _since(rows_of.get(tp, []), first)
                if not ends:
                    return 0, 0, []
            return self._write(conn, rows_of, ends)

        stored, duplicates, fenced = self._call("store a batch", attempt)
        for tp in fenced:  # another member moved them: drop, re-read from the stored offset
            self.report.fenced += 1
            self.metrics.fenced.inc()
            log.warning("%s[%d]: its stored offset moved (another member): batch dropped", *tp)
            self._batch.drop(tp)
            ends.pop(tp, None)
            self._reseek(tp)
        if fenced and ends:  # the others of the batch: store them without the fenced ones
            self.flush()
            return
        for tp, end in ends.items():
            self._expected[tp] = end
        self._batch = _Batch()
        if ends:
            self.report.batches += 1
            self.metrics.batches.inc()
        self.report.stored += stored
        self.report.duplicates += duplicates
        self.metrics.rows_stored.inc(stored)
        self.metrics.duplicates.inc(duplicates)
        if duplicates:
            log.info("%d predictions already stored (same event id and model version)", duplicates)
        self._signal_lag(ends)

    def store_now(self, messages: Sequence[Message]) -> None:
        """Store ``messages`` (prediction records) at once, as one batch of the loop would be.

        For tools and the benchmark, without a consumer: the offsets table is advanced from
        where this member last stored each partition.
        """
        self._batch.extend(messages)
        self.flush()

    def _reseek(self, tp: TP) -> None:
        if self._consumer is None or tp not in self._expected:
            return
        stored = self._call("read the stored offsets", lambda c: self._read(c, [tp]))
        self._expected[tp] = stored.get(tp)
        if tp in stored:
            self._consumer.seek(TopicPartition(tp[0], tp[1], stored[tp]))

    def _signal_lag(self, ends: dict[TP, int]) -> None:
        """Commit the stored offsets to Kafka too: only a lag signal, never read back."""
        for (topic, partition), end in ends.items():
            self.lag.committed(topic, partition, end)
        if not ends or self._consumer is None:
            return
        try:
            self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in ends.items()], asynchronous=True
            )
        except Exception as exc:  # a lag signal: never a reason to stop
            log.debug("lag signal commit failed: %s", exc)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> StoreReport:
        """Consume and store until stopped (or idle); return the report.

        Raises:
            ConfigError: the database refused the credentials (exit 2).
            DatabaseError: the database did not answer for ``store.unavailable_timeout_s``.
            BrokerError: Kafka failed (a dead letter unacknowledged, a fatal consumer error, no
                broker reachable for ``kafka.unreachable_timeout_s``).
        """
        with Monitor(self.cfg, self.metrics, None) as monitor:
            self._monitor = monitor
            monitor.watch(self)
            monitor.check("database_reachable", False)
            try:
                return self._run()
            finally:
                self._monitor = None

    @property
    def port(self) -> int | None:
        """The port of the metrics and health endpoints while running (None: none or stopped)."""
        return None if self._monitor is None else self._monitor.port

    def _run(self) -> StoreReport:
        self.prepare()
        topics = list(self.cfg.stored_topics())
        self._producer = Producer({**self._producer_settings, "logger": client_logger("producer")})
        settings: dict[str, Any] = dict(self._consumer_settings)
        settings.update(
            error_cb=self._on_error, stats_cb=self._on_stats, logger=self._client_log
        )  # they record; the loop raises (raise_errors)
        consumer = Consumer(settings)
        self._consumer = consumer
        consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke
        )
        log.info("storing %s into %s (group %s)", ", ".join(topics), self.store.table,
                 self.store.group_id)  # fmt: skip
        idle_since = time.monotonic()
        try:
            while not self.stop:
                msgs: list[Any] = consumer.consume(self.store.max_records, timeout=0.2)
                if self._callback_error is not None:
                    raise self._callback_error
                self.raise_errors()  # a fatal or refused connection, or no broker for too long
                self.metrics.last_progress.set(time.time())
                good = [m for m in msgs if m.error() is None]
                if len(good) != len(msgs):
                    for msg in msgs:
                        err = msg.error()
                        if err and err.code() != KafkaError._PARTITION_EOF and err.fatal():
                            raise BrokerError(f"consumer: {err}")
                self._batch.extend(good)
                if good:
                    idle_since = time.monotonic()
                    self.lag.consumed(good)
                    self._broker_seen, self._down_since = True, None
                held = len(self._batch)
                if held >= self.store.max_records or (
                    held and time.monotonic() - self._batch.started >= self.store.max_wait_s
                ):
                    self.flush()
                elif (
                    not held
                    and self.broker_reachable  # idle, not cut off: that is raise_errors' to say
                    and self.idle_timeout_s is not None
                    and time.monotonic() - idle_since >= self.idle_timeout_s
                ):
                    self.report.stop_reason = "idle"
                    break
            self.flush()  # a stop signal: store what is held first
            if not self.report.stop_reason:
                self.report.stop_reason = self.stop.reason or "stopped"
        finally:
            consumer.close()
            self._producer.flush(10)
            self._reset()
        return self.report
