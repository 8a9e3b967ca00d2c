"""The scorer on Apache Spark: a function for PySpark's ``DataFrame.mapInArrow``.

On the driver, ``ship`` builds and checks the pipeline as ``score`` does (the configuration's
schemas, features, policies, and its model from any source: directory, store alias, MLflow
alias), then ships a bundle once with ``SparkContext.addFile``: the model's files, the input and
prediction schemas and the part of the configuration scoring needs. Each task finds the bundle
with ``SparkFiles.get`` and loads the model once (kept per Python worker process), then runs
every Arrow batch of its partition through ``BatchScorer.score``: the same code as ``score``
and the stream, so the same predictions.

Each input row gives one output row (``SPARK_SCHEMA``): a prediction (``reason`` null), or a
dead letter (``prediction`` null; ``stage``, ``reason``, ``error_message`` as on the stream)::

    from stream_scorer.batch.spark import SPARK_SCHEMA, ship

    score = ship(spark, "rides.yaml")
    predictions = spark.read.parquet("s3://rides/").mapInArrow(score, SPARK_SCHEMA)

No cluster code of ours: Spark distributes the partitions; pyspark is the optional ``spark``
extra and is imported only by these functions.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import yaml

from stream_scorer.batch.files import InputBatch
from stream_scorer.batch.score import BatchScorer, load_batch_scorer
from stream_scorer.config import Config, load_config, read_file

#: The output of the function, as Spark DDL (``mapInArrow``'s schema argument).
SPARK_SCHEMA = (
    "input_id string, prediction double, label int, model_version string, "
    "event_time timestamp, scored_at timestamp, stage string, reason string, "
    "error_message string"
)
_US_UTC = pa.timestamp("us", tz="UTC")
_ARROW_SCHEMA = pa.schema(
    [
        ("input_id", pa.string()),
        ("prediction", pa.float64()),
        ("label", pa.int32()),
        ("model_version", pa.string()),
        ("event_time", _US_UTC),
        ("scored_at", _US_UTC),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("error_message", pa.string()),
    ]
)
_CONFIG_FILE, _INPUT_SCHEMA, _OUTPUT_SCHEMA, _MODEL = (
    "config.yaml",
    "input.avsc",
    "prediction.avsc",
    "model",
)
#: The scorers loaded in this Python worker, by bundle (a task loads its model once).
_LOADED: dict[str, BatchScorer] = {}


def bundle(config: Path, folder: Path) -> BatchScorer:
    """Write what an executor needs to score into ``folder``; return the driver's scorer.

    The model's files (fetched from its source, checked), the input schema (the registry's
    reader schema when configured) and the prediction schema, and a configuration holding
    ``input``, ``output``, ``model`` and ``batch`` pointing at them (no credentials, no Kafka
    settings beyond the required names).

    Raises:
        StreamScorerError: as ``score``: the configuration, schemas or model do not fit.
    """
    cfg = load_config(config).single()  # under models: the first entry's model
    folder.mkdir(parents=True, exist_ok=True)
    scorer = load_batch_scorer(cfg, copy_model_to=folder / _MODEL)
    (folder / _INPUT_SCHEMA).write_text(json.dumps(_plain(scorer.schema)), encoding="utf-8")
    (folder / _OUTPUT_SCHEMA).write_text(
        cfg.first.output.schema.read_text(encoding="utf-8"), encoding="utf-8"
    )
    raw = read_file(config)
    shipped = {
        "kafka": {"bootstrap_servers": cfg.kafka.bootstrap_servers},
        "input": {
            **{k: v for k, v in raw.get("input", {}).items() if k not in ("reader_subject",)},
            "schema": _INPUT_SCHEMA,
            "format": "schemaless",
        },
        "output": {"topic": cfg.first.output.topic, "schema": _OUTPUT_SCHEMA},
        "dead_letter": {"topic": cfg.dead_letter.topic},
        "model": {
            "path": _MODEL,
            "nthread": cfg.first.model.nthread,
            **(
                {"threshold": cfg.first.model.threshold}
                if cfg.first.model.threshold is not None
                else {}
            ),
        },
    }
    (folder / _CONFIG_FILE).write_text(yaml.safe_dump(shipped), encoding="utf-8")
    return scorer


def _plain(schema: Any) -> Any:
    """A parsed schema back to plain JSON (fastavro's parse adds ``__fastavro_parsed``)."""
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if not k.startswith("__")}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


class SparkScorer:
    """The function ``mapInArrow`` runs: picklable, it holds only the bundle's name."""

    def __init__(self, name: str) -> None:
        """Score with the bundle ``name`` (shipped by ``ship``)."""
        self.name = name

    def scorer(self) -> BatchScorer:
        """The bundle's scorer, loaded once per Python worker process."""
        found = _LOADED.get(self.name)
        if found is None:
            from pyspark import SparkFiles

            found = load_bundle(Path(SparkFiles.get(self.name)))
            _LOADED[self.name] = found
        return found

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Score a partition's batches: one output row per input row."""
        scorer = self.scorer()
        source = f"spark partition {_partition()}"
        row = 0
        for batch in batches:
            yield spark_batch(scorer, InputBatch(source, row, batch))
            row += batch.num_rows


def _partition() -> int:
    from pyspark import TaskContext

    context = TaskContext.get()
    return -1 if context is None else int(context.partitionId())


def load_bundle(folder: Path) -> BatchScorer:
    """The scorer of a bundle folder (``bundle``), built and checked as ``score`` builds it."""
    cfg: Config = load_config(folder / _CONFIG_FILE, environ={})
    return load_batch_scorer(cfg)


def spark_batch(scorer: BatchScorer, item: InputBatch) -> pa.RecordBatch:
    """One batch scored, as ``_ARROW_SCHEMA``: the predictions, then the dead letters."""
    scored = scorer.score(item)
    p = scored.predictions
    n = p.num_rows
    predictions = [
        p.column("input_id"),
        p.column("prediction"),
        p.column("label"),
        p.column("model_version").cast(pa.string()),
        p.column("event_time").cast(_US_UTC),
        p.column("scored_at").cast(_US_UTC),
        pa.nulls(n, pa.string()),
        pa.nulls(n, pa.string()),
        pa.nulls(n, pa.string()),
    ]
    out = pa.RecordBatch.from_arrays(predictions, schema=_ARROW_SCHEMA)
    if not scored.dead:
        return out
    d = len(scored.dead)
    rows = np.array([int(x.message.offset() or 0) - item.first_row for x in scored.dead])
    ids = scorer.arrow.ids(item.batch, rows)
    dead = pa.RecordBatch.from_arrays(
        [
            ids,
            pa.nulls(d, pa.float64()),
            pa.nulls(d, pa.int32()),
            pa.array([scorer.model_version] * d, pa.string()),
            pa.nulls(d, _US_UTC),
            pa.nulls(d, _US_UTC),
            pa.array([x.stage.value for x in scored.dead], pa.string()),
            pa.array([x.reason.value for x in scored.dead], pa.string()),
            pa.array([x.error_message for x in scored.dead], pa.string()),
        ],
        schema=_ARROW_SCHEMA,
    )
    return pa.Table.from_batches([out, dead]).combine_chunks().to_batches()[0]


def ship(spark: Any, config: Path | str) -> SparkScorer:
    """Check the pipeline on the driver and ship it to the executors once (``addFile``).

    Args:
        spark: the ``SparkSession``.
        config: the configuration file of ``run`` and ``score``.

    Returns:
        The function for ``DataFrame.mapInArrow(function, SPARK_SCHEMA)``.

    Raises:
        StreamScorerError: as ``score`` (exit 2 for configuration, schema and model errors).
    """
    name = f"stream-scorer-{uuid.uuid4().hex[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="stream-scorer-spark-")) / name
    bundle(Path(config), folder)
    spark.sparkContext.addFile(str(folder), recursive=True)
    return SparkScorer(name)


__all__ = ["SPARK_SCHEMA", "SparkScorer", "bundle", "load_bundle", "ship", "spark_batch"]
