"""``stream-scorer score``: stored records in, the stream's predictions and dead letters out.

The same configuration as ``run`` builds the same pipeline (``worker.loop.build_pipeline``:
the input schema checked against the model's features, the model from its source, store alias
or MLflow alias included, the prediction schema), and each batch goes through the stream's own
stages: Avro bytes through its decoder (the compiled path when the schema allows), columns
through ``fast.arrow.ArrowColumns`` (the same policies, ``fast.path.Policies``), and both
through ``Pipeline.predict`` (the model; rows it fails on isolated and dead-lettered). So a
record gets the prediction, or the dead letter with the reason, it gets on the stream.

Predictions are written as Arrow batches with the prediction schema's fields (``input_id``,
``prediction``, ``label``, ``model_version``, ``event_time`` and ``scored_at``, the two times as
UTC millisecond timestamps); dead letters with the record (``value``: its Avro bytes, or
``record``: its row as JSON), where it came from (``source``, ``row``) and why (``stage``,
``reason``: the stream's ``Reason`` codes, ``error_type``, ``error_message``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from stream_scorer.batch.files import (
    AVRO_VALUE,
    BackgroundWriter,
    BatchReader,
    BatchWriter,
    InputBatch,
    expand_inputs,
    open_reader,
    open_writer,
    prefetched,
)
from stream_scorer.config import Config
from stream_scorer.errors import ConfigError, DatabaseError, InputError
from stream_scorer.fast.arrow import ArrowColumns, RowMessage, kept_rows
from stream_scorer.retry import retrying
from stream_scorer.stages.avro_guard import AvroGuard
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.pipeline import Pipeline
from stream_scorer.stages.records import DeadLetter, Message, PlainMessage
from stream_scorer.stages.score import Scorer
from stream_scorer.worker.loop import build_pipeline, model_source, reader_schema
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.refresh import load_model

log = logging.getLogger(__name__)

_MS_UTC = pa.timestamp("ms", tz="UTC")
#: Records per batch unless ``--batch-size`` says otherwise (memory: a batch of each input).
DEFAULT_BATCH_ROWS = 65_536
#: The Arrow schema of the prediction files.
PREDICTION_SCHEMA = pa.schema(
    [
        ("input_id", pa.string()),
        ("prediction", pa.float64()),
        ("label", pa.int32()),
        ("model_version", pa.dictionary(pa.int32(), pa.string())),
        ("event_time", _MS_UTC),
        ("scored_at", _MS_UTC),
    ]
)
#: The Arrow schema of the dead-letter files.
DEAD_LETTER_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("row", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("value", pa.binary()),
        ("record", pa.string()),
    ]
)


@dataclass
class ScoreReport:
    """What ``score`` did; printed as JSON when it ends (as ``run``'s report)."""

    records: int = 0
    predictions: int = 0
    dead_letters: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    elapsed_s: float = 0.0
    model_version: str = ""
    output: str = ""
    dead_letter_output: str = ""


@dataclass
class Scored:
    """A batch's outcome: predictions as an Arrow batch, the dead letters, unseen counts.

    ``rows``: each prediction's row in the input batch.
    """

    predictions: pa.RecordBatch
    dead: list[DeadLetter]
    unseen: dict[str, int]
    rows: npt.NDArray[np.int64]


class _FileRecord(PlainMessage):
    """An Avro record read from a file, as the stream's decoder reads a message."""


def prediction_batch(
    ids: pa.Array,
    values: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64] | None,
    version: str,
    event_ms: npt.NDArray[np.int64],
    scored_at_ms: int,
) -> pa.RecordBatch:
    """The predictions as an Arrow batch of ``PREDICTION_SCHEMA``."""
    n = len(values)
    label = (
        pa.nulls(n, pa.int32()) if labels is None else pa.array(labels.astype(np.int32), pa.int32())
    )
    version_column = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(n, dtype=np.int32)), pa.array([version], pa.string())
    )
    return pa.RecordBatch.from_arrays(
        [
            ids,
            pa.array(values, pa.float64()),
            label,
            version_column,
            pa.array(event_ms, pa.int64()).cast(_MS_UTC),
            pa.array(np.full(n, scored_at_ms, dtype=np.int64)).cast(_MS_UTC),
        ],
        schema=PREDICTION_SCHEMA,
    )


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def dead_letter_batch(dead: Sequence[DeadLetter], item: InputBatch) -> pa.RecordBatch:
    """``item``'s dead letters as an Arrow batch of ``DEAD_LETTER_SCHEMA``."""
    values: list[bytes | None] = []
    records: list[str | None] = []
    if item.avro:
        values = [d.message.value() for d in dead]
        records = [None] * len(dead)
    else:
        index = pa.array([_row_index(d.message) for d in dead], pa.int64())
        rows = item.batch.take(index).to_pylist()
        records = [json.dumps(r, default=_json_default, allow_nan=True) for r in rows]
        values = [None] * len(dead)
    return pa.RecordBatch.from_arrays(
        [
            pa.array([item.source] * len(dead), pa.string()),
            pa.array([int(d.message.offset() or 0) for d in dead], pa.int64()),
            pa.array([d.stage.value for d in dead], pa.string()),
            pa.array([d.reason.value for d in dead], pa.string()),
            pa.array([d.error_type for d in dead], pa.string()),
            pa.array([d.error_message for d in dead], pa.string()),
            pa.array(values, pa.binary()),
            pa.array(records, pa.string()),
        ],
        schema=DEAD_LETTER_SCHEMA,
    )


def _row_index(msg: Message) -> int:
    if isinstance(msg, RowMessage):
        return msg.index
    raise TypeError(f"not a row of a columnar batch: {msg!r}")  # pragma: no cover


class BatchScorer:
    """The stream's pipeline over stored batches (see the module docstring)."""

    def __init__(
        self,
        pipeline: Pipeline,
        scorer: Scorer,
        schema: Mapping[str, Any],
        *,
        id_field: str,
        event_time_field: str,
        clock: Callable[[], float] = time.time,
        model_dir: Path | None = None,
    ) -> None:
        """Score with ``pipeline`` (built by ``build_pipeline`` for ``scorer``).

        Args:
            pipeline: decodes Avro bytes, and predicts.
            scorer: its model.
            schema: the parsed input schema.
            id_field: ``input.id_field``.
            event_time_field: ``input.event_time_field``.
            clock: the wall clock (``scored_at``).
            model_dir: where the model's files are (``spark.ship`` copies them).
        """
        self.pipeline = pipeline
        self.scorer = scorer
        self.schema = schema
        self.arrow = ArrowColumns(
            schema,
            scorer.manifest.features,
            id_field=id_field,
            event_time_field=event_time_field,
        )
        self._clock = clock
        self.model_dir = model_dir

    @property
    def model_version(self) -> str:
        """The model's version (every prediction carries it)."""
        return self.scorer.model_version

    def score(self, item: InputBatch) -> Scored:
        """Score one batch: its predictions (input order) and its dead letters."""
        now_ms = int(self._clock() * 1000)
        if item.avro:
            return self._score_avro(item, now_ms)
        built = self.arrow.run(item.batch, item.source, item.first_row)
        dead = built.dead
        rows, values, labels = self.pipeline.predict(kept_rows(built), built.matrix, dead)
        ids = built.ids
        event_ms = built.event_ms
        if len(rows) != len(built.keep):
            ids = ids.take(pa.array(rows, pa.int64()))
            event_ms = event_ms[rows]
        batch = prediction_batch(ids, values, labels, self.model_version, event_ms, now_ms)
        return Scored(batch, dead, built.unseen, built.keep[rows])

    def _score_avro(self, item: InputBatch, now_ms: int) -> Scored:
        values = item.batch.column(AVRO_VALUE).to_pylist()
        messages = [
            _FileRecord(v, None, item.source, 0, item.first_row + i) for i, v in enumerate(values)
        ]
        cols = self.pipeline.columns.run(messages)
        rows, predicted, labels = self.pipeline.predict(cols.messages, cols.matrix, cols.dead)
        picked = rows.tolist()
        ids = [cols.ids[i] for i in picked]
        texts = [i if type(i) is str else ("" if i is None else str(i)) for i in ids]
        times = np.array([cols.event_ms[i] or 0 for i in picked], dtype=np.int64)
        batch = prediction_batch(
            pa.array(texts, pa.string()), predicted, labels, self.model_version, times, now_ms
        )
        positions = [int(cols.messages[i].offset() or 0) - item.first_row for i in picked]
        return Scored(batch, cols.dead, cols.unseen, np.array(positions, dtype=np.int64))


class ProgressLine:
    """A progress line on a terminal (records, rate, ETA), redrawn at most twice a second."""

    def __init__(self, total: int | None, stream: TextIO | None = None) -> None:
        """``total``: the records expected (None: unknown, no ETA)."""
        self._stream = stream if stream is not None else sys.stderr
        self._on = self._stream.isatty()
        self._total = total
        self._started = time.monotonic()
        self._shown = 0.0

    def update(self, records: int, *, final: bool = False) -> None:
        """Show ``records`` done (nothing when not on a terminal)."""
        if not self._on:
            return
        now = time.monotonic()
        if not final and now - self._shown < 0.5:
            return
        self._shown = now
        self._stream.write("\r" + progress_text(records, now - self._started, self._total))
        if final:
            self._stream.write("\n")
        self._stream.flush()


def progress_text(records: int, seconds: float, total: int | None) -> str:
    """``1,200,000 / 10,000,000 records  412,000/s  ETA 21 s`` (no total: no ETA)."""
    rate = records / seconds if seconds > 0 else 0.0
    done = f"{records:,}" if total is None else f"{records:,} / {total:,}"
    text = f"{done} records  {rate:,.0f}/s"
    if total is not None and rate > 0:
        text += f"  ETA {math.ceil(max(total - records, 0) / rate)} s"
    return text


def _input_schema(cfg: Config) -> dict[str, Any]:
    found = reader_schema(cfg)
    return found if found is not None else load_schema(cfg.input.schema)


def load_batch_scorer(
    cfg: Config, model: str | None = None, *, copy_model_to: Path | None = None
) -> BatchScorer:
    """The configuration's pipeline and model, built and checked as ``run`` does.

    ``model``: another model than the configuration's (a directory, or any ``model.source``);
    ``copy_model_to``: a folder to copy the model's files into (before its source is closed).

    Raises:
        StreamScorerError: the configuration, schema or model do not fit (exit 2), or the model
            source is unreachable (exit 1).
    """
    schema = _input_schema(cfg)
    # stored records are bare Avro (or columns): never the Confluent frame of a topic
    bare = cfg.input.model_copy(update={"format": "schemaless"})
    files_cfg = cfg.single().model_copy(update={"input": bare})  # under models: the first
    if model is not None:
        other = files_cfg.first.model.model_copy(update={"path": None, "source": model})
        if Path(model).is_dir():
            other = other.model_copy(update={"path": Path(model)})
        files_cfg = files_cfg.model_copy(update={"model": other})
    metrics = Metrics()
    source = model_source(files_cfg)
    try:
        loaded = load_model(
            source,
            source.wanted(),
            lambda d: build_pipeline(files_cfg, metrics, d, reader=schema),
        )
        if copy_model_to is not None:
            shutil.copytree(loaded.directory, copy_model_to)
    finally:
        source.close()
    log.info("model %s from %s", loaded.model_version, source.describe())
    # load_model loads the one version the source names (an alias's champion, whatever rollout
    # is in force): stored records are scored by one model, never routed
    pipeline = loaded.pipeline
    if not isinstance(pipeline, Pipeline):
        raise TypeError(f"expected one model version's pipeline, got {type(pipeline).__name__}")
    return BatchScorer(
        pipeline,
        loaded.scorer,
        schema,
        id_field=cfg.input.id_field,
        event_time_field=cfg.input.event_time_field,
        model_dir=copy_model_to or loaded.directory,
    )


def open_readers(
    scorer: BatchScorer, specs: Sequence[str], exclude: Sequence[Path] = ()
) -> list[BatchReader]:
    """A reader per input file (``expand_inputs``), each checked against the features.

    Raises:
        ConfigError: an input names no file or no readable one (exit 2).
        SchemaError: an input's schema or columns cannot feed the model (exit 2).
    """
    guard = AvroGuard(scorer.schema)
    readers = [open_reader(p, scorer.schema, guard) for p in expand_inputs(specs, exclude)]
    for reader in readers:
        arrow_schema = getattr(reader, "schema", None)
        if isinstance(arrow_schema, pa.Schema):
            scorer.arrow.check(arrow_schema, reader.describe())
    return readers


def dead_letter_path(output: Path) -> Path:
    """Where dead letters go when ``--dead-letters`` is not given: ``NAME.dead-letters.EXT``."""
    return output.with_name(f"{output.stem}.dead-letters{output.suffix or '.parquet'}")


def score_all(
    scorer: BatchScorer,
    readers: Iterable[BatchReader],
    output: BatchWriter,
    dead_letters: BatchWriter,
    *,
    batch_size: int,
    progress: ProgressLine | None = None,
    stopped: Callable[[], bool] = lambda: False,
) -> ScoreReport:
    """Score every reader's records into ``output`` and ``dead_letters``, then commit both.

    On any failure (or a stop) both writers are aborted: what was there before stays.

    Raises:
        InputError: an input cannot be read past some point (exit 1).
        StreamScorerError: a stop was asked (``InputError``) or scoring failed.
    """
    report = ScoreReport(model_version=scorer.model_version)
    reasons: Counter[str] = Counter()
    started = time.monotonic()
    try:
        for reader in readers:
            batches = prefetched(reader.batches(batch_size))
            while True:
                try:
                    item = next(batches)
                except StopIteration:
                    break
                except (OSError, pa.ArrowException, ValueError, EOFError) as exc:
                    raise InputError(f"{reader.describe()}: cannot be read: {exc}") from exc
                if stopped():
                    raise InputError("stopped before the end: nothing written")
                scored = scorer.score(item)
                output.write(scored.predictions)
                if scored.dead:
                    dead_letters.write(dead_letter_batch(scored.dead, item))
                    reasons.update(f"{d.stage.value}/{d.reason.value}" for d in scored.dead)
                report.records += item.batch.num_rows
                report.predictions += scored.predictions.num_rows
                report.batches += 1
                if progress is not None:
                    progress.update(report.records)
        dead_letters.commit()
        output.commit()
    except BaseException:
        dead_letters.abort()
        output.abort()
        raise
    if progress is not None:
        progress.update(report.records, final=True)
    report.dead_letters = dict(sorted(reasons.items()))
    report.elapsed_s = round(time.monotonic() - started, 3)
    return report


def run_score(
    cfg: Config,
    inputs: Sequence[str],
    output: Path | None,
    *,
    dead_letters: Path | None = None,
    fmt: str = "",
    batch_size: int | None = None,
    stopped: Callable[[], bool] = lambda: False,
    query: str | None = None,
    output_table: str | None = None,
    dead_letter_table: str | None = None,
    dsn: str | None = None,
) -> ScoreReport:
    """``stream-scorer score``: see the module docstring.

    Reads the files ``inputs`` or the PostgreSQL ``query``; writes the file ``output`` or the
    table ``output_table``, and the dead letters to ``dead_letters`` or ``dead_letter_table``
    (default: beside the predictions, ``NAME.dead-letters.EXT`` or ``TABLE_dead_letters``).
    The database is ``dsn``'s, else the configuration's ``store.dsn``. A database outage is
    retried (the whole run again, nothing written before) with the retry policy until
    ``store.unavailable_timeout_s``.

    Raises:
        StreamScorerError: exit 2 for configuration, schema and model errors, 1 otherwise.
    """
    if (query is None) == (not inputs):
        raise ConfigError("--input", "give input files or --input-query, one of them")
    if query is not None or output_table is not None or dead_letter_table is not None:
        try:  # PostgreSQL support is the optional extra `postgres` (psycopg)
            from stream_scorer.batch.tables import QueryReader, TableOutput, database, table_name
        except ModuleNotFoundError as exc:
            raise ConfigError(
                "--input-query" if query is not None else "--output-table",
                f"needs PostgreSQL support ({exc.name} is not installed): "
                "pip install 'stream-scorer[postgres]'",
            ) from exc
    if (output is None) == (output_table is None):
        raise ConfigError("--output", "give --output or --output-table, one of them")
    if dead_letters is not None and dead_letter_table is not None:
        raise ConfigError("--dead-letters", "give --dead-letters or --dead-letter-table, not both")
    if output_table is not None:
        output_table = table_name(output_table, "--output-table")
        if dead_letters is None:
            dead_letter_table = table_name(
                dead_letter_table or f"{output_table}_dead_letters", "--dead-letter-table"
            )
    elif dead_letter_table is not None:
        dead_letter_table = table_name(dead_letter_table, "--dead-letter-table")
    if output_table is not None and output_table == dead_letter_table:
        raise ConfigError("--dead-letter-table", "must differ from --output-table")
    needs_db = query is not None or output_table is not None or dead_letter_table is not None
    db = database(cfg, dsn) if needs_db else None
    scorer = load_batch_scorer(cfg)
    rows = batch_size or DEFAULT_BATCH_ROWS
    dead_path = None
    if dead_letter_table is None:
        if dead_letters is not None:
            dead_path = dead_letters
        else:
            assert output is not None
            dead_path = dead_letter_path(output)

    def attempt() -> ScoreReport:
        with contextlib.ExitStack() as opened:
            readers: list[BatchReader]
            if query is not None:
                assert db is not None
                reader = QueryReader(db, query, rows)
                opened.callback(reader.close)
                scorer.arrow.check(reader.schema, "--input-query")
                readers = [reader]
            else:
                excluded = tuple(p for p in (output, dead_path) if p is not None)
                readers = open_readers(scorer, inputs, exclude=excluded)
            writer: BatchWriter
            if output_table is not None:
                assert db is not None
                writer = TableOutput(db, output_table, PREDICTION_SCHEMA)
            else:
                assert output is not None
                avro_schema = load_schema(cfg.first.output.schema)
                writer = open_writer(output, PREDICTION_SCHEMA, avro_schema=avro_schema, fmt=fmt)
            opened.callback(writer.abort)  # after a commit: nothing left to drop
            dead_writer: BatchWriter
            if dead_letter_table is not None:
                assert db is not None
                dead_writer = TableOutput(db, dead_letter_table, DEAD_LETTER_SCHEMA)
            else:
                assert dead_path is not None
                dead_fmt = fmt if dead_letters is None else ""
                dead_writer = open_writer(dead_path, DEAD_LETTER_SCHEMA, fmt=dead_fmt)
            opened.callback(dead_writer.abort)
            totals = [r.total_rows() for r in readers]
            known = None if any(t is None for t in totals) else sum(t or 0 for t in totals)
            return score_all(
                scorer,
                readers,
                BackgroundWriter(writer),
                dead_writer,
                batch_size=rows,
                progress=ProgressLine(known),
                stopped=stopped,
            )

    if db is None:
        report = attempt()
    else:
        log.info("reading and writing %s", db.describe())
        deadline = cfg.store.unavailable_timeout_s
        try:
            report = retrying(
                deadline, "score", server="PostgreSQL", policy=cfg.retry.policy(),
                stopping=stopped,
            )(attempt)  # fmt: skip
        except DatabaseError as exc:
            raise DatabaseError(
                f"PostgreSQL did not answer for store.unavailable_timeout_s ({deadline:g} s): {exc}"
            ) from exc
    report.output = str(output) if output_table is None else f"table {output_table}"
    report.dead_letter_output = (
        str(dead_path) if dead_letter_table is None else f"table {dead_letter_table}"
    )
    return report


__all__ = [
    "DEAD_LETTER_SCHEMA",
    "PREDICTION_SCHEMA",
    "BatchScorer",
    "ScoreReport",
    "load_batch_scorer",
    "run_score",
    "score_all",
]
