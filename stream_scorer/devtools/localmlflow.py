"""A real MLflow tracking server on loopback: the Model Registry behind ``models:/`` sources.

For development, the tests and a first ``model.source: models:/<name>@<alias>``, like
``localkafka`` and ``localregistry``. mlflow is no dependency of stream-scorer (the worker reads
the model registry over REST), so the server is installed from PyPI into a virtualenv of its own
in the cache (``<cache>/mlflow-tools``, by ``fetch``) and runs as a detached process whose pid and
address are kept in a state directory: a sqlite backend store and an artifacts folder there
(a restarted server keeps its models), artifacts served by the server
(``--serve-artifacts``: the worker downloads through it), job execution off.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from stream_scorer.devtools.localkafka import default_cache_dir
from stream_scorer.devtools.process import (
    LocalServer,
    ServerProcess,
    ServerStatus,
    http_ok,
    port_free,
)
from stream_scorer.errors import LocalMlflowError

MLFLOW_VERSION = "3.17.2"
#: The basic-auth app (Flask-WTF), for servers started with an admin password.
MLFLOW_EXTRAS = "auth"
_PIN = f"{MLFLOW_VERSION}[{MLFLOW_EXTRAS}]"


def tools_dir(cache_dir: Path | None = None) -> Path:
    """The virtualenv ``fetch_mlflow`` installs the server into: ``<cache>/mlflow-tools``."""
    return (cache_dir or default_cache_dir()) / "mlflow-tools"


def _installed(venv: Path) -> bool:
    try:
        pinned = (venv / ".version").read_text().strip()
    except OSError:
        return False
    return (venv / "bin" / "mlflow").is_file() and pinned == _PIN


def fetch_mlflow(cache_dir: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Install ``mlflow[auth]`` (the pinned version) into its own virtualenv; return its folder.

    Does nothing when that version is there already (``<venv>/.version``, written last).

    Raises:
        LocalMlflowError: the virtualenv or the install failed (pip's last lines say why).
    """
    venv = tools_dir(cache_dir)
    if _installed(venv):
        return venv
    log(f"installing mlflow[{MLFLOW_EXTRAS}]=={MLFLOW_VERSION} from PyPI into {venv}")
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    pip = str(venv / "bin" / "pip")
    for cmd in (
        [sys.executable, "-m", "venv", str(venv)],
        [pip, "install", "--quiet", f"mlflow[{MLFLOW_EXTRAS}]=={MLFLOW_VERSION}"],
    ):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LocalMlflowError(f"cannot run {cmd[0]}: {exc}") from exc
        if done.returncode != 0:
            last = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
            raise LocalMlflowError(
                f"installing mlflow failed (exit {done.returncode}); check that PyPI is "
                f"reachable. The last lines:\n{last}"
            )
    (venv / ".version").write_text(_PIN + "\n")  # last: a failed install never looks complete
    log(f"MLflow server in {venv}")
    return venv


def _answers(uri: str, timeout: float = 2.0) -> bool:
    """Whether the server at ``uri`` answers ``GET /health`` (no credentials needed)."""
    return http_ok(f"{uri}/health", timeout)


class LocalMlflow(LocalServer):
    """One local MLflow server, identified by its state directory (a context manager too)."""

    def __init__(
        self,
        state_dir: Path,
        port: int = 5000,
        cache_dir: Path | None = None,
        *,
        admin_password: str = "",
        log: Callable[[str], None] = print,
    ) -> None:
        """Describe a server; nothing starts until ``start``.

        Args:
            state_dir: folder for its database, artifacts, output and ``state.json``.
            port: the HTTP port on 127.0.0.1.
            cache_dir: where the tools virtualenv is; ``default_cache_dir()`` when None.
            admin_password: run MLflow's basic-auth app with user ``admin`` and this password
                (empty: no authentication).
            log: receives one-line progress messages.
        """
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.cache_dir = cache_dir
        self.uri = f"http://127.0.0.1:{port}"
        self._admin_password = admin_password
        self._log = log
        self._server = ServerProcess(
            self.state_dir,
            "the MLflow server",
            (os.fsencode(self._store_uri()),),
            LocalMlflowError,
            log,
            group=True,  # `mlflow server` runs its web server as a child process
        )

    def _store_uri(self) -> str:
        return f"sqlite:///{self.state_dir / 'mlflow.db'}"

    def status(self) -> ServerStatus | None:
        """The recorded server's status (``address``: its tracking URI), or None."""
        return self._server.status("uri", _answers)

    def start(self, timeout: float = 120.0, *, fetch: bool = True) -> str:
        """Start the server, or report the one running; return its tracking URI.

        Args:
            timeout: seconds to wait for it to answer.
            fetch: install the server first when it is missing (``fetch_mlflow``); False:
                a missing one is an error.

        Raises:
            LocalMlflowError: the port is taken, the server is not installed (``fetch``
                False) or cannot be, or it exits or does not answer within ``timeout``.
        """
        status = self.status()
        if status is not None and status.running:
            uri = status.address
            self._server.adopt(status.pid, uri, lambda: _answers(uri), timeout, self._out)
            return uri
        self._server.forget()
        if not port_free(self.port, wait_s=30.0 if status is not None else 0.0):
            raise LocalMlflowError(
                f"port {self.port} on 127.0.0.1 is taken by another process: stop it (see "
                f"`ss -ltnp 'sport = :{self.port}'`) or choose another port"
            )
        venv = tools_dir(self.cache_dir)
        if fetch:
            fetch_mlflow(self.cache_dir, log=self._log)
        elif not _installed(venv):
            raise LocalMlflowError(
                f"no MLflow server in {venv}: `stream-scorer local-mlflow fetch` installs it"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        auth = ["--app-name", "basic-auth"] if self._admin_password else []
        cmd = [
            str(venv / "bin" / "mlflow"), "server",
            "--backend-store-uri", self._store_uri(),
            "--artifacts-destination", str(self.state_dir / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1", *auth,
        ]  # fmt: skip
        auth_ini = self.state_dir / "basic_auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{self.state_dir / 'basic_auth.db'}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env = {  # its own interpreter: none of this one's PYTHONPATH, PYTHONWARNINGS, ...
            **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_ADMIN_PASSWORD": self._admin_password,
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "stream-scorer-local",
        }
        proc = self._server.spawn(cmd, self._out, {"uri": self.uri}, env)
        self._server.await_start(proc, self.uri, lambda: _answers(self.uri), timeout, self._out)
        return self.uri

    @property
    def _out(self) -> Path:
        return self.state_dir / "mlflow.out"
