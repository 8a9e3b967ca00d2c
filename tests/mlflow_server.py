"""A real MLflow tracking server for the model-registry tests.

``mlflow server`` from the tools virtualenv ``make mlflow-tools`` installs
(``$STREAM_SCORER_CACHE/mlflow-tools``, by default under ``~/.cache/stream-scorer``): a sqlite
backend store and a local artifacts folder, artifacts served by the server, job execution off.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import wait_for

CACHE = Path(os.environ.get("STREAM_SCORER_CACHE") or Path.home() / ".cache" / "stream-scorer")
MLFLOW = CACHE / "mlflow-tools" / "bin" / "mlflow"


def _answers(uri: str) -> bool:  # /health answers without credentials
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _auth_config(workdir: Path) -> Path:
    """The basic-auth app's configuration: its user database in ``workdir``."""
    path = workdir / "basic_auth.ini"
    path.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{workdir / 'basic_auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    return path


@contextmanager
def mlflow_server(
    workdir: Path, port: int, *, admin_password: str = "", timeout: float = 120
) -> Iterator[str]:
    """Run ``mlflow server`` on 127.0.0.1:``port``; yield its URI; stop it.

    With ``admin_password``, the server runs MLflow's basic-auth app, user ``admin``.

    Raises:
        FileNotFoundError: the tools virtualenv is not installed (``make mlflow-tools``).
        TimeoutError: the server did not answer within ``timeout`` seconds.
    """
    if not MLFLOW.is_file():
        raise FileNotFoundError(f"no {MLFLOW}: run `make mlflow-tools`")
    workdir.mkdir(parents=True, exist_ok=True)
    log = (workdir / "mlflow.log").open("wb")
    proc = subprocess.Popen(
        [
            str(MLFLOW),
            "server",
            "--backend-store-uri",
            f"sqlite:///{workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(workdir / "artifacts"),
            "--serve-artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            *(["--app-name", "basic-auth"] if admin_password else []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(workdir)),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "stream-scorer-tests",
        },
        cwd=workdir,
        start_new_session=True,  # its own process group: the server's workers stop with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: proc.poll() is not None or _answers(uri), timeout, "mlflow server up")
        if proc.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited {proc.returncode}: "
                + (workdir / "mlflow.log").read_text(errors="replace")[-2000:]
            )
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
