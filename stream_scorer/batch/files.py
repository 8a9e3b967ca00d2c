"""Inputs and outputs of ``score``: readers yielding Arrow batches, writers with an atomic finish.

Two small protocols, so another store (a database query, a table) plugs in beside the files:

- ``BatchReader``: yields ``InputBatch`` es (the input's name, the number of the batch's first
  row in it, a ``pyarrow.RecordBatch``). A columnar input yields its columns; an Avro
  container file yields each record's bytes in one binary column (``AVRO_VALUE``), for the
  stream's own decoder (the compiled path).
- ``BatchWriter``: takes Arrow batches; ``commit`` makes the result visible whole, ``abort``
  leaves whatever was there before. A file is written under a temporary name in the same folder
  and renamed over the target when complete, so a crash leaves the old file or the new one,
  never half of one (the temporary file of a killed run is left, hidden: ``.NAME.PID.tmp``).

Memory stays bounded by the batch size: Parquet is read with ``iter_batches``, Avro block by
block (``fastavro.block_reader``), and both writers stream.
"""

from __future__ import annotations

import contextlib
import glob
import os
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import fastavro
import pyarrow as pa
import pyarrow.parquet as pq

from stream_scorer.errors import ConfigError, SchemaError
from stream_scorer.stages.avro_guard import AvroGuard

#: The binary column of an Avro container file's batch: each record's bytes.
AVRO_VALUE = "value"
#: File name endings of each format.
PARQUET_SUFFIXES = (".parquet", ".pq")
AVRO_SUFFIXES = (".avro",)


@dataclass(frozen=True)
class InputBatch:
    """A batch of records read from one input.

    Attributes:
        source: the input's name (a file path).
        first_row: the number of the batch's first record in that input (from 0).
        batch: the records: columns, or Avro bytes in the ``AVRO_VALUE`` column.
        avro: whether ``batch`` holds Avro bytes (written with the configured input schema).
    """

    source: str
    first_row: int
    batch: pa.RecordBatch
    avro: bool = False


class BatchReader(Protocol):
    """Where ``score`` reads records from."""

    def describe(self) -> str:
        """The input, for the log."""
        ...

    def total_rows(self) -> int | None:
        """How many records, when known before reading (for the progress line's ETA)."""
        ...

    def batches(self, size: int) -> Iterator[InputBatch]:
        """The records, in batches of at most ``size``."""
        ...


class BatchWriter(Protocol):
    """Where ``score`` writes: batches, then ``commit`` (all visible) or ``abort`` (none)."""

    def write(self, batch: pa.RecordBatch) -> None:
        """Append a batch."""
        ...

    def commit(self) -> None:
        """Make everything written visible at once (replacing what was there)."""
        ...

    def abort(self) -> None:
        """Drop everything written; what was there before stays."""
        ...


def expand_inputs(specs: Sequence[str], exclude: Sequence[Path] = ()) -> list[Path]:
    """The files named by ``specs``, in order, each once, but for ``exclude`` (the outputs).

    A spec is a file, a directory (its Parquet and Avro files, recursively, sorted) or a glob;
    an output in an input folder is not read (a re-run would score its own last result).

    Raises:
        ConfigError: a spec matches no file, or a file is neither Parquet nor Avro (``--input``).
    """
    out: list[Path] = []
    skip = {p.resolve() for p in exclude}
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in PARQUET_SUFFIXES + AVRO_SUFFIXES
            )
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        found = [p for p in found if p.resolve() not in skip]
        if not found:
            raise ConfigError("--input", f"{spec!r} names no file")
        for p in found:
            if p.suffix.lower() not in PARQUET_SUFFIXES + AVRO_SUFFIXES:
                raise ConfigError(
                    "--input", f"{p}: not a Parquet (.parquet, .pq) or Avro (.avro) file"
                )
            if p not in out:
                out.append(p)
    return out


class ParquetReader:
    """A Parquet file, read batch by batch."""

    def __init__(self, path: Path) -> None:
        """Open ``path`` (its footer only)."""
        self.path = path
        try:
            self._file = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise ConfigError("--input", f"{path}: not a readable Parquet file: {exc}") from exc

    @property
    def schema(self) -> pa.Schema:
        """The file's Arrow schema."""
        return self._file.schema_arrow

    def describe(self) -> str:
        """The path."""
        return str(self.path)

    def total_rows(self) -> int:
        """The rows the footer announces."""
        return int(self._file.metadata.num_rows)

    def batches(self, size: int) -> Iterator[InputBatch]:
        """The rows, ``size`` at a time."""
        row = 0
        for batch in self._file.iter_batches(batch_size=size):
            yield InputBatch(str(self.path), row, batch)
            row += batch.num_rows


def _canonical(schema: Any) -> str:
    return str(fastavro.schema.to_parsing_canonical_form(schema))


class AvroReader:
    """An Avro container file: each block's records split into their bytes, unread.

    The records are decoded later by the stream's own decoder (the compiled path when the
    schema allows), so a record becomes the prediction or dead letter it would on the stream.
    """

    def __init__(self, path: Path, schema: Mapping[str, Any], guard: AvroGuard) -> None:
        """Open ``path`` and check its writer schema is ``schema`` (``input.schema``).

        Raises:
            SchemaError: the file was written with another schema.
            ConfigError: the file is no Avro container file.
        """
        self.path = path
        self._guard = guard
        try:
            with path.open("rb") as fo:
                writer = fastavro.reader(fo).writer_schema
        except (OSError, ValueError) as exc:
            raise ConfigError("--input", f"{path}: not a readable Avro file: {exc}") from exc
        if _canonical(writer) != _canonical(schema):
            raise SchemaError(
                f"{path} was written with another schema than the input schema "
                f"(input.schema) in its canonical form: {_canonical(writer)[:200]}"
            )

    def describe(self) -> str:
        """The path."""
        return str(self.path)

    def total_rows(self) -> None:
        """Unknown before reading (the blocks' counts are spread over the file)."""
        return None

    def batches(self, size: int) -> Iterator[InputBatch]:
        """The records' bytes, at most ``size`` at a time (whole blocks, split when larger)."""
        row = 0
        pending: list[bytes] = []
        with self.path.open("rb") as fo:
            for block in fastavro.block_reader(fo):
                data = block.bytes_.getvalue()  # type: ignore[attr-defined]
                ends, violation = self._guard.split(data, block.num_records)
                start = 0
                for end in ends:
                    pending.append(data[start:end])
                    start = end
                if violation is not None and start < len(data):
                    pending.append(data[start:])  # decoded on its own: a dead letter saying why
                while len(pending) >= size:
                    chunk, pending = pending[:size], pending[size:]
                    yield InputBatch(str(self.path), row, _values(chunk), avro=True)
                    row += len(chunk)
        if pending:
            yield InputBatch(str(self.path), row, _values(pending), avro=True)


def _values(values: list[bytes]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(values, pa.binary())], names=[AVRO_VALUE])


def open_reader(path: Path, schema: Mapping[str, Any], guard: AvroGuard) -> BatchReader:
    """A reader for ``path``, by its extension (``expand_inputs`` checked it)."""
    if path.suffix.lower() in AVRO_SUFFIXES:
        return AvroReader(path, schema, guard)
    return ParquetReader(path)


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written until complete: ``.NAME.PID.tmp`` in its folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


class _AtomicFile:
    """A file written under ``temporary_name`` and renamed over its target on commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = temporary_name(path)
        if not path.parent.is_dir():
            raise ConfigError("--output", f"folder {path.parent} does not exist")

    def _close(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        """Close the temporary file and rename it over the target."""
        self._close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and delete the temporary file; the target is untouched."""
        with contextlib.suppress(Exception):
            self._close()
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


class ParquetWriter(_AtomicFile):
    """Batches to a Parquet file (schema: the first batch's, else ``schema``)."""

    def __init__(self, path: Path, schema: pa.Schema | None = None) -> None:
        """Write to ``path`` (atomically); ``schema``: of the file when no batch comes."""
        super().__init__(path)
        self._schema = schema
        self._writer: pq.ParquetWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        """Append ``batch``."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.tmp, batch.schema)
        self._writer.write_batch(batch)

    def _close(self) -> None:
        if self._writer is None:
            schema = self._schema or pa.schema([])
            self._writer = pq.ParquetWriter(self.tmp, schema)
        self._writer.close()


def avro_schema_of(schema: pa.Schema, name: str) -> dict[str, Any]:
    """An Avro record schema for flat Arrow ``schema`` (every field nullable).

    Raises:
        SchemaError: a column of a type with no Avro equivalent here (nested, decimal, ...).
    """
    fields = []
    for f in schema:
        t = f.type
        if pa.types.is_dictionary(t):
            t = t.value_type
        if pa.types.is_boolean(t):
            avro: Any = "boolean"
        elif pa.types.is_integer(t):
            avro = "long" if t.bit_width > 32 or not pa.types.is_signed_integer(t) else "int"
        elif pa.types.is_float32(t):
            avro = "float"
        elif pa.types.is_floating(t):
            avro = "double"
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            avro = "string"
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
            avro = "bytes"
        elif pa.types.is_timestamp(t):
            avro = {"type": "long", "logicalType": "timestamp-micros"}
        else:
            raise SchemaError(f"column {f.name!r} ({t}) cannot be written to Avro here")
        fields.append({"name": f.name, "type": ["null", avro], "default": None})
    return {"type": "record", "name": name, "fields": fields}


class AvroWriter(_AtomicFile):
    """Batches to an Avro container file (deflate).

    Written with ``schema``, or one derived from the first batch's columns (``avro_schema_of``).
    """

    def __init__(self, path: Path, schema: Mapping[str, Any] | None = None) -> None:
        """Write to ``path`` (atomically)."""
        super().__init__(path)
        self._schema = None if schema is None else fastavro.parse_schema(dict(schema))
        self._fo: IO[bytes] | None = None
        self._writer: Any = None

    def _open(self, schema: Any) -> None:
        self._fo = self.tmp.open("wb")
        self._writer = fastavro.write.Writer(self._fo, schema, codec="deflate")

    def write(self, batch: pa.RecordBatch) -> None:
        """Append ``batch``'s rows."""
        if self._writer is None:
            self._open(self._schema or avro_schema_of(batch.schema, "Record"))
        for record in batch.to_pylist():
            self._writer.write(record)

    def _close(self) -> None:
        if self._writer is None:
            self._open(self._schema or avro_schema_of(pa.schema([]), "Record"))
        self._writer.flush()
        assert self._fo is not None
        self._fo.close()


def open_writer(
    path: Path,
    schema: pa.Schema,
    *,
    avro_schema: Mapping[str, Any] | None = None,
    fmt: str = "",
) -> BatchWriter:
    """A writer for ``path``: ``fmt`` (``parquet``/``avro``) or by the extension.

    Args:
        path: the file to write (atomically).
        schema: the Arrow schema of the batches (of the file when none comes).
        avro_schema: the Avro schema of an Avro file (default: ``avro_schema_of(schema)``).
        fmt: ``parquet`` or ``avro``; empty: by the extension.

    Raises:
        ConfigError: neither says which format.
    """
    suffix = path.suffix.lower()
    kind = fmt or (
        "avro" if suffix in AVRO_SUFFIXES else "parquet" if suffix in PARQUET_SUFFIXES else ""
    )
    if kind == "avro":
        return AvroWriter(path, avro_schema or avro_schema_of(schema, "Record"))
    if kind == "parquet":
        return ParquetWriter(path, schema)
    raise ConfigError(
        "--output", f"{path}: say the format with --format, or end the name in .parquet or .avro"
    )


class BackgroundWriter:
    """A ``BatchWriter`` whose writes happen on a thread, while the next batch is scored.

    At most ``depth`` batches wait (memory stays bounded); a failure of the writer is raised
    by the next ``write`` or by ``commit``. Parquet's encoding and compression release the GIL,
    so on two cores writing overlaps XGBoost's prediction.
    """

    _DONE = object()

    def __init__(self, writer: BatchWriter, depth: int = 2) -> None:
        """Write through ``writer``."""
        self._writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is None:
                try:
                    self._writer.write(item)
                except BaseException as exc:  # raised by the caller's next write or commit
                    self._error = exc

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, batch: pa.RecordBatch) -> None:
        """Queue ``batch`` (waits while ``depth`` batches are queued)."""
        self._raise()
        self._queue.put(batch)

    def _finish(self) -> None:
        self._queue.put(self._DONE)
        self._thread.join()

    def commit(self) -> None:
        """Wait for the queued batches, then commit (or raise the writer's failure)."""
        self._finish()
        self._raise()
        self._writer.commit()

    def abort(self) -> None:
        """Wait for the thread, then abort."""
        with contextlib.suppress(BaseException):
            self._finish()
        self._writer.abort()


def prefetched(batches: Iterator[InputBatch], depth: int = 2) -> Iterator[InputBatch]:
    """``batches``, read ahead on a thread (at most ``depth`` waiting); errors re-raised here."""
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run() -> None:
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        box.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put(done)
        except BaseException as exc:  # handed to the reader of the batches
            box.put(exc)

    thread = threading.Thread(target=run, name="batch-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                box.get_nowait()
        thread.join()
