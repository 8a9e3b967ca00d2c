"""A small client of the Confluent-compatible Schema Registry REST API, and the writer schemas.

Standard library only (``urllib``): the worker needs five calls (schema by id and by GUID, a
subject's version, register, look up), a clear line between *not found* (a bad record: dead
letter) and *not reachable* (an outage: retry, never a dead letter), bounded timeouts, basic
authentication and TLS (CA, client certificate and key). Works with Confluent Schema Registry
and Apicurio Registry's ``/apis/ccompat/v7``.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from stream_scorer.errors import ConfigError, RegistryError, http_refusal, refused
from stream_scorer.retry import DEFAULT_POLICY, RetryPolicy, retrying
from stream_scorer.stages.framing import FramedColumns, SchemaKey, SchemaSource, describe_key
from stream_scorer.stages.pipeline import ColumnBuilder
from stream_scorer.urls import split_userinfo

log = logging.getLogger(__name__)

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class NotFound(Exception):
    """The registry answered 404: no such schema, subject or version."""


def _message(detail: str) -> str:
    """The registry's own words from an error body (``{"error_code": .., "message": ..}``)."""
    try:
        answer = json.loads(detail)
    except ValueError:
        return detail
    message = answer.get("message") if isinstance(answer, dict) else None
    return message if isinstance(message, str) and message else detail


class RegistryClient:
    """The Confluent-compatible REST API at one URL (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        username: str = "",
        password: str = "",
        ca_location: str = "",
        certificate_location: str = "",
        key_location: str = "",
        timeout_s: float = 10.0,
    ) -> None:
        """Describe the registry; nothing is requested until a call.

        Credentials in ``url`` (``http://user:password@host/...``) are used when ``username``
        and ``password`` are not given, and never kept in ``url``.

        Raises:
            ConfigError: a TLS file cannot be loaded.
        """
        bare, url_user, url_password = split_userinfo(url)
        username, password = username or url_user, password or url_password
        self.url = bare.rstrip("/")
        self.principal = username
        self._timeout = timeout_s
        self._headers = {"Accept": _CONTENT_TYPE, "Content-Type": _CONTENT_TYPE}
        if username or password:
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._context: ssl.SSLContext | None = None
        if self.url.startswith("https:"):
            try:
                self._context = ssl.create_default_context(cafile=ca_location or None)
                if certificate_location:
                    self._context.load_cert_chain(certificate_location, key_location or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("registry.ca_location", f"cannot load TLS files: {exc}") from exc

    @classmethod
    def from_config(cls, registry: Any) -> RegistryClient:
        """A client from the configuration's ``registry`` section."""
        return cls(
            registry.url,
            username=registry.username,
            password=registry.password,
            ca_location=registry.ca_location,
            certificate_location=registry.certificate_location,
            key_location=registry.key_location,
            timeout_s=registry.timeout_s,
        )

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers=self._headers
        )
        try:
            with urllib.request.urlopen(req, timeout=self._timeout, context=self._context) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            if exc.code == 404:
                raise NotFound(f"{method} {path}: {detail}") from exc
            if http_refusal(exc.code):  # asking again cannot help: a configuration error
                raise refused(
                    "registry.username" if exc.code in (401, 403) else "registry.url",
                    "schema registry",
                    self.url,
                    exc.code,
                    self.principal,
                    _message(detail),
                    f"{method} {path}",
                ) from exc
            raise RegistryError(
                f"schema registry {self.url} answered {method} {path} with HTTP {exc.code}: "
                f"{detail}",
                status=exc.code,
            ) from exc
        except (OSError, ValueError) as exc:  # refused, reset, timed out, bad JSON
            raise RegistryError(
                f"schema registry {self.url} not reachable ({method} {path}): {exc}"
            ) from exc

    def writer_schema(self, key: SchemaKey) -> str | None:
        """A schema's JSON text by id or GUID; None when the registry has none (404)."""
        kind, value = key
        path = f"/schemas/ids/{value}" if kind == "id" else f"/schemas/guids/{value}"
        try:
            answer = self._call("GET", path)
        except NotFound:
            return None
        schema = answer.get("schema") if isinstance(answer, dict) else None
        if not isinstance(schema, str):
            raise RegistryError(f"schema registry {self.url}: {path} returned no schema")
        return schema

    def subject_version(self, subject: str, version: str = "latest") -> tuple[int, str]:
        """A subject's version (a number or ``latest``): its schema id and JSON text.

        Raises:
            NotFound: no such subject or version.
        """
        quoted = urllib.parse.quote(subject, safe="")
        answer = self._call("GET", f"/subjects/{quoted}/versions/{version}")
        return int(answer["id"]), str(answer["schema"])

    def register(self, subject: str, schema: str) -> int:
        """Register ``schema`` under ``subject`` (idempotent); return its id."""
        quoted = urllib.parse.quote(subject, safe="")
        answer = self._call("POST", f"/subjects/{quoted}/versions", {"schema": schema})
        return int(answer["id"])

    def lookup(self, subject: str, schema: str) -> int:
        """The id of ``schema`` registered under ``subject``.

        Raises:
            NotFound: the subject does not exist or does not hold this schema.
        """
        quoted = urllib.parse.quote(subject, safe="")
        answer = self._call("POST", f"/subjects/{quoted}", {"schema": schema})
        return int(answer["id"])

    def set_compatibility(self, subject: str, level: str) -> None:
        """Set a subject's compatibility level (``BACKWARD``, ``NONE``, ...)."""
        quoted = urllib.parse.quote(subject, safe="")
        self._call("PUT", f"/config/{quoted}", {"compatibility": level})


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

    def follow(self, columns: ColumnBuilder) -> None:
        """Serve ``columns`` from now on (the pipeline of a model swapped in between batches).

        The writer schemas fetched so far are taught to it from memory as its batches need them.
        """
        if not isinstance(columns, FramedColumns):
            raise TypeError(f"a framed decoder is needed, not {type(columns).__name__}")
        self._columns = columns

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
