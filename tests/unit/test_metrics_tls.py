"""The metrics and health endpoint over HTTPS (``metrics.tls_cert``/``tls_key``)."""

from __future__ import annotations

import socket
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support import free_ports

from stream_scorer.config import Config, load_config
from stream_scorer.devtools.tls import make_tls
from stream_scorer.errors import ConfigError
from stream_scorer.worker.health import Monitor
from stream_scorer.worker.metrics import Metrics

SCHEMA = str(Path(__file__).parents[2] / "schemas" / "prediction.v1.avsc")


def _cfg(tmp_path: Path, metrics: dict[str, Any]) -> Config:
    (tmp_path / "model").mkdir(exist_ok=True)
    raw = {
        "kafka": {"bootstrap_servers": "127.0.0.1:1"},
        "input": {"topic": "in", "group_id": "g", "schema": SCHEMA, "id_field": "id"},
        "output": {"topic": "out", "schema": SCHEMA},
        "dead_letter": {"topic": "dlq"},
        "model": {"path": str(tmp_path / "model")},
        "metrics": metrics,
    }
    return load_config(None, environ={}, overrides=raw)


def test_the_endpoint_serves_https_on_the_chosen_address_and_no_plain_http(
    tmp_path: Path,
) -> None:
    files = make_tls(tmp_path / "tls")
    port = free_ports(1)[0]
    cfg = _cfg(
        tmp_path,
        {
            "port": port,
            "host": "127.0.0.1",
            "tls_cert": str(files.server_cert),
            "tls_key": str(files.server_key),
        },
    )
    metrics = Metrics()
    with Monitor(cfg, metrics, "m-1") as monitor:
        assert monitor.port == port
        trusting = ssl.create_default_context(cafile=str(files.ca))
        url = f"https://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5, context=trusting) as resp:
            assert resp.status == 200
            assert b"stream_scorer_model_info" in resp.read()
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context())
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        # a client that never completes its handshake does not block the others
        with (
            socket.create_connection(("127.0.0.1", port)),
            urllib.request.urlopen(url, timeout=5, context=trusting) as resp,
        ):
            assert resp.status == 200


def test_cert_and_key_come_together(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "tls")
    with pytest.raises(ConfigError, match=r"metrics\.tls_key: is required"):
        _cfg(tmp_path, {"tls_cert": str(files.server_cert)})
    cfg = _cfg(
        tmp_path, {"port": free_ports(1)[0], "tls_cert": str(files.ca), "tls_key": str(files.ca)}
    )
    with pytest.raises(ConfigError, match=r"metrics\.tls_cert: cannot load"):
        Monitor(cfg, Metrics(), "m").__enter__()


def test_the_evaluators_metrics_use_the_same_https_and_only_serve_metrics(tmp_path: Path) -> None:
    """``stream-scorer evaluate`` serves its /metrics with ``metrics.tls_cert``/``tls_key`` too."""
    from stream_scorer.evaluate.metrics import EvaluationMetrics
    from stream_scorer.evaluate.runner import serve_metrics
    from stream_scorer.worker.health import tls_context

    files = make_tls(tmp_path / "tls")
    metrics = {"tls_cert": str(files.server_cert), "tls_key": str(files.server_key)}
    port = free_ports(1)[0]
    server = serve_metrics(
        EvaluationMetrics("m"), "127.0.0.1", port, tls_context(_cfg(tmp_path, metrics))
    )
    assert server is not None
    try:
        trusting = ssl.create_default_context(cafile=str(files.ca))
        url = f"https://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/metrics", timeout=5, context=trusting) as resp:
            assert resp.status == 200
            assert b"stream_scorer_evaluation_" in resp.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"{url}/healthz", timeout=5, context=trusting)
        assert missing.value.code == 404 and b"try /metrics" in missing.value.read()
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    # port 0: no server; a port taken: a configuration error naming the field
    assert serve_metrics(EvaluationMetrics("m"), "127.0.0.1", 0) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=r"evaluate\.metrics_port: cannot listen"):
            serve_metrics(EvaluationMetrics("m"), "127.0.0.1", busy)
