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

import contextlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

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
from stream_scorer.registry import RegistryClient, SchemaKey
from stream_scorer.retry import retrying
from stream_scorer.stages.decode import Decoder, load_schema
from stream_scorer.stages.framing import frame_of
from stream_scorer.stages.records import DeadLetter, Decoded, Message, Reason, Stage
from stream_scorer.worker.flow import StopFlag
from stream_scorer.worker.sink import SinkContext, dead_letter

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

    def add(self, msg: Message) -> None:
        if not self.records:
            self.started = time.monotonic()
        self.records[(msg.topic() or "", msg.partition() or 0)].append(msg)

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
    """Predictions from record values: plain Avro, or Confluent frames (the decode stage's)."""

    def __init__(self, cfg: Config) -> None:
        """Decode with ``output.schema``, framed when ``output.format`` is ``confluent``.

        Under ``models:``: the first entry's output (the stored topics share one table).
        """
        output = cfg.first.output
        self.schema = load_schema(output.schema)
        self._max = cfg.input.max_message_bytes
        self._framed = output.format == "confluent"
        self._plain = Decoder(self.schema, self._max)
        self._registry = RegistryClient.from_config(cfg.registry) if self._framed else None
        self._by_key: dict[tuple[SchemaKey, int], Decoder | None] = {}

    def _framed_decoder(self, key: SchemaKey, skip: int) -> Decoder | None:
        if (key, skip) not in self._by_key:
            import json

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


class PredictionStore:
    """One member of the sink's consumer group (see the module docstring)."""

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
        self._fields = [c.name for c in self.columns[: -len(pg.COORDINATES)]]
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
        )

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
            return self._retrying(what)(attempt)
        except DatabaseError as exc:
            raise DatabaseError(
                f"{what}: PostgreSQL did not answer for store.unavailable_timeout_s "
                f"({self.store.unavailable_timeout_s:g} s): {exc}"
            ) from exc

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
            for p in partitions:  # what is held of them is the next owner's to store
                self._batch.drop((p.topic, p.partition))
                self._expected.pop((p.topic, p.partition), None)
        except BaseException as exc:
            self._callback_error = exc
        if self._incremental:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    # -- a batch ---------------------------------------------------------------------------

    def _row(self, good: Decoded) -> tuple[Any, ...]:
        msg, record = good.message, good.record
        values = [record.get(name) for name in self._fields]
        return (*values, msg.topic(), msg.partition(), msg.offset())

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

    def _write(self, conn: psycopg.Connection, rows_of: dict[TP, list[tuple[Any, ...]]],
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
            rows = [row for tp in ends for row in rows_of.get(tp, [])]
            try:
                with conn.transaction():  # a savepoint: a repeated key retries below
                    pg.copy_rows(cur, self.store.table, self.columns, rows)
                stored, duplicates = len(rows), 0
            except psycopg.errors.UniqueViolation:
                stored = pg.insert_new_rows(cur, self.store.table, self.columns, rows)
                duplicates = len(rows) - stored
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
        rows_of: dict[TP, list[tuple[Any, ...]]] = {}
        dead: list[DeadLetter] = []
        ends: dict[TP, int] = {}
        for tp, msgs in self._batch.records.items():
            rows = rows_of.setdefault(tp, [])
            for msg in msgs:
                out = self.decoder.decode(msg)
                if isinstance(out, Decoded):
                    rows.append(self._row(out))
                else:
                    dead.append(out)
            ends[tp] = (msgs[-1].offset() or 0) + 1
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
                        rows_of[tp] = [r for r in rows_of.get(tp, []) if r[-1] >= first]
                if not ends:
                    return 0, 0, []
            return self._write(conn, rows_of, ends)

        stored, duplicates, fenced = self._call("store a batch", attempt)
        for tp in fenced:  # another member moved them: drop, re-read from the stored offset
            self.report.fenced += 1
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
        self.report.stored += stored
        self.report.duplicates += duplicates
        if duplicates:
            log.info("%d predictions already stored (same event id and model version)", duplicates)
        self._signal_lag(ends)

    def store_now(self, messages: Sequence[Message]) -> None:
        """Store ``messages`` (prediction records) at once, as one batch of the loop would be.

        For tools and the benchmark, without a consumer: the offsets table is advanced from
        where this member last stored each partition.
        """
        for msg in messages:
            self._batch.add(msg)
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
            BrokerError: Kafka failed (a dead letter unacknowledged, a fatal consumer error).
        """
        self.prepare()
        topics = list(self.cfg.stored_topics())
        self._producer = Producer(self._producer_settings)
        consumer = Consumer(self._consumer_settings)
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
                for msg in msgs:
                    err = msg.error()
                    if err is None:
                        self._batch.add(msg)
                    elif err.code() != KafkaError._PARTITION_EOF and err.fatal():
                        raise BrokerError(f"consumer: {err}")
                if msgs:
                    idle_since = time.monotonic()
                held = len(self._batch)
                if held >= self.store.max_records or (
                    held and time.monotonic() - self._batch.started >= self.store.max_wait_s
                ):
                    self.flush()
                elif (
                    not held
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
