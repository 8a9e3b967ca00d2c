"""Health: the HTTP endpoints, readiness and liveness checks, and the progress watchdog.

One small threaded HTTP server per worker process serves ``/metrics`` (Prometheus),
``/healthz`` (liveness) and ``/readyz`` (readiness) on ``metrics.port``
(docs/manual/observability.md, "Health").
A background thread refreshes the per-partition lag gauges and runs the watchdog every second,
so a main loop that is stuck is still reported.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

from stream_scorer.config import Config
from stream_scorer.errors import ConfigError
from stream_scorer.kafka.topics import TP
from stream_scorer.worker.lag import LagTracker
from stream_scorer.worker.metrics import ConsumerMetrics

log = logging.getLogger(__name__)


@dataclass
class _Progress:
    offset: int
    since: float
    lag: int = 0
    stalled: bool = False


class Watchdog:
    """Per partition: lag > 0 while the committed offset has not moved for ``stall_timeout_s``.

    ``observe`` takes the latest ``(committed offset, lag records, lag seconds)`` per owned
    partition; ``evaluate`` says which are stalled and logs one warning when a partition
    stalls and one line when it recovers. Thread-safe.
    """

    def __init__(self, stall_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Create a watchdog with no partitions."""
        self._timeout = stall_timeout_s
        self._clock = clock
        self._parts: dict[TP, _Progress] = {}
        self._lock = threading.Lock()

    def observe(self, lags: Mapping[TP, tuple[int, int, float]]) -> None:
        """Record the current committed offset and lag of every owned partition."""
        now = self._clock()
        with self._lock:
            for tp in set(self._parts) - set(lags):
                del self._parts[tp]  # no longer ours
            for tp, (offset, lag, _seconds) in lags.items():
                part = self._parts.get(tp)
                if part is None:
                    self._parts[tp] = _Progress(offset, now, lag)
                    continue
                if offset != part.offset or part.lag == 0:  # moved, or lag just appeared
                    part.offset, part.since = offset, now
                part.lag = lag

    def evaluate(self) -> dict[TP, bool]:
        """Return whether each partition is stalled; log transitions."""
        now = self._clock()
        out: dict[TP, bool] = {}
        with self._lock:
            for tp, part in sorted(self._parts.items()):
                stalled = part.lag > 0 and now - part.since >= self._timeout
                fields = {"topic": tp[0], "partition": tp[1], "offset": part.offset}
                if stalled and not part.stalled:
                    log.warning(
                        "partition stalled: lag %d records, committed offset %d unchanged for "
                        "%.0f s (health.stall_timeout_s = %g)",
                        part.lag,
                        part.offset,
                        now - part.since,
                        self._timeout,
                        extra={**fields, "lag_records": part.lag},
                    )
                elif part.stalled and not stalled:
                    log.info("partition recovered: committed offset %d", part.offset, extra=fields)
                part.stalled = stalled
                out[tp] = stalled
        return out


class BacklogView(Protocol):
    """A share group's backlog as one worker sees it (``worker.share.ShareBacklog``)."""

    def records(self, timeout_s: float = 5.0) -> dict[TP, int]: ...  # noqa: D102


class SourceView(Protocol):
    """What the monitor reads from the consumer (``stream_scorer.worker.source.Source``)."""

    lag: LagTracker
    joined: bool

    @property
    def backlog(self) -> BacklogView | None: ...  # noqa: D102

    @property
    def broker_reachable(self) -> bool: ...  # noqa: D102
    @property
    def assignment(self) -> set[TP]: ...  # noqa: D102


class Monitor:
    """Readiness, liveness, lag gauges and the watchdog of one worker; serves them over HTTP.

    The scoring worker's (``model_version`` given: the model checks are part of readiness) and
    ``sink postgres``'s (``model_version`` None; its own checks set with ``check``).
    """

    def __init__(
        self,
        cfg: Config,
        metrics: ConsumerMetrics,
        model_version: str | None,
        interval_s: float = 1.0,
    ) -> None:
        """Prepare the monitor; ``__enter__`` starts the server and the refresh thread."""
        self._cfg = cfg
        self._metrics = metrics
        self._model_version = model_version
        self._interval = interval_s
        self._source: SourceView | None = None
        self._started = time.time()
        self._scorable = False
        self._stalled: dict[TP, bool] = {}
        self._published: set[TP] = set()
        self.watchdog = Watchdog(cfg.health.stall_timeout_s)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()
        self._checks: dict[str, bool] = {}

    def check(self, name: str, ok: bool) -> None:
        """Set a readiness check of the process's own (``sink postgres``: the database)."""
        self._checks[name] = ok

    def set_model_version(self, version: str) -> None:
        """The model version a swap brought in (``/readyz`` shows it)."""
        self._model_version = version

    def scorable(self) -> None:
        """The pipeline scored a warm-up batch: the first real batch can be scored now."""
        self._scorable = True

    def watch(self, source: SourceView) -> None:
        """Start following ``source`` (its assignment, broker state and lag)."""
        self._source = source

    # --- checks ------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Update the lag gauges (and a share group's backlog), the watchdog and the readiness."""
        with self._lock:
            if self._source is not None:
                snapshot = self._source.lag.snapshot()
                self.watchdog.observe(snapshot)
                self._stalled = self.watchdog.evaluate()
                self._metrics.update_partitions(snapshot, self._stalled)
                # a partition revoked while this ran may have been set again: drop it
                gone = self._published - snapshot.keys()
                self._metrics.forget_partitions(sorted(gone))
                self._published = set(snapshot)
                if self._source.backlog is not None:
                    self._metrics.update_share_backlog(self._source.backlog.records())
            ready, _body = self.readiness()
            self._metrics.ready.set(1 if ready else 0)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Return whether the worker is ready, and the JSON body saying which check fails."""
        src = self._source
        stalled = sorted(f"{t}/{p}" for (t, p), s in self._stalled.items() if s)
        checks: dict[str, bool] = {}
        if self._model_version is not None:  # a scoring worker
            checks["model_loaded"] = bool(self._model_version)
            checks["pipeline_warm"] = self._scorable
        checks.update(self._checks)
        checks.update(
            broker_reachable=src is not None and src.broker_reachable,
            assignment_received=src is not None and src.joined,
            no_stalled_partitions=not stalled,
        )
        failing = [name for name, ok in checks.items() if not ok]
        body: dict[str, Any] = {
            "ready": not failing,
            "checks": checks,
            "failing": failing,
            "stalled_partitions": stalled,
            "assigned_partitions": len(src.assignment) if src is not None else 0,
            "model_version": self._model_version,
        }
        return not failing, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Return whether the main loop has progressed within ``health.liveness_timeout_s``."""
        sample = self._metrics.prometheus.get_sample_value(
            "stream_scorer_last_progress_timestamp_seconds"
        )
        last = max(sample or 0.0, self._started)
        age = time.time() - last
        limit = self._cfg.health.liveness_timeout_s
        alive = age <= limit
        return alive, {"alive": alive, "seconds_since_progress": round(age, 3), "limit_s": limit}

    # --- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        if self._cfg.metrics.port:
            host, port = self._cfg.metrics.host, self._cfg.metrics.port
            try:
                self._server = _make_server(self, host, port, tls_context(self._cfg))
            except OSError as exc:
                raise ConfigError(
                    "metrics.port", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from exc
            self._spawn(self._server.serve_forever, "http")
        self._spawn(self._refresh_loop, "watchdog")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def port(self) -> int | None:
        """The port actually bound (None when the endpoint is disabled)."""
        return None if self._server is None else int(self._server.server_address[1])

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=f"stream-scorer-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
            except Exception:  # never let the monitor thread die silently
                log.exception("health refresh failed")


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The HTTPS context of ``metrics.tls_cert``/``tls_key``, or None (plain HTTP).

    Every HTTP endpoint of the process uses it (the worker's, the sink's, the evaluator's).

    Raises:
        ConfigError: the certificate or key cannot be loaded.
    """
    cert, key = cfg.metrics.tls_cert, cfg.metrics.tls_key
    if cert is None or key is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("metrics.tls_cert", f"cannot load {cert} with {key}: {exc}") from exc
    return context


class _HttpsServer(ThreadingHTTPServer):
    """Each connection's TLS handshake happens in its own thread, bounded in time."""

    context: ssl.SSLContext

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Wrap the connection in TLS (the handshake bounded), serve it, close it."""
        request.settimeout(_HANDSHAKE_S)
        tls = self.context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
            super().finish_request(tls, client_address)
        except (OSError, ssl.SSLError) as exc:
            log.debug("https: connection from %s failed: %s", client_address, exc)
        finally:
            self.shutdown_request(tls)


#: How long a client of the HTTPS endpoint may take over its TLS handshake.
_HANDSHAKE_S = 10.0


#: A path's answer: HTTP status, body, content type.
Route = Callable[[], tuple[int, bytes, str]]


def _make_server(
    monitor: Monitor, host: str, port: int, tls: ssl.SSLContext | None = None
) -> ThreadingHTTPServer:
    metrics = monitor._metrics

    def as_json(answer: tuple[bool, dict[str, Any]]) -> tuple[int, bytes, str]:
        ok, body = answer
        return 200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json"

    def ready() -> tuple[int, bytes, str]:
        monitor.refresh()
        return as_json(monitor.readiness())

    routes: dict[str, Route] = {
        "/metrics": lambda: (200, metrics.render(), CONTENT_TYPE_LATEST),
        "/healthz": lambda: as_json(monitor.liveness()),
        "/readyz": ready,
    }
    return http_server(host, port, routes, tls)


def http_server(
    host: str, port: int, routes: Mapping[str, Route], tls: ssl.SSLContext | None = None
) -> ThreadingHTTPServer:
    """A threaded HTTP server answering GET on ``routes`` (HTTPS with ``tls``), not yet serving.

    Each request runs in its own daemon thread; with TLS, so does each handshake, bounded in
    time, so a client that never completes one blocks nobody. Raises OSError when it cannot
    listen.
    """
    missing = f"not found: try {', '.join(routes)}\n".encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            code, data, content_type = (404, missing, "text/plain") if route is None else route()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http: " + format, *args)

    if tls is None:
        server = ThreadingHTTPServer((host, port), Handler)
    else:
        server = _HttpsServer((host, port), Handler)
        server.context = tls
    server.daemon_threads = True
    return server
