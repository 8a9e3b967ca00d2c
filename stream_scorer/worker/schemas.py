"""The writer schemas of framed input fetched from the registry: the I/O half of ``FramedColumns``.

``stages.framing`` stays a pure batch function; ``WriterSchemas`` asks the registry
(``registry.RegistryClient``, retried by ``registry.retrying``) for the writer schemas a batch
needs before the batch is decoded, and keeps those found for the pipelines of later model versions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from stream_scorer.errors import RegistryError
from stream_scorer.registry import SchemaKey, describe_key
from stream_scorer.retry import DEFAULT_POLICY, RetryPolicy, retrying
from stream_scorer.stages.framing import FramedColumns, SchemaSource
from stream_scorer.stages.pipeline import ColumnBuilder

log = logging.getLogger(__name__)


#: Writer schemas kept for pipelines built later (``WriterSchemas.follow``), oldest dropped first.
MAX_FOUND = 4096


class WriterSchemas:
    """Fetches the writer schemas a batch needs (the I/O half of ``FramedColumns``)."""

    def __init__(
        self,
        columns: FramedColumns,
        client: SchemaSource,
        *,
        unavailable_timeout_s: float,
        keepalive: Callable[[], None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
        policy: RetryPolicy = DEFAULT_POLICY,
    ) -> None:
        """Serve ``columns`` from ``client``, retrying for ``unavailable_timeout_s``.

        ``policy``: the backoff between tries (``retry``).

        ``stopping``: a stop was asked for; the wait for the registry ends (``RegistryError``,
        the batch stays unprocessed and uncommitted).
        """
        self._columns = columns
        self._others: tuple[FramedColumns, ...] = ()  # a rollout's other versions' decoders
        self._client = client
        # schemas found, by key: an id's schema never changes, so a pipeline built later (a new
        # model version, ``follow``) learns them without asking the registry again
        self._found: dict[SchemaKey, str] = {}
        self._bound = unavailable_timeout_s
        self._policy = policy
        self.keepalive = keepalive
        self.stopping = stopping

    def prepare(self, messages: Iterable[Any]) -> None:
        """Fetch every writer schema ``messages`` need that is not known yet.

        Blocks while the registry is down (retried with backoff; ``keepalive`` between tries),
        so the batch waits, unprocessed and uncommitted, instead of being dead-lettered.

        Raises:
            RegistryError: the registry did not answer for ``unavailable_timeout_s``.
        """
        keys = self._columns.schema_keys(list(messages))
        for key in sorted(keys, key=str):
            started = time.monotonic()
            try:
                text = self._found.get(key) or self.fetch(key)
            except RegistryError as exc:
                waited = time.monotonic() - started
                why = "a stop was asked for" if self.stopping() else "the bound was reached"
                raise RegistryError(
                    f"the schema registry did not answer for {waited:.0f} s "
                    f"(registry.unavailable_timeout_s = {self._bound:g}; {why}) while fetching "
                    f"{describe_key(key)}; the batch stays unprocessed and uncommitted: {exc}",
                    status=exc.status,
                ) from exc
            self._columns.learn(key, text)
            for other in self._others:
                other.learn(key, text)
            if text is not None:
                if key in self._found:
                    continue  # known before a model swap: nothing new to say
                if len(self._found) >= MAX_FOUND:
                    del self._found[next(iter(self._found))]  # the oldest
                self._found[key] = text
            log.info(
                "writer schema %s: %s", describe_key(key),
                "fetched" if text is not None else "unknown to the registry (dead letters)",
            )  # fmt: skip

    def follow(self, columns: ColumnBuilder, *others: ColumnBuilder) -> None:
        """Serve ``columns`` from now on (the pipeline of a model swapped in between batches).

        ``others``: the decoders of a rollout's other versions, taught every schema too.
        The writer schemas fetched so far are taught to them from memory as batches need them.
        """
        for each in (columns, *others):
            if not isinstance(each, FramedColumns):
                raise TypeError(f"a framed decoder is needed, not {type(each).__name__}")
        self._columns = columns  # type: ignore[assignment]
        self._others = others  # type: ignore[assignment]

    def fetch(self, key: SchemaKey) -> str | None:
        """One writer schema, retried while the registry is unavailable."""
        for attempt in retrying(
            self._bound,
            describe_key(key),
            server="registry",
            policy=self._policy,
            keepalive=self.keepalive,
            stopping=self.stopping,
        ):
            with attempt:
                return self._client.writer_schema(key)
        raise AssertionError("unreachable")  # pragma: no cover
