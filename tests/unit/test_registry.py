"""The registry's configuration, client, retries and the local registry's Java check."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from support import http_server, load_raw, ride_config

from stream_scorer.devtools import localregistry
from stream_scorer.errors import (
    EXIT_DEPLOYMENT,
    EXIT_FAILURE,
    ConfigError,
    LocalRegistryError,
    RefusedError,
    RegistryError,
    exit_code,
)
from stream_scorer.registry import RegistryClient
from stream_scorer.retry import retrying
from stream_scorer.worker.loop import output_prefix, reader_schema

SCHEMA = json.dumps({"type": "record", "name": "R", "fields": [{"name": "a", "type": "int"}]})


@pytest.mark.parametrize("section", ["input", "output"])
def test_the_confluent_format_needs_a_registry_url(tmp_path: Path, section: str) -> None:
    with pytest.raises(ConfigError, match=rf"registry.url: is required by {section}.format"):
        load_raw(tmp_path, ride_config(tmp_path, **{section: {"format": "confluent"}}))


def test_the_registry_password_never_shows(tmp_path: Path) -> None:
    secret = "hunter2-registry"
    cfg = load_raw(
        tmp_path,
        ride_config(tmp_path, input={"format": "confluent"},
             registry={"url": "http://r:8081", "username": "u", "password": secret}),
    )  # fmt: skip
    assert cfg.registry.password == secret
    assert secret not in repr(cfg) and secret not in str(cfg)
    with pytest.raises(ConfigError) as err:
        load_raw(
            tmp_path, ride_config(tmp_path, registry={"url": "x", "password": secret, "bogus": 1})
        )
    assert secret not in str(err.value)


def test_the_outage_bound_stays_below_the_poll_interval(tmp_path: Path) -> None:
    framed = {"format": "confluent"}
    registry = {"url": "http://r:1", "unavailable_timeout_s": 300}
    with pytest.raises(ConfigError, match=r"registry\.unavailable_timeout_s"):
        load_raw(tmp_path, ride_config(tmp_path, input=framed, registry=registry))
    # without framed input no batch waits for the registry: a short poll interval is fine
    short = {"consumer": {"max.poll.interval.ms": 8000}}
    cfg = load_raw(tmp_path, ride_config(tmp_path, kafka=short, batch={"max_processing_s": 2}))
    assert cfg.input.format == "schemaless"


@pytest.mark.parametrize(
    ("topics", "why"),
    [(["out"], "would consume output.topic"), (["^d.q$"], "would consume dead_letter.topic"),
     (["^(bad"], "not a regular expression")],
)  # fmt: skip
def test_input_topics_never_consume_our_outputs(
    tmp_path: Path, topics: list[str], why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        load_raw(tmp_path, ride_config(tmp_path, input={"topics": topics}))
    assert load_raw(
        tmp_path, ride_config(tmp_path, input={"topics": ["^in-.*", "more"]})
    ).input.topics


class _Registry(BaseHTTPRequestHandler):
    """404 for id 1, 500 for id 2, a schema for id 3; subjects: 404 (no such subject)."""

    seen: ClassVar[list[tuple[str, str, str | None]]] = []

    def _answer(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("Authorization")))
        answers = {
            "/schemas/ids/1": (404, {"error_code": 40403, "message": "Schema 1 not found."}),
            "/schemas/ids/2": (500, {"message": "storage down"}),
            "/schemas/ids/3": (200, {"schema": SCHEMA}),
        }
        self._answer(*answers.get(self.path, (404, {"message": "no"})))

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.seen.append(("POST", self.path, self.headers.get("Authorization")))
        if self.path.endswith("/versions"):
            self._answer(200, {"id": 42})
        else:
            self._answer(404, {"error_code": 40401, "message": "Subject not found"})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_registry() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Registry.seen = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_not_found_is_a_bad_record_and_a_server_error_an_outage(fake_registry: str) -> None:
    client = RegistryClient(fake_registry, username="u", password="p")
    assert client.writer_schema(("id", 1)) is None
    assert client.writer_schema(("id", 3)) == SCHEMA
    with pytest.raises(RegistryError) as err:
        client.writer_schema(("id", 2))
    assert err.value.status == 500
    assert all(auth == "Basic dTpw" for _m, _p, auth in _Registry.seen)


def test_an_unreachable_registry_is_retried_up_to_the_bound() -> None:
    client = RegistryClient("http://127.0.0.1:9", timeout_s=0.5)
    calls: list[int] = []
    with pytest.raises(RegistryError, match="not reachable") as err:
        for attempt in retrying(0.5, "test", keepalive=lambda: calls.append(1)):
            with attempt:
                client.writer_schema(("id", 1))
    assert err.value.status is None
    assert calls  # the keepalive ran between tries


def test_tls_files_that_do_not_load_are_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"registry\.ca_location"):
        RegistryClient("https://r:8081", ca_location=str(tmp_path / "missing.pem"))


def test_output_framing_registers_or_refuses_a_missing_subject(
    tmp_path: Path, fake_registry: str
) -> None:
    raw = ride_config(tmp_path, output={"format": "confluent"}, registry={"url": fake_registry})
    assert output_prefix(load_raw(tmp_path, raw)) == b"\x00\x00\x00\x00\x2a"
    raw["output"]["auto_register"] = False
    with pytest.raises(ConfigError, match="subject 'out-value'"):
        output_prefix(load_raw(tmp_path, raw))
    assert output_prefix(load_raw(tmp_path, ride_config(tmp_path))) == b""


def test_a_missing_java_21_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.delenv("STREAM_SCORER_REGISTRY_JAVA", raising=False)
    monkeypatch.setattr(localregistry, "JVM_ROOT", tmp_path / "jvm")
    with pytest.raises(LocalRegistryError, match=r"Java 21 or newer is needed.*no java at all"):
        localregistry.find_java()
    old = tmp_path / "java"
    old.write_text("#!/bin/sh\necho 'openjdk version \"17.0.9\" 2023-10-17' >&2\n")
    old.chmod(0o755)
    with pytest.raises(LocalRegistryError, match=r"Java 17\).*STREAM_SCORER_REGISTRY_JAVA"):
        localregistry.find_java()
    new = tmp_path / "jvm" / "jdk-25" / "bin" / "java"
    new.parent.mkdir(parents=True)
    new.write_text("#!/bin/sh\necho 'openjdk version \"25.0.1\" 2025-10-21' >&2\n")
    new.chmod(0o755)
    assert localregistry.find_java() == str(new)


def test_the_reader_schema_can_come_from_a_subject(tmp_path: Path, fake_registry: str) -> None:
    with pytest.raises(ConfigError, match=r"needs input\.format: confluent"):
        load_raw(tmp_path, ride_config(tmp_path, input={"reader_subject": "rides-value"}))
    with pytest.raises(ConfigError, match=r"input\.reader_version"):
        load_raw(tmp_path, ride_config(tmp_path, input={"reader_version": "newest"}))
    raw = ride_config(
        tmp_path,
        input={"format": "confluent", "reader_subject": "rides-value", "reader_version": "3"},
        registry={"url": fake_registry},
    )
    with pytest.raises(ConfigError, match="subject 'rides-value' has no version '3'"):
        reader_schema(load_raw(tmp_path, raw))
    assert reader_schema(load_raw(tmp_path, ride_config(tmp_path))) is None


def test_a_stop_ends_the_wait_for_the_registry() -> None:
    client = RegistryClient("http://127.0.0.1:9", timeout_s=0.5)
    tries = 0
    with pytest.raises(RegistryError):
        for attempt in retrying(600, "test", stopping=lambda: True):
            with attempt:
                tries += 1
                client.writer_schema(("id", 1))
    assert tries == 1  # no second try, although the bound is ten minutes away


# --- refusals are configuration errors, server errors outages (real HTTP server) ----------
def _registry_answer(method: str, path: str) -> tuple[int, Any]:
    """``/schemas/ids/<status>`` answers that status; registration as Apicurio refuses."""
    if path.startswith("/schemas/ids/"):
        status = int(path.rsplit("/", 1)[1])
        return status, {"error_code": status, "message": f"answer {status}"}
    if method == "POST" and path == "/subjects/incompatible-value/versions":
        return 409, {"error_code": 409, "message": "Incompatible schema: field x removed"}
    if method == "POST" and path == "/subjects/invalid-value/versions":
        return 422, {"error_code": 42201, "message": "Invalid schema: no type"}
    return 404, {"message": "no"}


@pytest.mark.parametrize(
    ("status", "field", "says"),
    [
        (401, "registry.username", "refused the credentials of user 'bob'"),
        (403, "registry.username", "forbids user 'bob' to GET /schemas/ids/403"),
        (400, "registry.url", "refused GET /schemas/ids/400 (HTTP 400): answer 400"),
    ],
)
def test_a_refusal_is_a_configuration_error_asked_once(status: int, field: str, says: str) -> None:
    with http_server(_registry_answer) as (url, seen):
        client = RegistryClient(f"http://bob:hunter2@{url[len('http://') :]}")
        with pytest.raises(RefusedError) as err:
            for attempt in retrying(60, "test"):  # not retried: no wait for the bound
                with attempt:
                    client.writer_schema(("id", status))
    assert len(seen) == 1
    assert seen[0][2] == "Basic " + base64.b64encode(b"bob:hunter2").decode()
    assert err.value.field == field and err.value.status == status
    assert says in str(err.value)
    assert f"schema registry {url} " in str(err.value)  # the URL, without the credentials
    assert "hunter2" not in str(err.value)
    assert exit_code(err.value) == EXIT_DEPLOYMENT


@pytest.mark.parametrize("status", [500, 503, 429, 408])
def test_a_server_error_is_an_outage(status: int) -> None:
    with http_server(_registry_answer) as (url, _), pytest.raises(RegistryError) as err:
        RegistryClient(url).writer_schema(("id", status))
    assert err.value.status == status
    assert exit_code(err.value) == EXIT_FAILURE


@pytest.mark.parametrize(
    ("topic", "status", "message"),
    [("incompatible", 409, "Incompatible schema: field x removed"), ("invalid", 422, "Invalid")],
)
def test_a_refused_registration_quotes_the_registry(
    tmp_path: Path, topic: str, status: int, message: str
) -> None:
    with http_server(_registry_answer) as (url, seen):
        raw = ride_config(tmp_path, output={"format": "confluent", "topic": topic},
                   registry={"url": url})  # fmt: skip
        with pytest.raises(RefusedError) as err:
            output_prefix(load_raw(tmp_path, raw))
    assert len(seen) == 1
    assert err.value.field == "output.schema" and err.value.status == status
    assert message in str(err.value) and "subject" in str(err.value)
    assert exit_code(err.value) == EXIT_DEPLOYMENT


def test_credentials_in_the_url_are_used_and_never_kept(tmp_path: Path) -> None:
    cfg = load_raw(tmp_path, ride_config(tmp_path, input={"format": "confluent"},
                               registry={"url": "https://bob:s%40cret@sr:8081/apis"}))  # fmt: skip
    assert cfg.registry.url == "https://sr:8081/apis"
    assert (cfg.registry.username, cfg.registry.password) == ("bob", "s@cret")
    assert "s@cret" not in repr(cfg) and "s%40cret" not in repr(cfg)
    same = ride_config(tmp_path, registry={"url": "http://bob:pw@sr/", "username": "bob"})
    assert load_raw(tmp_path, same).registry.password == "pw"
    other = ride_config(tmp_path, registry={"url": "http://bob:pw@sr/", "password": "other"})
    with pytest.raises(ConfigError, match=r"registry\.url: holds a password other") as err:
        load_raw(tmp_path, other)
    assert "pw" not in str(err.value).replace("password", "")
