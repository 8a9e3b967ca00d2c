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
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from stream_scorer.errors import ConfigError, RegistryError, http_refusal, refused
from stream_scorer.urls import split_userinfo

log = logging.getLogger(__name__)

#: A writer schema's key: ``("id", 42)`` or ``("guid", "5f1c...-...")``.
SchemaKey = tuple[str, int | str]

_CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class NotFound(Exception):
    """The registry answered 404: no such schema, subject or version."""


def describe_key(key: SchemaKey) -> str:
    """``schema id 42`` or ``schema GUID ...``, for messages."""
    return f"schema id {key[1]}" if key[0] == "id" else f"schema GUID {key[1]}"


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
