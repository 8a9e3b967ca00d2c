"""A real PostgreSQL server on loopback, from the machine's own (Debian) packages.

For development, ``sink postgres``'s tests and its benchmark on machines without Docker, like
``localkafka``: the server binaries are the distribution's (``/usr/lib/postgresql/<major>/bin``
on Debian and Ubuntu, the newest major installed, or ``$STREAM_SCORER_PG_BIN``, or ``initdb`` on
PATH), the cluster lives in a temporary folder of its own (made once per state directory,
``initdb`` with trust authentication for local connections) and the server runs as a detached
``postgres`` process whose pid and address are kept in the state directory, so ``start``,
``status`` and ``stop`` work across commands. ``stop`` keeps the cluster (a later ``start``
serves the same data); ``destroy`` removes it.

PostgreSQL refuses to run as root: run as root (a container, this project's CI machine), the
server, ``initdb`` and ``pg_ctl`` run as the unprivileged ``postgres`` user through ``runuser``
(no password, no PAM session), and the cluster's folder is theirs. The server listens on
127.0.0.1 and on a Unix socket in the cluster's folder, with durability off (``fsync``,
``synchronous_commit`` and ``full_page_writes``: a throwaway development server).

State directory layout: ``cluster`` (the path of the cluster folder), ``postgres.out`` (the
server's output) and, while a server runs, ``state.json``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from stream_scorer.devtools.process import LocalServer, ServerProcess, ServerStatus, port_free
from stream_scorer.errors import LocalPostgresError

#: Where Debian and Ubuntu install each PostgreSQL major version's binaries.
DEBIAN_ROOT = Path("/usr/lib/postgresql")
#: The unprivileged user the server runs as when started by root.
SERVER_USER = "postgres"
#: The database role ``initdb`` creates (the superuser of the local cluster).
SUPERUSER = "postgres"
_HINT = "Debian/Ubuntu: apt-get install postgresql (or `make setup`)"
_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=50",
)


def find_bin() -> Path:
    """Return the folder of the PostgreSQL server binaries (``initdb``, ``postgres``, ``pg_ctl``).

    The first of ``$STREAM_SCORER_PG_BIN``, the newest ``/usr/lib/postgresql/<major>/bin``
    holding ``initdb``, and the folder of ``initdb`` on PATH.

    Raises:
        LocalPostgresError: none was found.
    """
    explicit = os.environ.get("STREAM_SCORER_PG_BIN")
    if explicit:
        if (Path(explicit) / "initdb").is_file():
            return Path(explicit)
        raise LocalPostgresError(f"STREAM_SCORER_PG_BIN={explicit} holds no initdb")
    majors = []
    for folder in DEBIAN_ROOT.glob("*/bin"):
        version = folder.parent.name
        if re.fullmatch(r"\d+(\.\d+)?", version) and (folder / "initdb").is_file():
            majors.append((float(version), folder))
    if majors:
        return max(majors)[1]
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise LocalPostgresError(
        f"no PostgreSQL server binaries (initdb) in {DEBIAN_ROOT}/<version>/bin nor on PATH: "
        f"install them ({_HINT}) or point STREAM_SCORER_PG_BIN at their folder"
    )


def _as_server_user(cmd: list[str]) -> list[str]:
    """``cmd`` run as ``postgres`` when this process is root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", SERVER_USER, "--", *cmd]


class LocalPostgres(LocalServer):
    """One local PostgreSQL server, identified by its state directory.

    ``with LocalPostgres(path, port=p) as dsn: ...`` starts it (or reuses the one running) and
    stops it on exit (the cluster stays until ``destroy``).
    """

    def __init__(
        self, state_dir: Path, port: int = 5433, *, log: Callable[[str], None] = print
    ) -> None:
        """Describe a server; nothing starts until ``start``.

        Args:
            state_dir: folder for ``state.json``, the server's output and the cluster's path.
            port: the TCP port on 127.0.0.1 (the socket file is named after it too).
            log: receives one-line progress messages.
        """
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self._log = log
        self._server = ServerProcess(
            self.state_dir,
            "the PostgreSQL server",
            (b"-p", str(port).encode()),
            LocalPostgresError,
            log,
            group=True,  # runuser and the postmaster, its backends
        )

    @property
    def cluster(self) -> Path | None:
        """The cluster's folder (``data/`` and the socket folder ``run/``), or None (not made)."""
        try:
            path = Path((self.state_dir / "cluster").read_text().strip())
        except OSError:
            return None
        return path if (path / "data" / "PG_VERSION").is_file() else None

    def dsn(self, dbname: str = "postgres") -> str:
        """The libpq connection string of ``dbname`` as the superuser, over the Unix socket."""
        cluster = self.cluster
        host = str(cluster / "run") if cluster is not None else "127.0.0.1"
        return f"host={host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def tcp_dsn(self, dbname: str = "postgres") -> str:
        """The libpq connection string of ``dbname`` as the superuser, over TCP on loopback."""
        return f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname}"

    def _out(self) -> Path:
        return self.state_dir / "postgres.out"

    def _answers(self) -> bool:
        cluster = self.cluster
        if cluster is None:
            return False
        try:
            done = subprocess.run(
                [str(find_bin() / "pg_isready"), "-q", "-h", str(cluster / "run"),
                 "-p", str(self.port), "-U", SUPERUSER, "-t", "2"],
                capture_output=True, timeout=10, check=False,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0

    def status(self) -> ServerStatus | None:
        """The recorded server's status, or None when none is recorded."""
        recorded = self._server.recorded()
        if recorded is None:
            return None
        pid = recorded["pid"]
        running = self._server.is_ours(pid)
        return ServerStatus(pid, self.dsn(), running, running and self._answers())

    def _make_cluster(self, bin_dir: Path) -> Path:
        """Make the cluster's folder and run ``initdb`` in it (once per state directory)."""
        cluster = self.cluster
        if cluster is not None:
            return cluster
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # a folder of its own under the system's temporary folder: reachable by the server user
        # whatever the state directory's parents allow (pytest's are owner-only)
        cluster = Path(tempfile.mkdtemp(prefix="stream-scorer-pg-"))
        (cluster / "run").mkdir()
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SERVER_USER)
            except KeyError as exc:
                raise LocalPostgresError(
                    f"running as root, the server must run as the user {SERVER_USER!r}, which "
                    f"does not exist ({_HINT} creates it)"
                ) from exc
            for path in (cluster, cluster / "run"):
                os.chown(path, user.pw_uid, user.pw_gid)
            cluster.chmod(0o755)
        cmd = _as_server_user(
            [str(bin_dir / "initdb"), "-D", str(cluster / "data"), "-A", "trust",
             "-U", SUPERUSER, "--no-sync", "-E", "UTF8"]
        )  # fmt: skip
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            shutil.rmtree(cluster, ignore_errors=True)
            raise LocalPostgresError(f"initdb failed: {exc}") from exc
        if done.returncode != 0:
            shutil.rmtree(cluster, ignore_errors=True)
            out = (done.stdout + done.stderr).strip()[-2000:]
            raise LocalPostgresError(f"initdb exited with {done.returncode}:\n{out}")
        (self.state_dir / "cluster").write_text(f"{cluster}\n")
        return cluster

    def start(self, timeout: float = 60.0) -> str:
        """Start the server, or report the one running; return its connection string.

        Raises:
            LocalPostgresError: no binaries, the port is taken, ``initdb`` fails, or the server
                exits or does not accept connections within ``timeout`` (with its last output).
        """
        recorded = self._server.recorded()
        if recorded is not None and self._server.is_ours(recorded["pid"]):
            self._server.adopt(recorded["pid"], self.dsn(), self._answers, timeout, self._out())
            return self.dsn()
        self._server.forget()
        if not port_free(self.port, wait_s=5.0):
            raise LocalPostgresError(
                f"port {self.port} on 127.0.0.1 is taken by another process: choose another "
                "with --port"
            )
        bin_dir = find_bin()
        cluster = self._make_cluster(bin_dir)
        (cluster / "data" / "postmaster.pid").unlink(missing_ok=True)  # left by a kill -9
        cmd = [str(bin_dir / "postgres"), "-D", str(cluster / "data"), "-p", str(self.port),
               "-k", str(cluster / "run")]  # fmt: skip
        for setting in _SETTINGS:
            cmd += ["-c", setting]
        proc = self._server.spawn(
            _as_server_user(cmd), self._out(), {"port": self.port, "cluster": str(cluster)}
        )
        self._server.await_start(proc, self.dsn(), self._answers, timeout, self._out())
        return self.dsn()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded server (fast shutdown: open sessions are ended); keep the cluster.

        Returns whether one was running.
        """
        recorded = self._server.recorded()
        cluster = self.cluster
        running = recorded is not None and self._server.is_ours(recorded["pid"])
        if running and cluster is not None:
            # SIGINT to the postmaster is PostgreSQL's fast shutdown (SIGTERM waits for clients)
            cmd = [str(find_bin() / "pg_ctl"), "-D", str(cluster / "data"), "-m", "fast",
                   "-w", "-t", str(int(timeout)), "stop"]  # fmt: skip
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # then SIGTERM/KILL
                subprocess.run(
                    _as_server_user(cmd), capture_output=True, timeout=timeout + 10, check=False
                )
            self._server.reap(timeout)  # runuser exits once the server has
        return self._server.stop(timeout) or running

    def destroy(self) -> None:
        """Stop the server and remove its cluster (the data is gone)."""
        self.stop()
        cluster = self.cluster
        if cluster is not None:
            shutil.rmtree(cluster, ignore_errors=True)
        (self.state_dir / "cluster").unlink(missing_ok=True)
