"""``score``'s inputs and outputs: expansion, the atomic writers, the write-behind thread."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream_scorer.batch.files import (
    BackgroundWriter,
    ParquetWriter,
    expand_inputs,
    open_writer,
    temporary_name,
)
from stream_scorer.batch.score import progress_text
from stream_scorer.errors import ConfigError

SCHEMA = pa.schema([("x", pa.int64())])


def _batch(*values: int) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(values, pa.int64())], schema=SCHEMA)


def test_inputs_expand_files_folders_and_globs_once_without_the_outputs(tmp_path: Path) -> None:
    for name in ("b.parquet", "a.avro", "sub/c.pq", "out.parquet", "notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = expand_inputs(
        [str(tmp_path), str(tmp_path / "*.avro")], exclude=[tmp_path / "out.parquet"]
    )
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.avro", "b.parquet", "sub/c.pq"
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="names no file"):
        expand_inputs([str(tmp_path / "none-*.parquet")])
    with pytest.raises(ConfigError, match="not a Parquet"):
        expand_inputs([str(tmp_path / "notes.txt")])


def test_a_writer_replaces_the_target_only_on_commit(tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    first = ParquetWriter(target, SCHEMA)
    first.write(_batch(1, 2))
    assert not target.exists() and temporary_name(target).exists()
    first.commit()
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]
    second = ParquetWriter(target, SCHEMA)
    second.write(_batch(3))
    second.abort()
    assert pq.read_table(target).column("x").to_pylist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.parquet"]
    empty = open_writer(tmp_path / "none.avro", SCHEMA)
    empty.commit()  # no batch: an empty file of the schema
    assert (tmp_path / "none.avro").stat().st_size > 0
    with pytest.raises(ConfigError, match="--format"):
        open_writer(tmp_path / "out.csv", SCHEMA)


class _Failing:
    def __init__(self) -> None:
        self.aborted = False

    def write(self, batch: pa.RecordBatch) -> None:
        raise OSError("disk full")

    def commit(self) -> None:
        raise AssertionError("never committed after a failed write")

    def abort(self) -> None:
        self.aborted = True


def test_the_write_behind_thread_raises_its_failure_and_aborts() -> None:
    inner = _Failing()
    writer = BackgroundWriter(inner)
    writer.write(_batch(1))
    with pytest.raises(OSError, match="disk full"):
        writer.commit()
    writer.abort()
    assert inner.aborted


def test_progress_text() -> None:
    assert progress_text(500, 2.0, 1500) == "500 / 1,500 records  250/s  ETA 4 s"
    assert progress_text(500, 2.0, None) == "500 records  250/s"
