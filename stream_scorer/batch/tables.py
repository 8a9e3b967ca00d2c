"""``score``'s PostgreSQL input and outputs: a query read as batches, a table written whole.

- ``Database``: where (``--dsn``, or the configuration's ``store.dsn`` and
  ``store.password_file``); its password is never in a message or a log line (``safe_dsn``).
- ``QueryReader``: a ``BatchReader`` of a query's rows (``postgres.QueryResult``: a
  server-side cursor, memory bounded by the batch size). The result's columns go through the
  same ``fast.arrow.ArrowColumns`` as a Parquet file's, matched to the input schema's fields by
  name; ``open_readers`` checks them before a row is read.
- ``TableOutput``: a ``BatchWriter`` writing a whole table (``postgres.TableWriter``: a staging
  table swapped in, in one transaction): a failure or a crash leaves the old table whole.

Database errors become the error tree's: a refusal (credentials, privileges, a missing
database) a ``ConfigError`` naming the field (exit 2, never retried), an outage a
``DatabaseError`` (``run_score`` retries the whole run with the one retry policy, then exit 1),
anything else (a query the server rejects, a value it cannot compute) an ``InputError`` (exit 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pyarrow as pa
from pydantic import TypeAdapter, ValidationError

from stream_scorer import postgres as pg
from stream_scorer.batch.files import InputBatch
from stream_scorer.config import Config
from stream_scorer.config.sections import TableName
from stream_scorer.errors import (
    ConfigError,
    DatabaseError,
    InputError,
    StreamScorerError,
)
from stream_scorer.worker.store import read_password, store_config

_TABLE_NAME: TypeAdapter[str] = TypeAdapter(TableName)


@dataclass(frozen=True)
class Database:
    """A PostgreSQL database to read a query from or write tables to.

    Attributes:
        dsn: the libpq connection string or URI (may hold a password: never shown).
        password: the password read from ``store.password_file``, if any.
        field: the option or key that named it (``--dsn`` or ``store.dsn``), for messages.
    """

    dsn: str
    password: str | None = None
    field: str = "--dsn"

    def connect(self) -> psycopg.Connection:
        """A connection (``postgres.connect``: a refusal is a ``RefusedError``, exit 2)."""
        return pg.connect(self.dsn, self.password, field=self.field)

    def describe(self) -> str:
        """The database without its password."""
        return f"PostgreSQL at {pg.safe_dsn(self.dsn)}"

    def error(self, exc: psycopg.Error, what: str) -> StreamScorerError:
        """``exc`` (raised while doing ``what``) as an error of the tree (see the module)."""
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if pg.refused(exc):
            return ConfigError(self.field, f"{self.describe()} refused {what}: {message}")
        if pg.is_outage(exc):
            return DatabaseError(f"{what}: {self.describe()} does not answer: {message}")
        return InputError(f"{what}: {self.describe()}: {message}")


def database(cfg: Config, dsn: str | None) -> Database:
    """The database of ``--dsn``, else of the configuration's ``store.dsn``.

    Raises:
        ConfigError: neither names one (``--dsn``).
    """
    if dsn:
        return Database(dsn)
    if cfg.store.dsn:
        store = store_config(cfg)
        return Database(store.dsn, read_password(store), field="store.dsn")
    raise ConfigError("--dsn", "a query or a table needs a database: --dsn or store.dsn")


def table_name(name: str, option: str) -> str:
    """``name`` checked as a table name (``schema.table`` allowed).

    Raises:
        ConfigError: not an identifier, optionally schema-qualified (``option`` named).
    """
    try:
        return _TABLE_NAME.validate_python(name)
    except ValidationError as exc:
        raise ConfigError(
            option, f"{name!r} is not a table name (letters, digits, _; schema.table allowed)"
        ) from exc


class QueryReader:
    """The rows of a query, in batches (a ``BatchReader``); its own connection."""

    def __init__(self, db: Database, query: str, batch_rows: int) -> None:
        """Connect and declare ``query``: its columns are known (``schema``) before any row.

        Raises:
            ConfigError: the database refused the connection (exit 2).
            DatabaseError: it does not answer (an outage).
            InputError: it rejected the query (a syntax error, an unknown table: exit 1).
        """
        self.db = db
        self.query = query
        self._conn = db.connect()
        try:
            self._result = pg.QueryResult(self._conn, query, batch_rows=batch_rows)
        except psycopg.Error as exc:
            self.close()
            raise db.error(exc, "the query (--input-query)") from exc

    @property
    def schema(self) -> pa.Schema:
        """The result's Arrow schema."""
        return self._result.schema

    def describe(self) -> str:
        """``the query of PostgreSQL at host=...`` (no password)."""
        return f"the query of {self.db.describe()}"

    def total_rows(self) -> None:
        """Unknown before reading (a query is not counted twice)."""
        return None

    def batches(self, size: int) -> Iterator[InputBatch]:
        """The rows, in batches of the size declared (``size``: the same, ``score``'s).

        The connection is closed at the end.
        """
        row = 0
        name = self.describe()
        try:
            for batch in self._result.batches():
                yield InputBatch(name, row, batch)
                row += batch.num_rows
        except psycopg.Error as exc:
            raise self.db.error(exc, f"the query, after {row} rows") from exc
        finally:
            self.close()

    def close(self) -> None:
        """Close the cursor and the connection (a transaction of reads only: nothing kept)."""
        with contextlib.suppress(psycopg.Error, AttributeError):
            self._result.close()
        with contextlib.suppress(psycopg.Error):
            self._conn.close()


class TableOutput:
    """A ``BatchWriter`` of a whole table: staged, then swapped in by ``commit``."""

    def __init__(self, db: Database, table: str, schema: pa.Schema) -> None:
        """Connect and create the staging table of ``table``.

        Raises:
            ConfigError: the database refused the connection or the table (exit 2).
            DatabaseError: it does not answer (an outage).
        """
        self.db = db
        self.table = table
        self._conn = db.connect()
        try:
            self._writer = pg.TableWriter(self._conn, table, schema)
        except psycopg.Error as exc:
            self.abort()
            raise db.error(exc, f"staging table {table}") from exc

    def describe(self) -> str:
        """``table NAME of PostgreSQL at ...``."""
        return f"table {self.table} of {self.db.describe()}"

    def write(self, batch: pa.RecordBatch) -> None:
        """Copy ``batch`` into the staging table."""
        try:
            self._writer.write(batch)
        except psycopg.Error as exc:
            raise self.db.error(exc, f"writing table {self.table}") from exc

    def commit(self) -> None:
        """Replace the table by the staging table, in one transaction."""
        try:
            self._writer.commit()
        except psycopg.Error as exc:
            raise self.db.error(exc, f"swapping in table {self.table}") from exc
        finally:
            self._close()

    def abort(self) -> None:
        """Roll back: the staging table is gone, the table as it was."""
        with contextlib.suppress(psycopg.Error):
            self._conn.rollback()
        self._close()

    def _close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._conn.close()


__all__ = ["Database", "QueryReader", "TableOutput", "database", "table_name"]
