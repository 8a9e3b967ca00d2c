"""A real MLflow tracking server for the model-registry tests: ``stream-scorer local-mlflow``'s.

The server from the tools virtualenv ``make mlflow-tools`` (``stream-scorer local-mlflow fetch``)
installs (``$STREAM_SCORER_CACHE/mlflow-tools``, by default under ``~/.cache/stream-scorer``),
started as ``local-mlflow start`` starts it: a sqlite backend store and a local artifacts
folder, artifacts served by the server, job execution off. Never installed by a test.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stream_scorer.devtools.localmlflow import LocalMlflow


@contextmanager
def mlflow_server(
    workdir: Path, port: int, *, admin_password: str = "", timeout: float = 120
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1:``port``; yield its URI; stop it.

    With ``admin_password``, the server runs MLflow's basic-auth app, user ``admin``.

    Raises:
        LocalMlflowError: the tools virtualenv is not installed (``make mlflow-tools``), or the
            server exited or did not answer within ``timeout`` seconds.
    """
    server = LocalMlflow(workdir, port=port, admin_password=admin_password)
    try:
        yield server.start(timeout, fetch=False)
    finally:
        server.stop()
