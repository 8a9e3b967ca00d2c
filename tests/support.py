"""Shared test helpers: a second, non-example schema, tiny models, plain message objects."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import fastavro
import numpy as np
import pytest
import xgboost as xgb
import yaml

from stream_scorer.clients import read_to_end, topic_end_offsets
from stream_scorer.config import load_config
from stream_scorer.contracts.manifest import FeatureSpec, Manifest, sha256_file, write_manifest
from stream_scorer.devtools.localkafka import default_cache_dir
from stream_scorer.evaluate.metrics import EvaluationMetrics
from stream_scorer.kafka import topics
from stream_scorer.stages.records import Message, PlainMessage
from stream_scorer.worker.metrics import Metrics

#: The tests' name for a consumed record without Kafka.
Msg = PlainMessage


def offset_of(msg: Message) -> int:
    """``msg.offset()``, which a consumed record has (``Message`` allows None)."""
    offset = msg.offset()
    assert offset is not None, msg
    return offset


# A second input contract, unlike the example: nested record, boolean, float, string category.
PAYMENT_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Payment",
    "namespace": "test.payments",
    "fields": [
        {"name": "txn_id", "type": "string"},
        {"name": "amount", "type": "float"},
        {"name": "card_present", "type": "boolean"},
        {"name": "country", "type": "string"},
        {
            "name": "channel",
            "type": {"type": "enum", "name": "Channel", "symbols": ["WEB", "POS", "APP"]},
        },
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {
            "name": "customer",
            "type": {
                "type": "record",
                "name": "Customer",
                "fields": [
                    {"name": "age", "type": ["null", "int"], "default": None},
                    {"name": "tenure_days", "type": "long"},
                ],
            },
        },
    ],
}

PAYMENT_FEATURES = (
    FeatureSpec("amount", "amount"),
    FeatureSpec("card_present", "card_present"),
    FeatureSpec("country", "country", "category", ("DE", "FR", "NL", "US")),
    FeatureSpec("channel", "channel", "category", ("WEB", "POS", "APP")),
    FeatureSpec("hour", "at", "hour_of_day"),
    FeatureSpec("age", "customer.age"),
    FeatureSpec("tenure", "customer.tenure_days"),
)

COUNTRIES = ("DE", "FR", "NL", "US")
CHANNELS = ("WEB", "POS", "APP")


def payments(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Generate ``n`` payment records."""
    rng = np.random.default_rng(seed)
    base = 1_763_900_000_000
    out = []
    for i in range(n):
        out.append(
            {
                "txn_id": f"txn-{seed}-{i}",
                "amount": float(np.float32(rng.gamma(2.0, 40.0))),
                "card_present": bool(rng.random() < 0.6),
                "country": COUNTRIES[int(rng.integers(0, 4))],
                "channel": CHANNELS[int(rng.integers(0, 3))],
                "at": base + int(rng.integers(0, 86_400_000)),
                "customer": {
                    "age": None if rng.random() < 0.2 else int(rng.integers(18, 90)),
                    "tenure_days": int(rng.integers(0, 3000)),
                },
            }
        )
    return out


def payment_matrix(records: list[dict[str, Any]]) -> np.ndarray:
    """The classifier's features computed independently of stream_scorer.stages.features."""
    rows = []
    for r in records:
        hour = datetime.fromtimestamp(r["at"] / 1000, tz=UTC).hour
        age = r["customer"]["age"]
        rows.append(
            [
                r["amount"],
                1.0 if r["card_present"] else 0.0,
                COUNTRIES.index(r["country"]),
                CHANNELS.index(r["channel"]),
                hour,
                np.nan if age is None else age,
                r["customer"]["tenure_days"],
            ]
        )
    return np.asarray(rows, dtype=np.float32)


def fraud_labels(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """A learnable binary target."""
    rng = np.random.default_rng(seed)
    score = 0.02 * x[:, 0] - 1.5 * x[:, 1] + 0.8 * (x[:, 3] == 0) + rng.normal(0, 0.5, len(x))
    labels: np.ndarray = (score > 1.0).astype(np.float32)
    return labels


def train_model(
    model_dir: Path,
    features: tuple[FeatureSpec, ...],
    x: np.ndarray,
    y: np.ndarray,
    objective: str,
    *,
    version: str = "test-model-1",
    threshold: float = 0.5,
    rounds: int = 20,
) -> Manifest:
    """Train a small booster and save it with its manifest."""
    model_dir.mkdir(parents=True, exist_ok=True)
    dtrain = xgb.DMatrix(x, label=y, feature_names=[f.name for f in features])
    booster = xgb.train({"objective": objective, "max_depth": 3, "nthread": 1}, dtrain, rounds)
    path = model_dir / "model.ubj"
    booster.save_model(str(path))
    manifest = Manifest(
        model_version=version,
        model_file="model.ubj",
        model_sha256=sha256_file(path),
        objective=objective,
        features=features,
        xgboost_version=xgb.__version__,
        threshold=threshold,
    )
    write_manifest(model_dir, manifest)
    return manifest


def train_payment_classifier(
    model_dir: Path, *, threshold: float = 0.5, version: str = "test-model-1"
) -> Manifest:
    """Train the binary classifier over the payment schema."""
    x = payment_matrix(payments(2000, seed=99))
    return train_model(
        model_dir,
        PAYMENT_FEATURES,
        x,
        fraud_labels(x),
        "binary:logistic",
        threshold=threshold,
        version=version,
    )


def write_schema(path: Path, schema: dict[str, Any]) -> Path:
    """Write an Avro schema as JSON and return its path."""
    path.write_text(json.dumps(schema), encoding="utf-8")
    return path


def avro(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    """Encode one record, schemaless."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema), record)
    return buf.getvalue()


def parse_record_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """``fastavro.parse_schema`` of a record schema, typed as the dict it returns for one."""
    parsed = fastavro.parse_schema(schema)
    assert isinstance(parsed, dict), parsed
    return parsed


def read_record(schema: dict[str, Any], payload: bytes | None) -> dict[str, Any]:
    """Decode one schemaless record of the record schema ``schema`` (``payload`` must be set)."""
    assert payload is not None
    record = fastavro.schemaless_reader(io.BytesIO(payload), schema, None)
    assert isinstance(record, dict), record
    return record


# --- Kafka helpers for integration tests ----------------------------------------------------


def read_topic(
    bootstrap: str, topic: str, timeout: float = 60.0, *, isolation: str = "read_committed"
) -> list[Any]:
    """Every record of ``topic`` up to its current end offsets (``clients.read_to_end``)."""
    out: list[Any] = []
    read_to_end(bootstrap, topic, out.append, isolation=isolation, timeout_s=timeout)
    return out


#: The tests' names for the group's committed offsets and lag (``kafka.topics``).
committed_offsets = topics.committed_offsets
committed_lag = topics.group_lag


def high_watermarks(bootstrap: str, topic: str, timeout: float = 60.0) -> dict[int, int]:
    """The high watermark (the offset the next record will get) per partition of ``topic``.

    Retried while the broker is not ready (``kafka.topics.coordinator_busy``, or no connection):
    just after a broker restart a partition can have no leader yet (NOT_LEADER_FOR_PARTITION).
    """
    from confluent_kafka import KafkaError, KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return topic_end_offsets(bootstrap, topic)
        except KafkaException as exc:
            err = exc.args[0]
            busy = topics.coordinator_busy(err) or err.code() == KafkaError._TRANSPORT
            if not busy or time.monotonic() > deadline:
                raise
            threading.Event().wait(0.2)


def produce_raw(
    bootstrap: str,
    topic: str,
    items: Sequence[tuple[bytes | None, bytes | None]],
    partitions: int,
    *,
    per_second: float | None = None,
    settings: dict[str, str] | None = None,
    until: threading.Event | None = None,
    flush_s: float = 30,
) -> int:
    """Produce ``(key, value)`` pairs round-robin over partitions and wait for every ack.

    With ``per_second``, production is paced in chunks of 1% of the items; ``settings``: more
    librdkafka settings (security). Production stops early once ``until`` is set, after a
    whole round over the partitions. Every ack must come within ``flush_s`` after the last
    produce. Returns how many items were produced.
    """
    import threading
    import time

    from confluent_kafka import Producer

    pace = threading.Event()  # never set: its wait() paces production
    started = time.monotonic()
    chunk = max(1, len(items) // 100)

    producer = Producer(
        {
            **(settings or {}),
            "bootstrap.servers": bootstrap,
            "enable.idempotence": "true",
            "linger.ms": "5",
        }
    )
    errors: list[Any] = []
    produced = 0
    for i, (key, value) in enumerate(items):
        if until is not None and i % partitions == 0 and until.is_set():
            break
        produced += 1
        producer.produce(
            topic,
            value=value,
            key=key,
            partition=i % partitions,
            headers=[("origin", b"test")],
            on_delivery=lambda err, _m: errors.append(err) if err else None,
        )
        producer.poll(0)
        if per_second and (i + 1) % chunk == 0:
            pace.wait(max(0.0, started + (i + 1) / per_second - time.monotonic()))
    assert producer.flush(flush_s) == 0
    assert errors == []
    return produced


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    """Poll ``condition`` until it is true; raise TimeoutError naming ``what`` after ``timeout``."""
    import threading
    import time

    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        tick.wait(interval)


def exported_metric_names() -> set[str]:
    """Every series name a worker's or the evaluator's registry can expose (samples or not)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names: set[str] = set()
    families = [
        *Metrics().prometheus.collect(),
        *EvaluationMetrics("model").prometheus.collect(),
    ]
    for family in families:
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return names


def tool(name: str) -> str:
    """Path of a checker the tests run (promtool, hadolint, actionlint, ...); a missing one fails.

    Searched in the virtualenv's scripts, then the cache's ``bin/`` (``make tools`` builds
    actionlint there), then PATH.
    """
    dirs = [str(Path(sys.executable).parent), str(default_cache_dir() / "bin")]
    path = shutil.which(name, path=os.pathsep.join([*dirs, os.environ.get("PATH", "")]))
    if path is None:
        pytest.fail(f"{name} is not installed: run `make setup` (it installs every checker)")
    return path


#: What an ``http_server`` answers a request: ``(method, path)`` to ``(status, JSON body)``.
Answer = Callable[[str, str], tuple[int, Any]]


@contextmanager
def http_server(answer: Answer) -> Iterator[tuple[str, list[tuple[str, str, str | None]]]]:
    """A real HTTP server on 127.0.0.1 (a thread) answering JSON; yields its URL and the
    requests it saw, ``(method, path, Authorization header)``. Stopped on exit.
    """
    seen: list[tuple[str, str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            status, body = answer(self.command, self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = _any

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def rsa_pair(folder: Path) -> tuple[Path, Path]:
    """A 2048-bit RSA key pair as PEM files in ``folder``: (public, private)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_file, private_file = folder / "dlq.pub.pem", folder / "dlq.key.pem"
    public_file.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private_file.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return public_file, private_file


#: The repository's root (its ``schemas/`` folder).
REPO = Path(__file__).parents[1]


def ride_config(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A minimal valid worker configuration for the ride schemas; ``sections`` merge into it."""
    (tmp_path / "model").mkdir(exist_ok=True)
    raw: dict[str, Any] = {
        "kafka": {"bootstrap_servers": "h:1"},
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": str(REPO / "schemas" / "ride_request.v1.avsc"),
            "id_field": "ride_id",
        },
        "output": {"topic": "out", "schema": str(REPO / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp_path / "model")},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def load_raw(tmp_path: Path, raw: dict[str, Any]) -> Any:
    """``load_config`` of ``raw`` written to ``tmp_path/c.yaml`` (no environment)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path, environ={})


#: ``set_dotted``'s value that removes the key.
DELETE = object()


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested ``raw`` (creating tables), or remove it when ``value`` is DELETE."""
    node = raw
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value


def _port_ledger() -> Path:
    """The file naming every port handed out in this test run, shared by pytest-xdist's workers
    (one file per run: ``$PYTEST_XDIST_TESTRUNUID``, or this process without xdist)."""
    import tempfile

    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
    return Path(tempfile.gettempdir()) / f"stream-scorer-test-ports-{run}"


def free_ports(count: int, *, consecutive: bool = False) -> list[int]:
    """Return ``count`` distinct ports free on 127.0.0.1 now and handed out to no other test.

    The ports found are recorded in a ledger shared by every pytest-xdist worker of the run, so
    two workers starting servers at once never pick the same port. With ``consecutive`` the ports
    are ``p, p + 1, ...`` (a server that takes a range).
    """
    import fcntl
    import socket

    with _port_ledger().open("a+") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)  # released when the file closes
        ledger.seek(0)
        taken = {int(line) for line in ledger.read().split()}
        ports: list[int] = []
        for _ in range(200):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                base = int(sock.getsockname()[1])
            want = [base + i for i in range(count)] if consecutive else [base]
            if any(p in taken or p in ports for p in want) or not all(map(_bindable, want)):
                continue
            ports.extend(want)
            if len(ports) >= count:
                break
        assert len(ports) >= count, f"no {count} free ports on 127.0.0.1"
        ledger.write("".join(f"{p}\n" for p in ports[:count]))
        return ports[:count]


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def release_notes() -> Any:
    """``.ci/release_notes.py`` (not a package: loaded from its file), as a module."""
    import importlib.util

    path = Path(__file__).parents[1] / ".ci" / "release_notes.py"
    spec = importlib.util.spec_from_file_location("release_notes", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def http_get(port: int, path: str) -> tuple[int, Any]:
    """GET ``path`` on 127.0.0.1:``port``: the status, and the body (``/metrics``: text, else
    JSON)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    return status, body.decode() if path == "/metrics" else json.loads(body)


def metric_sample(port: int, name: str, labels: dict[str, str]) -> float | None:
    """The value of the sample ``name`` with exactly ``labels`` on ``/metrics``, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    _code, text = http_get(port, "/metrics")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


class OnePipeline:
    """The worker's ``loop.Models`` over one pipeline-like object, for tests of the main loop.

    ``swap(pipeline)`` returns the pipeline of the next batch (the same: no swap).
    """

    def __init__(self, pipeline: Any, swap: Callable[[Any], Any] = lambda p: p) -> None:
        """Score with ``pipeline`` (anything with ``process(batch) -> BatchResult``)."""
        self.pipeline = pipeline
        self._swap = swap

    @property
    def model_version(self) -> str:
        """The pipeline's version, if it has one."""
        return str(getattr(self.pipeline, "version", ""))

    def score(self, batch: Any) -> Any:
        """The pipeline's result for ``batch`` as a ``MultiResult``."""
        from stream_scorer.stages.multi import as_multi

        return as_multi(self.pipeline.process(batch))

    def swap(self) -> bool:
        """Between batches: ask ``swap`` for the next pipeline."""
        new = self._swap(self.pipeline)
        changed, self.pipeline = new is not self.pipeline, new
        return bool(changed)

    def columns(self) -> list[Any]:
        """No decoders to teach writer schemas."""
        return []

    def delivered(self, result: Any) -> None:
        """Nothing counted per model (no slots)."""

    def tick(self) -> None:
        """No drift watched."""


def reference_classifier(p: np.ndarray, y: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Log loss, Brier, exact AUC (all pairs, ties half), precision, recall: numpy only."""
    q = np.clip(p, 1e-15, 1 - 1e-15)
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    tp = float(((labels == 1) & (y == 1)).sum())
    return {
        "log_loss": float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q))),
        "brier": float(np.mean((p - y) ** 2)),
        "auc": float(wins / (len(pos) * len(neg))),
        "precision": tp / float((labels == 1).sum()),
        "recall": tp / float((y == 1).sum()),
    }


def unavailable(why: str) -> NoReturn:
    """A server or tool a test needs is missing: under CI=true the test fails, else it skips."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)
