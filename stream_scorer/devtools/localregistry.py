"""A real Schema Registry on loopback: Apicurio Registry with its Confluent-compatible API.

For development, the demo and the tests on machines without Docker, like ``localkafka``: the
registry (``io.apicurio:apicurio-registry-app``, a ready Quarkus application) comes from Maven
Central into a cache outside the repository and runs as a detached ``java`` process whose pid
and address are kept in a state directory, so ``start``, ``status`` and ``stop`` work across
commands. Its HTTP port and its management port are both bound to 127.0.0.1; storage is an H2
database file in the state directory, so a restarted registry keeps its schemas and ids.
Clients use ``http://127.0.0.1:PORT/apis/ccompat/v7``.

Apicurio 3.3 needs Java 21 or newer: the first of ``$STREAM_SCORER_REGISTRY_JAVA``,
``$JAVA_HOME/bin/java``, ``java`` on PATH and ``/usr/lib/jvm/*/bin/java`` that is new enough.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import tempfile
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
from stream_scorer.errors import LocalRegistryError

APICURIO_VERSION = "3.3.3"
#: The oldest Java the registry runs on.
JAVA_MAJOR = 21
#: The Confluent-compatible API's path under the registry's address.
CCOMPAT_PATH = "/apis/ccompat/v7"

_ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
_JAVA_HINT = (
    "install a Java 21+ JDK (Debian/Ubuntu: apt-get install openjdk-21-jre-headless, or a "
    "Temurin 21/25) and point STREAM_SCORER_REGISTRY_JAVA at its bin/java"
)
_MARKER = ".complete"
_HEAP = ("-Xms64m", "-Xmx512m")
#: Where Debian and Ubuntu install JDKs (searched last).
JVM_ROOT = Path("/usr/lib/jvm")


def _java_major(java: str) -> int | None:
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def find_java() -> str:
    """Return a ``java`` of version 21 or newer (see the module docstring for the search order).

    Raises:
        LocalRegistryError: none was found (the message lists what was tried and what to do).
    """
    candidates: list[str] = []
    explicit = os.environ.get("STREAM_SCORER_REGISTRY_JAVA")
    if explicit:
        candidates.append(explicit)
    home = os.environ.get("JAVA_HOME")
    if home:
        candidates.append(str(Path(home) / "bin" / "java"))
    on_path = shutil.which("java")
    if on_path:
        candidates.append(on_path)
    candidates.extend(str(p) for p in sorted(JVM_ROOT.glob("*/bin/java"), reverse=True))
    tried = []
    for java in dict.fromkeys(candidates):
        major = _java_major(java)
        if major is not None and major >= JAVA_MAJOR:
            return java
        tried.append(f"{java} (Java {major if major is not None else '?'})")
    found = ", ".join(tried) if tried else "no java at all"
    raise LocalRegistryError(
        f"Java {JAVA_MAJOR} or newer is needed to run Apicurio Registry {APICURIO_VERSION}; "
        f"found {found}: {_JAVA_HINT}"
    )


def fetch_registry(cache_dir: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Download Apicurio Registry with Maven and unpack it into the cache; return its folder.

    The application lands in ``<cache>/apicurio-registry-<version>`` (``quarkus-run.jar``,
    ``lib/``, ...). Maven runs only when that folder lacks its completion marker; it is unpacked
    into a temporary folder renamed into place, so a partial download never looks complete.

    Raises:
        LocalRegistryError: Maven is missing or cannot download the artifact.
    """
    home = (cache_dir or default_cache_dir()) / f"apicurio-registry-{APICURIO_VERSION}"
    if (home / _MARKER).is_file():
        return home
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalRegistryError(
            "Maven is needed to fetch Apicurio Registry and `mvn` is not on PATH: install it "
            "(Debian/Ubuntu: apt-get install maven)"
        )
    home.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching {_ARTIFACT} with Maven (about 160 MB)")
    repo = Path(tempfile.mkdtemp(prefix=".m2-", dir=home.parent))
    tmp = Path(tempfile.mkdtemp(prefix=".registry-", dir=home.parent))
    try:
        cmd = [
            mvn, "-B", "-q", "org.apache.maven.plugins:maven-dependency-plugin:2.8:get",
            "-Dtransitive=false", f"-Dartifact={_ARTIFACT}", f"-Dmaven.repo.local={repo}",
        ]  # fmt: skip
        local = Path.home() / ".m2" / "repository"
        archive_name = f"apicurio-registry-app-{APICURIO_VERSION}-all.tar.gz"
        cached = local / "io/apicurio/apicurio-registry-app" / APICURIO_VERSION / archive_name
        if cached.is_file():  # already in the user's Maven repository: no download
            archive = cached
        else:
            try:
                result = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=1800, check=False
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise LocalRegistryError(f"cannot run Maven ({mvn}): {exc}") from exc
            if result.returncode != 0:
                tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
                raise LocalRegistryError(
                    f"Maven could not fetch {_ARTIFACT} (exit {result.returncode}); check that "
                    "Maven Central is reachable. Maven's last lines:\n" + tail
                )
            archive = repo / "io/apicurio/apicurio-registry-app" / APICURIO_VERSION / archive_name
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
        except (OSError, tarfile.TarError) as exc:
            raise LocalRegistryError(f"cannot unpack {archive}: {exc}") from exc
        if not (tmp / "quarkus-run.jar").is_file():
            raise LocalRegistryError(f"{archive} holds no quarkus-run.jar")
        (tmp / _MARKER).write_text(_ARTIFACT + "\n")
        shutil.rmtree(home, ignore_errors=True)
        try:
            tmp.rename(home)
        except OSError as exc:
            if not (home / _MARKER).is_file():  # a concurrent fetch may have won the race
                raise LocalRegistryError(f"cannot move the registry into {home}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)
    log(f"Apicurio Registry in {home}")
    return home


def _answers(url: str, timeout: float = 2.0) -> bool:
    """Whether the Confluent-compatible API at ``url`` answers ``GET /subjects``."""
    return http_ok(f"{url}/subjects", timeout)


class LocalRegistry(LocalServer):
    """One local registry, identified by its state directory (a context manager too)."""

    def __init__(
        self,
        state_dir: Path,
        port: int = 8081,
        management_port: int | None = None,
        cache_dir: Path | None = None,
        *,
        log: Callable[[str], None] = print,
    ) -> None:
        """Describe a registry; nothing starts until ``start``.

        Args:
            state_dir: folder for its output and ``state.json``.
            port: the HTTP port on 127.0.0.1.
            management_port: Quarkus' management port (health, metrics) on 127.0.0.1;
                ``port + 1`` when None.
            cache_dir: where the application is cached; ``default_cache_dir()`` when None.
            log: receives one-line progress messages.
        """
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.management_port = port + 1 if management_port is None else management_port
        if self.management_port == port:
            raise LocalRegistryError(f"the HTTP and management ports must differ (both {port})")
        self.cache_dir = cache_dir
        self.url = f"http://127.0.0.1:{port}{CCOMPAT_PATH}"
        self._log = log
        self._server = ServerProcess(
            self.state_dir,
            "the registry",
            (os.fsencode(self._marker_arg()),),
            LocalRegistryError,
            log,
        )

    def _marker_arg(self) -> str:
        return f"-Dstream.scorer.registry.dir={self.state_dir}"

    def status(self) -> ServerStatus | None:
        """The recorded registry's status (``address``: the ccompat API's URL), or None."""
        return self._server.status("url", _answers)

    def start(self, timeout: float = 90.0) -> str:
        """Start the registry, or report the one running; return the ccompat API's URL.

        Raises:
            LocalRegistryError: a port is taken, Java 21+ or the application is missing, or
                the registry exits or does not answer within ``timeout``.
        """
        status = self.status()
        if status is not None and status.running:
            url = status.address
            self._server.adopt(status.pid, url, lambda: _answers(url), timeout, self._out)
            return url
        self._server.forget()  # stale (that registry is gone), or nothing recorded
        stale = status is not None
        for port, what in ((self.port, "HTTP"), (self.management_port, "management")):
            if not port_free(port, wait_s=30.0 if stale else 0.0):
                raise LocalRegistryError(
                    f"port {port} on 127.0.0.1 (the registry's {what} port) is taken by another "
                    f"process: stop it (see `ss -ltnp 'sport = :{port}'`) or choose another port"
                )
        java = find_java()
        home = fetch_registry(self.cache_dir, log=self._log)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            java, *_HEAP, self._marker_arg(),
            "-Dquarkus.http.host=127.0.0.1", f"-Dquarkus.http.port={self.port}",
            "-Dquarkus.management.host=127.0.0.1",
            f"-Dquarkus.management.port={self.management_port}",
            "-Dquarkus.log.level=WARN", "-Dquarkus.banner.enabled=false",
            # storage in an H2 file of the state directory: a restart keeps every schema and id
            f"-Dapicurio.datasource.url=jdbc:h2:file:{self.state_dir / 'data' / 'registry'}",
            "-Dapicurio.datasource.jdbc.initial-size=2", "-Dapicurio.datasource.jdbc.min-size=2",
            "-Dapicurio.datasource.jdbc.max-size=10",
            "-jar", str(home / "quarkus-run.jar"),
        ]  # fmt: skip
        proc = self._server.spawn(
            cmd,
            self._out,
            {"port": self.port, "management_port": self.management_port, "url": self.url},
        )
        self._server.await_start(proc, self.url, lambda: _answers(self.url), timeout, self._out)
        return self.url

    @property
    def _out(self) -> Path:
        return self.state_dir / "registry.out"
