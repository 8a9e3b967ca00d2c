"""PostgreSQL: a prediction table from an Avro schema, binary COPY, offsets kept in the database.

What ``sink postgres`` (``worker.store``) needs of the database, without Kafka:

- ``table_columns``: the table's columns from the prediction record's Avro schema (each field a
  column of the matching type, nullable when the field is optional), then the record's Kafka
  coordinates (``kafka_topic``, ``kafka_partition``, ``kafka_offset``); the primary key is
  (``input_id``, ``model_version``): one row per event and model version.
- ``migrate``: creates the table (and the offsets table) when absent, adds the columns of fields
  the schema gained (nullable: the rows already stored have no value), and refuses a column
  whose type differs from the schema's (a ``SchemaError``: the deployment must be fixed).
- ``connect``: a connection, a refused credential told apart from an outage (``RefusedError``:
  a configuration error, exit 2; anything else that fails to connect is an outage).
- ``copy_rows``: binary ``COPY`` of rows into a table (psycopg 3).
- ``OffsetsTable``: the consumed offsets per (group, topic, partition), read when a partition
  is assigned and written in the transaction of the rows, guarded (a member writes a
  partition's offsets only from where it last read them: a member that lost the partition
  cannot write behind the new owner's back).
- ``QueryResult`` (``read_query``) and ``TableWriter``: a query read as Arrow batches (memory
  bounded by the batch size), and Arrow batches written as a whole table in one transaction (a
  staging table swapped in), for scoring stored data; pyarrow is imported only by them.

Depends only on the error tree and psycopg.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import psycopg
from psycopg import sql

from stream_scorer.errors import DatabaseError, RefusedError, SchemaError

#: The primary key of the prediction table: one row per input event and model version.
KEY_FIELDS: Final = ("input_id", "model_version")
#: The record's Kafka coordinates, stored after the prediction's fields.
COORDINATES: Final = ("kafka_topic", "kafka_partition", "kafka_offset")

#: Avro primitive types (and logical types) to PostgreSQL types.
_TYPES: Final = {
    "string": "text",
    "double": "double precision",
    "float": "real",
    "int": "integer",
    "long": "bigint",
    "boolean": "boolean",
    "bytes": "bytea",
    "timestamp-millis": "timestamp with time zone",
    "timestamp-micros": "timestamp with time zone",
    "date": "date",
    "uuid": "text",
}
#: PostgreSQL's names for the types above (``information_schema.columns.data_type``).
_BINARY_NAMES: Final = {
    "text": "text",
    "double precision": "float8",
    "real": "float4",
    "integer": "int4",
    "bigint": "int8",
    "boolean": "bool",
    "bytea": "bytea",
    "timestamp with time zone": "timestamptz",
    "date": "date",
}
#: Words in a connection failure that say the server refused, not that it is down.
_REFUSALS: Final = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",  # role or database
    "permission denied",
    "no password supplied",
)
#: SQLSTATE classes of a refusal: invalid authorization (28), invalid catalog name (3D),
#: insufficient privilege (42501).
_REFUSED_STATES: Final = ("28", "3D", "42501")


@dataclass(frozen=True)
class Column:
    """One column of the prediction table.

    Attributes:
        name: the column (the Avro field's name).
        sql_type: its PostgreSQL type, as ``information_schema`` names it.
        nullable: whether it may hold NULL (an optional field; every added column).
    """

    name: str
    sql_type: str
    nullable: bool

    @property
    def binary_type(self) -> str:
        """The type's name for a binary COPY (``copy.set_types``)."""
        return _BINARY_NAMES[self.sql_type]


def _sql_type(field: str, avro: Any) -> tuple[str, bool]:
    """The PostgreSQL type of an Avro field type, and whether it is nullable."""
    nullable = False
    if isinstance(avro, list):
        branches = [b for b in avro if b != "null"]
        if len(branches) != 1:
            raise SchemaError(f"prediction field {field!r}: only [null, T] unions can be stored")
        nullable, avro = len(branches) < len(avro), branches[0]
    if isinstance(avro, dict):
        avro = avro.get("logicalType") or avro.get("type")
    if not isinstance(avro, str) or avro not in _TYPES:
        raise SchemaError(f"prediction field {field!r}: type {avro!r} has no column type")
    return _TYPES[avro], nullable


def table_columns(schema: Mapping[str, Any]) -> list[Column]:
    """The prediction table's columns for the prediction record's Avro ``schema``.

    The fields in order (an optional field, ``[null, T]``, nullable), then ``COORDINATES``.

    Raises:
        SchemaError: the schema lacks a key field, names a coordinate column, or has a field
            of a type no column holds (records, arrays, maps, enums, unions of two types).
    """
    columns = []
    for f in schema.get("fields", ()):
        sql_type, nullable = _sql_type(f["name"], f["type"])
        columns.append(Column(f["name"], sql_type, nullable))
    names = {c.name for c in columns}
    for key in KEY_FIELDS:
        if key not in names:
            raise SchemaError(f"the prediction schema has no {key!r} field (the table's key)")
    for name in COORDINATES:
        if name in names:
            raise SchemaError(f"prediction field {name!r} is a column the sink writes itself")
    return [
        *columns,
        Column("kafka_topic", "text", False),
        Column("kafka_partition", "integer", False),
        Column("kafka_offset", "bigint", False),
    ]


def _name(table: str) -> sql.Composable:
    """A possibly schema-qualified table name, quoted."""
    return sql.Identifier(*table.split("."))


def _split(table: str) -> tuple[str | None, str]:
    schema, _, name = table.rpartition(".")
    return schema or None, name


def refused(exc: BaseException) -> bool:
    """Whether a database error is a refusal (credentials, privileges, a missing database)."""
    state = getattr(exc, "sqlstate", None) or ""
    if state and any(state.startswith(s) for s in _REFUSED_STATES):
        return True
    text = str(exc).lower()
    return isinstance(exc, psycopg.OperationalError) and any(w in text for w in _REFUSALS)


def is_outage(exc: BaseException) -> bool:
    """Whether a database error is an outage (asked again): a lost or refused connection.

    ``psycopg.OperationalError`` (its ``AdminShutdown``, ``CannotConnectNow``, ...) and
    ``InterfaceError`` (a closed connection), and ``DatabaseError``; never a refusal.
    """
    if refused(exc):
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | DatabaseError)


def safe_dsn(dsn: str) -> str:
    """``dsn`` without its password (for messages and logs)."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(an unparsable connection string)"
    params.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in params.items())


def _user(dsn: str) -> str:
    try:
        return str(psycopg.conninfo.conninfo_to_dict(dsn).get("user", ""))
    except psycopg.ProgrammingError:
        return ""


def connect(
    dsn: str, password: str | None = None, *, field: str = "store.dsn"
) -> psycopg.Connection:
    """A connection to ``dsn`` (``password`` added when given), not in autocommit.

    Raises:
        RefusedError: the server refused the credentials or the database (``field`` named).
        DatabaseError: the server did not answer (an outage: the caller retries).
    """
    extra: dict[str, Any] = {"connect_timeout": 10, "application_name": "stream-scorer"}
    if password is not None:
        extra["password"] = password
    try:
        return psycopg.connect(dsn, **extra)
    except psycopg.Error as exc:
        where = safe_dsn(dsn)
        if refused(exc):
            message = str(exc).splitlines()[0]
            raise RefusedError(
                field,
                f"PostgreSQL at {where} refused the connection: {message} (a configuration "
                "error, not retried)",
                url=where, status=401, principal=_user(dsn),
            ) from exc  # fmt: skip
        raise DatabaseError(f"PostgreSQL at {where} does not answer: {exc}") from exc


def migrate(conn: psycopg.Connection, table: str, columns: Sequence[Column]) -> list[str]:
    """Create ``table`` with ``columns`` and its key, or add the columns it lacks; commit.

    Returns the names of the columns added to an existing table.

    Raises:
        SchemaError: an existing column's type differs from the schema's.
    """
    schema, name = _split(table)
    found = {
        row[0]: row[1]
        for row in conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s AND table_schema = coalesce(%s, current_schema())",
            (name, schema),
        )
    }
    added: list[str] = []
    if not found:
        defs = [
            sql.SQL("{} {}{}").format(
                sql.Identifier(c.name),
                sql.SQL(c.sql_type),
                sql.SQL("" if c.nullable else " NOT NULL"),
            )
            for c in columns
        ]
        key = sql.SQL(", ").join(sql.Identifier(k) for k in KEY_FIELDS)
        conn.execute(
            sql.SQL("CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
                _name(table), sql.SQL(", ").join(defs), key
            )
        )
    else:
        for c in columns:
            have = found.get(c.name)
            if have is None:
                conn.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        _name(table), sql.Identifier(c.name), sql.SQL(c.sql_type)
                    )
                )
                added.append(c.name)
            elif have != c.sql_type:
                raise SchemaError(
                    f"column {table}.{c.name} is {have} and the prediction schema makes it "
                    f"{c.sql_type}: migrate the table by hand (or store into a new one)"
                )
    conn.commit()
    return added


@dataclass(frozen=True)
class BinaryTuples:
    """Rows already written in binary COPY's tuple format (no header, no trailer).

    Attributes:
        data: the tuples, back to back (``fast.read.PredictionReader.copy_tuples`` writes them).
        count: how many.
    """

    data: bytes
    count: int


#: What ``copy_rows`` stores: rows of values, or tuples already in binary COPY's format.
Rows = Iterable[Sequence[Any]] | BinaryTuples

#: Binary COPY's header (signature, flags, no extension) and trailer.
_COPY_HEADER: Final = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER: Final = b"\xff\xff"


def copy_rows(cur: psycopg.Cursor[Any], table: str, columns: Sequence[Column], rows: Rows) -> None:
    """Binary ``COPY`` of ``rows`` (one value per column, in order) into ``table``.

    ``BinaryTuples`` are sent as they are, in one block.
    """
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        _name(table), sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    )
    with cur.copy(statement) as copy:
        if isinstance(rows, BinaryTuples):
            copy.write(_COPY_HEADER + rows.data + _COPY_TRAILER)
            return
        copy.set_types([c.binary_type for c in columns])
        for row in rows:
            copy.write_row(row)


def insert_new_rows(
    cur: psycopg.Cursor[Any], table: str, columns: Sequence[Column], rows: Rows
) -> int:
    """Store ``rows`` whose key is not stored yet (the first of equal keys); return how many.

    The slower path of a batch that repeats a stored key (an at-least-once producer's
    duplicate): a binary COPY into a temporary table, then ``INSERT ... ON CONFLICT DO
    NOTHING``.
    """
    stage = "stream_scorer_stage"
    cur.execute(
        sql.SQL("CREATE TEMPORARY TABLE IF NOT EXISTS {} (LIKE {}) ON COMMIT DELETE ROWS").format(
            sql.Identifier(stage), _name(table)
        )
    )
    copy_rows(cur, stage, columns, rows)
    names = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
    key = sql.SQL(", ").join(sql.Identifier(k) for k in KEY_FIELDS)
    cur.execute(
        sql.SQL(
            "INSERT INTO {table} ({names}) SELECT DISTINCT ON ({key}) {names} FROM {stage} "
            "ORDER BY {key}, kafka_topic, kafka_partition, kafka_offset "
            "ON CONFLICT ({key}) DO NOTHING"
        ).format(table=_name(table), names=names, key=key, stage=sql.Identifier(stage))
    )
    return max(0, cur.rowcount)


#: A topic partition.
TopicPartition = tuple[str, int]


class OffsetsTable:
    """The next offset to consume per (group, topic, partition), kept in the database."""

    def __init__(self, table: str, group: str) -> None:
        """Describe the offsets of consumer group ``group`` in ``table``."""
        self.table = table
        self.group = group

    def create(self, conn: psycopg.Connection) -> None:
        """Create the table when absent; commit."""
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (group_id text NOT NULL, topic text NOT NULL, "
                "partition integer NOT NULL, next_offset bigint NOT NULL, "
                "updated_at timestamp with time zone NOT NULL DEFAULT now(), "
                "PRIMARY KEY (group_id, topic, partition))"
            ).format(_name(self.table))
        )
        conn.commit()

    def read(
        self, conn: psycopg.Connection, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """The stored next offset of each of ``partitions`` that has one.

        In the connection's transaction (one is opened if none is).
        """
        wanted = list(partitions)
        if not wanted:
            return {}
        rows = conn.execute(
            sql.SQL(
                "SELECT topic, partition, next_offset FROM {} WHERE group_id = %s "
                "AND (topic, partition) IN (SELECT * FROM unnest(%s::text[], %s::int[]))"
            ).format(_name(self.table)),
            (self.group, [t for t, _ in wanted], [p for _, p in wanted]),
        ).fetchall()
        return {(t, p): int(o) for t, p, o in rows}

    def advance(
        self, cur: psycopg.Cursor[Any], tp: TopicPartition, expected: int | None, next_offset: int
    ) -> bool:
        """Move ``tp``'s next offset from ``expected`` (None: no row yet) to ``next_offset``.

        In the caller's transaction. False when the stored offset is not ``expected``: another
        member wrote the partition since this one read it (the caller rolls back).
        """
        cur.execute(
            sql.SQL(
                "INSERT INTO {t} AS o (group_id, topic, partition, next_offset) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (group_id, topic, partition) DO UPDATE "
                "SET next_offset = EXCLUDED.next_offset, updated_at = now() "
                "WHERE o.next_offset = %s RETURNING 1"
            ).format(t=_name(self.table)),
            (self.group, tp[0], tp[1], next_offset, expected),
        )
        return cur.fetchone() is not None


# --- Arrow batches in and out (for batch scoring: a query read, a table written whole) --------

#: PostgreSQL type OIDs to Arrow type names (``read_query``); any other type is read as text.
_ARROW_OF_OID: Final = {
    16: "bool_",
    17: "binary",
    20: "int64",
    21: "int16",
    23: "int32",
    25: "string",
    700: "float32",
    701: "float64",
    1042: "string",
    1043: "string",
    1082: "date32",
    1114: "timestamp_us",
    1184: "timestamp_us_utc",
}


def _arrow_type(name: str) -> Any:
    import pyarrow as pa

    if name == "timestamp_us":
        return pa.timestamp("us")
    if name == "timestamp_us_utc":
        return pa.timestamp("us", tz="UTC")
    return getattr(pa, name)()


class QueryResult:
    """A query's rows through a server-side cursor: its Arrow ``schema`` first, then batches.

    The query is declared when the result is made (so its columns are known, and a query the
    server refuses fails here) and read ``batch_rows`` at a time by ``batches``: memory is
    bounded by ``batch_rows``, not by the result. Column types follow the result's (integers,
    floats, booleans, text, bytea, dates, timestamps; NUMERIC and any other type as text). Runs
    in the connection's transaction.
    """

    def __init__(
        self, conn: psycopg.Connection, query: str, params: Sequence[Any] | None = None,
        *, batch_rows: int = 65_536,
    ) -> None:  # fmt: skip
        """Declare ``query`` (with ``params``) on ``conn``."""
        import pyarrow as pa

        self._rows = batch_rows
        self._cur = conn.cursor(name="stream_scorer_read")
        self._cur.itersize = batch_rows
        self._cur.execute(query, params)
        assert self._cur.description is not None
        names = [d.name for d in self._cur.description]
        self._kinds = [_ARROW_OF_OID.get(d.type_code, "string") for d in self._cur.description]
        self.schema = pa.schema(
            [pa.field(n, _arrow_type(k)) for n, k in zip(names, self._kinds, strict=True)]
        )

    def batches(self) -> Iterator[Any]:
        """The rows as ``pyarrow.RecordBatch``es of at most ``batch_rows`` rows; then closed."""
        import pyarrow as pa

        try:
            while True:
                rows = self._cur.fetchmany(self._rows)
                if not rows:
                    return
                columns = list(zip(*rows, strict=True))
                arrays = [
                    pa.array([None if v is None else str(v) for v in col], pa.string())
                    if kind == "string"
                    else pa.array(col, _arrow_type(kind))
                    for col, kind in zip(columns, self._kinds, strict=True)
                ]
                yield pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        finally:
            self.close()

    def close(self) -> None:
        """Close the cursor (the connection stays open)."""
        if not self._cur.closed:
            self._cur.close()


def read_query(
    conn: psycopg.Connection, query: str, params: Sequence[Any] | None = None,
    *, batch_rows: int = 65_536,
) -> Iterator[Any]:  # fmt: skip
    """The rows of ``query`` as ``pyarrow.RecordBatch``es of at most ``batch_rows`` rows.

    ``QueryResult``'s batches (memory bounded by ``batch_rows``).
    """
    yield from QueryResult(conn, query, params, batch_rows=batch_rows).batches()


#: Arrow type ids (``str(type)``) to PostgreSQL column types and binary COPY names.
_SQL_OF_ARROW: Final = {
    "bool": ("boolean", "bool"),
    "int8": ("smallint", "int2"),
    "int16": ("smallint", "int2"),
    "int32": ("integer", "int4"),
    "int64": ("bigint", "int8"),
    "float": ("real", "float4"),
    "double": ("double precision", "float8"),
    "string": ("text", "text"),
    "large_string": ("text", "text"),
    "binary": ("bytea", "bytea"),
    "date32[day]": ("date", "date"),
}


def _sql_of_arrow(field: Any) -> tuple[str, str]:
    import pyarrow as pa

    if pa.types.is_dictionary(field.type):  # a dictionary-encoded column: its values' type
        field = field.with_type(field.type.value_type)
    kind = str(field.type)
    if kind.startswith("timestamp["):
        tz = getattr(field.type, "tz", None)
        return ("timestamp with time zone", "timestamptz") if tz else ("timestamp", "timestamp")
    if kind not in _SQL_OF_ARROW:
        raise SchemaError(f"column {field.name!r}: Arrow type {kind} has no PostgreSQL type")
    return _SQL_OF_ARROW[kind]


class TableWriter:
    """Writes Arrow batches as a whole table: the old contents or the new, never half.

    The batches go by binary COPY into a staging table created in the writer's transaction;
    ``commit`` drops the target (when it exists) and renames the staging table to it in the same
    transaction. A crash or an exception before ``commit`` rolls everything back: readers keep
    seeing the old table. Use as ``with TableWriter(conn, "scores", schema) as w: w.write(b)``
    (committed when the block ends without an exception).
    """

    def __init__(self, conn: psycopg.Connection, table: str, schema: Any) -> None:
        """Prepare to write ``table`` with the columns of the ``pyarrow.Schema`` ``schema``.

        Raises:
            SchemaError: a column's Arrow type has no PostgreSQL type.
        """
        self.conn = conn
        self.table = table
        self._types = [_sql_of_arrow(f) for f in schema]
        self._names = [f.name for f in schema]
        schema_name, name = _split(table)
        self._stage = f"{name[:40]}__staging"
        self._stage_table = f"{schema_name}.{self._stage}" if schema_name else self._stage
        self.rows = 0
        defs = sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(t))
            for n, (t, _) in zip(self._names, self._types, strict=True)
        )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_name(self._stage_table)))
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(_name(self._stage_table), defs))

    def write(self, batch: Any) -> None:
        """Add the rows of one ``pyarrow.RecordBatch`` (the schema's columns, in order)."""
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
            _name(self._stage_table), sql.SQL(", ").join(sql.Identifier(n) for n in self._names)
        )
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types([b for _, b in self._types])
            for row in zip(*columns, strict=True):
                copy.write_row(row)
        self.rows += batch.num_rows

    def commit(self) -> None:
        """Swap the staging table in as ``table`` and commit (one transaction)."""
        self.conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_name(self.table)))
        self.conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(
                _name(self._stage_table), sql.Identifier(_split(self.table)[1])
            )
        )
        self.conn.commit()

    def __enter__(self) -> TableWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.conn.rollback()
