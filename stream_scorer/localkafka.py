"""A real single-node Apache Kafka broker (KRaft, broker+controller) on loopback.

For development, the demo and the tests, on machines without Docker: the broker jars come
from Maven Central (``deploy/local-kafka/pom.xml``) into a cache outside the repository, and
the broker runs as a detached ``java`` process whose pid and address are kept in a state
directory, so ``start``, ``status`` and ``stop`` work across commands.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from stream_scorer.errors import LocalKafkaError

KAFKA_VERSION = "4.1.1"
_MARKER = ".complete"
_STATE = "state.json"


def default_cache_dir() -> Path:
    """Return ``$STREAM_SCORER_CACHE``, else ``~/.cache/stream-scorer``."""
    env = os.environ.get("STREAM_SCORER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "stream-scorer"


def find_pom() -> Path:
    """Return the pom that resolves the broker jars (``deploy/local-kafka/pom.xml``)."""
    pom = Path(__file__).resolve().parents[1] / "deploy" / "local-kafka" / "pom.xml"
    if not pom.is_file():
        raise LocalKafkaError(f"{pom} is missing: run from a checkout of the repository")
    return pom


def _java_major() -> int:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            "Java 17 or newer is needed to run the local Kafka broker and was not found: "
            "install it (Debian/Ubuntu: apt-get install openjdk-17-jre-headless)"
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise LocalKafkaError(f"cannot tell the Java version from: {out.stderr.strip()[:200]}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


def fetch_jars(cache_dir: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Resolve Apache Kafka's broker jars with Maven into the cache; return their folder.

    Raises:
        LocalKafkaError: Java or Maven is missing, or Maven cannot download the jars.
    """
    libs = (cache_dir or default_cache_dir()) / f"kafka-{KAFKA_VERSION}" / "libs"
    if (libs / _MARKER).is_file():
        return libs
    major = _java_major()
    if major < 17:
        raise LocalKafkaError(f"Kafka {KAFKA_VERSION} needs Java 17 or newer, found Java {major}")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "Maven is needed to fetch Kafka's broker jars and was not found: "
            "install it (Debian/Ubuntu: apt-get install maven)"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching org.apache.kafka:kafka_2.13:{KAFKA_VERSION} and its dependencies with Maven ...")
    tmp = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    cmd = [
        mvn, "-B", "-q", "-f", str(find_pom()), "dependency:copy-dependencies",
        f"-DoutputDirectory={tmp}", "-DincludeScope=runtime", f"-Dkafka.version={KAFKA_VERSION}",
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise LocalKafkaError(
            "Maven could not fetch Kafka's broker jars. Check that Maven Central is reachable "
            f"(proxy or mirror settings in ~/.m2/settings.xml). Maven said:\n{tail}"
        )
    (tmp / _MARKER).write_text(KAFKA_VERSION)
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    log(f"broker jars in {libs}")
    return libs


@dataclass(frozen=True)
class BrokerStatus:
    """What the state directory says about a broker, checked against reality."""

    pid: int
    bootstrap: str
    running: bool
    answering: bool


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True


def _answers(bootstrap: str, timeout: float = 3.0) -> bool:
    from confluent_kafka.admin import AdminClient

    try:
        admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": "0"})
        return bool(admin.list_topics(timeout=timeout).brokers)
    except Exception:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
log.retention.hours=24
"""

_LOG4J2 = """\
Configuration:
  status: warn
  Appenders:
    File:
      name: file
      fileName: "{log}"
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: warn
      AppenderRef:
        - ref: file
"""


class LocalKafka:
    """One local broker, identified by its state directory."""

    def __init__(
        self,
        state_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        """Describe a broker; nothing starts until ``start``."""
        self.state_dir = state_dir
        self.port = port
        self.controller_port = controller_port or port + 1
        self.cache_dir = cache_dir
        self.bootstrap = f"127.0.0.1:{port}"
        self._proc: subprocess.Popen[bytes] | None = None  # kept so it is reaped, not leaked

    def _state(self) -> dict[str, object] | None:
        try:
            raw = json.loads((self.state_dir / _STATE).read_text())
        except (OSError, ValueError):
            return None
        return raw if isinstance(raw, dict) else None

    def status(self) -> BrokerStatus | None:
        """Return the recorded broker's status, or None when none is recorded."""
        state = self._state()
        if state is None:
            return None
        pid, bootstrap = int(str(state["pid"])), str(state["bootstrap"])
        running = _alive(pid)
        return BrokerStatus(pid, bootstrap, running, running and _answers(bootstrap))

    def _tail(self, lines: int = 30) -> str:
        out = []
        for name in ("broker.out", "server.log"):
            path = self.state_dir / name
            if path.is_file():
                text = path.read_text(errors="replace").strip().splitlines()[-lines:]
                out.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(out)

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker (or report the one running) and return its bootstrap address.

        Raises:
            LocalKafkaError: a port is taken, the jars cannot be fetched, or the broker does
                not answer a metadata request within ``timeout``.
        """
        status = self.status()
        if status is not None and status.running:
            if status.answering or _answers(status.bootstrap, timeout=10):
                print(f"a local Kafka broker already runs at {status.bootstrap} (pid {status.pid})")
                return status.bootstrap
            raise LocalKafkaError(
                f"pid {status.pid} from {self.state_dir} runs but does not answer at "
                f"{status.bootstrap}: stop it with `stream-scorer local-kafka stop`\n{self._tail()}"
            )
        for port in (self.port, self.controller_port):
            if not _port_free(port):
                raise LocalKafkaError(
                    f"port {port} on 127.0.0.1 is taken: stop the process using it "
                    f"(e.g. `ss -ltnp 'sport = :{port}'`) or choose another with --port"
                )
        libs = fetch_jars(self.cache_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = self.state_dir / "data"
        props = self.state_dir / "server.properties"
        props.write_text(_PROPERTIES.format(port=self.port, cport=self.controller_port, data=data))
        log4j = self.state_dir / "log4j2.yaml"
        log4j.write_text(_LOG4J2.format(log=self.state_dir / "server.log"))
        java = ["java", "-Xms256m", "-Xmx1g", f"-Dlog4j2.configurationFile={log4j}",
                "-cp", f"{libs}/*"]  # fmt: skip
        if not (data / "meta.properties").is_file():
            uuid = subprocess.run(
                [*java, "kafka.tools.StorageTool", "random-uuid"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]  # fmt: skip
            fmt = subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", "-t", uuid, "-c", str(props)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise LocalKafkaError(f"formatting {data} failed:\n{fmt.stdout}{fmt.stderr}")
        with (self.state_dir / "broker.out").open("w") as out:
            proc = subprocess.Popen(
                [*java, "kafka.Kafka", str(props)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self._proc = proc
        state = {"pid": proc.pid, "port": self.port, "controller_port": self.controller_port,
                 "bootstrap": self.bootstrap, "started_at": time.time()}  # fmt: skip
        (self.state_dir / _STATE).write_text(json.dumps(state))
        deadline = time.monotonic() + timeout
        while not _answers(self.bootstrap, timeout=2.0):
            if proc.poll() is not None:
                (self.state_dir / _STATE).unlink(missing_ok=True)
                raise LocalKafkaError(
                    f"the broker exited with code {proc.returncode} while starting\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise LocalKafkaError(
                    f"the broker did not answer within {timeout:.0f} s\n{self._tail()}"
                )
            time.sleep(0.2)
        return self.bootstrap

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the recorded broker (SIGTERM, then SIGKILL if it hangs); return whether one ran."""
        state = self._state()
        if state is None:
            return False
        pid = int(str(state["pid"]))
        was_running = _alive(pid)
        if was_running:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                while _alive(pid):
                    time.sleep(0.05)
        if self._proc is not None and self._proc.pid == pid:
            self._proc.wait()
            self._proc = None
        (self.state_dir / _STATE).unlink(missing_ok=True)
        return was_running

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
