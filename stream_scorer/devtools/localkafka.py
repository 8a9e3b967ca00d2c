"""A real single-node Apache Kafka broker (KRaft, broker+controller) on loopback.

For development, the demo and the tests on machines without Docker: the broker jars come
from Maven Central (the package's ``local-kafka-pom.xml``) into a cache outside the repository, and
the broker runs as a detached ``java`` process whose pid and address are kept in a state
directory, so ``start``, ``status`` and ``stop`` work across commands and processes.

State directory layout: ``server.properties``, ``log4j2.properties``, ``data/`` (the log
dirs), ``broker.out`` (the JVM's stdout and stderr), ``server.log`` (WARN and above) and,
while a broker runs, ``state.json``.

``secure=True`` (``local-kafka start --secure``): the client listener is SASL_SSL (SCRAM-SHA-512)
with a throwaway CA and broker certificate (``tls/``), the StandardAuthorizer denies whatever no
ACL allows, ``admin`` is the super user, and ``worker`` and ``tools`` are users with no rights
until granted (``stream-scorer acl grant``). Their passwords, made for the state directory, are in
``secrets/<user>.password`` (owner-only) and each user's client settings in
``clients/<user>.yaml`` (a ``kafka`` table to merge into a configuration). The KRaft controller
listener stays PLAINTEXT on loopback.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from stream_scorer.devtools.process import LocalServer, ServerProcess, ServerStatus, port_free
from stream_scorer.errors import LocalKafkaError
from stream_scorer.resources import packaged_file

KAFKA_VERSION = "4.3.2"

_JAVA_HINT = "Debian/Ubuntu: apt-get install openjdk-17-jre-headless"
# Kafka logs through SLF4J 1.7, and kafka_2.13's runtime dependencies bring no binding for it:
# without this jar the broker logs nothing at all ("SLF4J: Defaulting to no-operation").
_SLF4J_BINDING = "org.apache.logging.log4j:log4j-slf4j-impl"
_MARKER = ".complete"
_MARKER_TEXT = f"kafka_2.13 {KAFKA_VERSION} + {_SLF4J_BINDING}\n"
_HEAP = ("-Xms256m", "-Xmx1g")
#: The secured broker's users: the super user first (the broker's own principal too).
SECURE_USERS = ("admin", "worker", "tools")
SCRAM_MECHANISM = "SCRAM-SHA-512"


def default_cache_dir() -> Path:
    """Return the cache folder: ``$STREAM_SCORER_CACHE``, else ``~/.cache/stream-scorer``."""
    env = os.environ.get("STREAM_SCORER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "stream-scorer"


def find_pom() -> Path:
    """Return the pom that resolves the broker jars, shipped in the package."""
    return packaged_file(__package__ or "stream_scorer.devtools", "local-kafka-pom.xml")


def find_java() -> str:
    """Return the path of a ``java`` that is version 17 or newer."""
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            "Java 17 or newer is needed to run the local Kafka broker and `java` is not on "
            f"PATH: install it ({_JAVA_HINT})"
        )
    try:
        out = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LocalKafkaError(f"cannot run `{java} -version`: {exc}") from exc
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if match is None:
        raise LocalKafkaError(
            f"cannot tell the Java version of {java} from: {out.stderr.strip()[:200]!r}"
        )
    major = int(match.group(1))
    if major == 1:  # "1.8.0_392" is Java 8
        major = int(match.group(2) or 0)
    if major < 17:
        raise LocalKafkaError(
            f"Java 17 or newer is needed to run Kafka {KAFKA_VERSION}, and {java} is Java "
            f"{major}: install a newer one ({_JAVA_HINT}) and put it first on PATH"
        )
    return java


def _complete(libs: Path) -> bool:
    try:
        return (libs / _MARKER).read_text() == _MARKER_TEXT
    except OSError:
        return False


def _maven(mvn: str, pom: Path, *args: str) -> None:
    cmd = [mvn, "-B", "-q", "-f", str(pom), *args]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        result = subprocess.CompletedProcess(cmd, -1, out, "(Maven timed out after 900 s)")
    except OSError as exc:
        raise LocalKafkaError(f"cannot run Maven ({mvn}): {exc}") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise LocalKafkaError(
            f"Maven could not fetch Apache Kafka {KAFKA_VERSION}'s jars (`{' '.join(args[:1])}` "
            f"exited with {result.returncode}). Check that Maven Central "
            "(https://repo.maven.apache.org) is reachable from this machine, directly or through "
            "the proxy or mirror configured in ~/.m2/settings.xml. Maven's last lines:\n" + tail
        )


def fetch_jars(cache_dir: Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """Resolve Apache Kafka's broker jars with Maven into the cache; return their folder.

    The jars land in ``<cache>/kafka-<version>/libs``. Maven runs only when that folder lacks
    its completion marker; the download goes to a temporary folder renamed into place at the
    end, so an interrupted download is never mistaken for a complete one.

    Args:
        cache_dir: the cache folder; ``default_cache_dir()`` when None.
        log: receives one-line progress messages.

    Returns:
        The folder holding the jars (for ``java -cp '<folder>/*'``).

    Raises:
        LocalKafkaError: Java 17+ or Maven is missing, or Maven cannot download the jars.
    """
    libs = (cache_dir or default_cache_dir()) / f"kafka-{KAFKA_VERSION}" / "libs"
    find_java()
    if _complete(libs):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "Maven is needed to fetch Apache Kafka's broker jars and `mvn` is not on PATH: "
            "install it (Debian/Ubuntu: apt-get install maven)"
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    log(f"fetching org.apache.kafka:kafka_2.13:{KAFKA_VERSION} and its dependencies with Maven")
    tmp = Path(tempfile.mkdtemp(prefix=".libs-", dir=libs.parent))
    # Maven writes beside its pom (target/): run it on a copy, never in the installed package
    pom = Path(tempfile.mkdtemp(prefix=".pom-", dir=libs.parent)) / "pom.xml"
    shutil.copyfile(find_pom(), pom)
    try:
        _maven(mvn, pom, "dependency:copy-dependencies", f"-DoutputDirectory={tmp}",
               "-DincludeScope=runtime", f"-Dkafka.version={KAFKA_VERSION}")  # fmt: skip
        if not (tmp / f"kafka_2.13-{KAFKA_VERSION}.jar").is_file():
            raise LocalKafkaError(f"Maven finished but kafka_2.13-{KAFKA_VERSION}.jar is missing")
        cores = [re.fullmatch(r"log4j-core-(.+)\.jar", p.name) for p in tmp.iterdir()]
        log4j = next((m.group(1) for m in cores if m), "2.24.3")
        _maven(mvn, pom, "dependency:copy", f"-Dartifact={_SLF4J_BINDING}:{log4j}",
               f"-DoutputDirectory={tmp}")  # fmt: skip
        (tmp / _MARKER).write_text(_MARKER_TEXT)
        trash = Path(tempfile.mkdtemp(prefix=".old-", dir=libs.parent))
        try:
            with contextlib.suppress(FileNotFoundError):
                libs.rename(trash / "libs")
            try:
                tmp.rename(libs)
            except OSError as exc:
                if not _complete(libs):  # a concurrent fetch may have won the race
                    raise LocalKafkaError(f"cannot move the jars into {libs}: {exc}") from exc
        finally:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(pom.parent, ignore_errors=True)
    log(f"broker jars in {libs}")
    return libs


def broker_answers(client: dict[str, str], timeout: float = 1.0) -> Callable[[], bool]:
    """A probe: does the broker at ``client``'s ``bootstrap.servers`` answer metadata?

    Each call asks once, up to ``timeout`` (TCP alone is not enough), with one admin client.
    """
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({**client, "log_level": 0, "reconnect.backoff.max.ms": 500})

    def answers() -> bool:
        try:
            return bool(admin.list_topics(timeout=timeout).brokers)
        except Exception:  # not listening yet, or not serving metadata yet
            return False

    return answers


def _cluster_id() -> str:
    """A Kafka cluster id (``StorageTool random-uuid``'s format) without starting a JVM."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):  # Kafka never hands out ids that look like an option
            return cid


# the same in both listeners' configurations: storage, the single node's internal topics
_COMMON_PROPERTIES = """\
log.dirs={data}
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
group.initial.rebalance.delay.ms=0
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# a share group may set a record lock as short as 1 s (default lock 30 s, its floor 15 s): the
# tests of lock expiry need not wait 15 s
group.share.min.record.lock.duration.ms=1000
log.retention.hours=24
"""

_PROPERTIES = (
    """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
"""
    + _COMMON_PROPERTIES
)

_SECURE_PROPERTIES = (
    """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{cport}
listeners=SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}
advertised.listeners=SASL_SSL://127.0.0.1:{port}
controller.listener.names=CONTROLLER
listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=SASL_SSL
sasl.enabled.mechanisms={mechanism}
sasl.mechanism.inter.broker.protocol={mechanism}
listener.name.sasl_ssl.{lower}.sasl.jaas.config=org.apache.kafka.common.security.scram.\
ScramLoginModule required username="{admin}" password="{password}";
ssl.keystore.type=PEM
ssl.keystore.location={keystore}
ssl.truststore.type=PEM
ssl.truststore.location={truststore}
ssl.client.auth=none
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
# ANONYMOUS: the broker's own requests on the PLAINTEXT controller listener (loopback only)
super.users=User:{admin};User:ANONYMOUS
"""
    + _COMMON_PROPERTIES
)

_LOG4J2 = """\
status = warn
shutdownHook = disable
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
"""


class LocalKafka(LocalServer):
    """One local broker, identified by its state directory.

    Usable as a context manager: ``with LocalKafka(path, port=p) as bootstrap: ...`` starts
    the broker (or reuses the one running) and stops it on exit.
    """

    def __init__(
        self,
        state_dir: Path,
        port: int = 9092,
        controller_port: int | None = None,
        cache_dir: Path | None = None,
        *,
        secure: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        """Describe a broker; nothing starts until ``start``.

        Args:
            state_dir: folder for its configuration, data, logs and ``state.json``.
            port: the client port on 127.0.0.1 (PLAINTEXT, or SASL_SSL when ``secure``).
            controller_port: the KRaft controller port; ``port + 1`` when None.
            cache_dir: where the jars are cached; ``default_cache_dir()`` when None.
            secure: SASL_SSL (SCRAM-SHA-512), TLS and ACLs (the module's docstring).
            log: receives one-line progress messages.
        """
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.controller_port = port + 1 if controller_port is None else controller_port
        if self.controller_port == port:
            raise LocalKafkaError(f"the client and controller ports must differ (both {port})")
        self.cache_dir = cache_dir
        self.bootstrap = f"127.0.0.1:{port}"
        self.secure = secure
        self._log = log
        self._server = ServerProcess(
            self.state_dir,
            "the broker",
            (b"kafka.Kafka", os.fsencode(self._props)),
            LocalKafkaError,
            log,
            logs=(self.state_dir / "server.log",),
            stop_command="stream-scorer local-kafka stop",
        )

    @property
    def _props(self) -> Path:
        return self.state_dir / "server.properties"

    @property
    def _state_file(self) -> Path:
        return self._server.state_file

    @property
    def ca_file(self) -> Path:
        """The secured broker's CA certificate (clients' ``ssl.ca.location``)."""
        return self.state_dir / "tls" / "ca.pem"

    def password_file(self, user: str) -> Path:
        """The file holding ``user``'s password (secured broker)."""
        return self.state_dir / "secrets" / f"{user}.password"

    def client_file(self, user: str) -> Path:
        """The file holding ``user``'s ``kafka`` configuration table (secured broker)."""
        return self.state_dir / "clients" / f"{user}.yaml"

    def client_settings(self, user: str = "admin") -> dict[str, str]:
        """Librdkafka settings for ``user`` (with the password); plaintext: the address only."""
        settings = {"bootstrap.servers": self.bootstrap}
        if self.secure or self._recorded_secure():
            settings.update(self._security(user))
            settings["sasl.password"] = self.password_file(user).read_text().strip()
        return settings

    def _security(self, user: str) -> dict[str, str]:
        return {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": SCRAM_MECHANISM,
            "sasl.username": user,
            "ssl.ca.location": str(self.ca_file),
        }

    def _prepare_secure(self) -> dict[str, str]:
        """Make the TLS files and passwords (once per state directory); return the passwords."""
        from stream_scorer.devtools.tls import make_tls

        if not self.ca_file.is_file():
            make_tls(self.ca_file.parent)
        passwords: dict[str, str] = {}
        for user in SECURE_USERS:
            path = self.password_file(user)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(24) + "\n")
            passwords[user] = path.read_text().strip()
            table = {
                "kafka": {
                    "bootstrap_servers": self.bootstrap,
                    "client": self._security(user),
                    "secret_files": {"sasl.password": str(path)},
                }
            }
            self.client_file(user).parent.mkdir(parents=True, exist_ok=True)
            self.client_file(user).write_text(json.dumps(table, indent=2) + "\n")  # YAML too
        return passwords

    def _recorded_secure(self) -> bool:
        """Whether ``state.json`` records a secured broker (``status`` without ``--secure``)."""
        try:
            return bool(json.loads(self._state_file.read_text()).get("secure"))
        except (OSError, ValueError, AttributeError):
            return False

    def status(self) -> ServerStatus | None:
        """The recorded broker's status (``address``: its bootstrap), or None if none is recorded.

        A ``state.json`` left by a broker that died (or whose pid now belongs to another
        process) gives ``running=False``.
        """
        return self._server.status("bootstrap", lambda address: self._answering(address, 3.0)())

    def _answering(self, bootstrap: str, timeout: float = 1.0) -> Callable[[], bool]:
        """A probe of ``bootstrap`` with the recorded broker's client settings (secured or not)."""
        return broker_answers({**self.client_settings(), "bootstrap.servers": bootstrap}, timeout)

    def start(self, timeout: float = 60.0) -> str:
        """Start the broker, or report the one already running; return its bootstrap address.

        Args:
            timeout: seconds to wait until the broker answers a metadata request (the first
                run also downloads the jars, which is not counted).

        Returns:
            ``127.0.0.1:PORT``.

        Raises:
            LocalKafkaError: a port is taken, Java or the jars are missing, or the broker
                exits or does not answer within ``timeout`` (with the end of its logs).
        """
        status = self.status()
        if status is not None and status.running:
            address = status.address
            self._server.adopt(status.pid, address, self._answering(address), timeout, self._out)
            return address
        self._server.forget()  # stale (that broker is gone), or nothing recorded
        stale = status is not None
        for port, what in ((self.port, "client"), (self.controller_port, "controller")):
            # right after a crash the dead broker's connections may hold its ports a moment
            if not port_free(port, wait_s=30.0 if stale else 0.0):
                raise LocalKafkaError(
                    f"port {port} on 127.0.0.1 (the broker's {what} port) is taken by another "
                    f"process: stop that process (see `ss -ltnp 'sport = :{port}'`) or choose "
                    "another port with --port"
                )
        java = find_java()
        libs = fetch_jars(self.cache_dir, log=self._log)
        data = self.state_dir / "data"
        data.mkdir(parents=True, exist_ok=True)
        scram: list[str] = []
        if self.secure:
            passwords = self._prepare_secure()
            admin = SECURE_USERS[0]
            fd = os.open(self._props, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:  # holds the admin's password
                fh.write(
                    _SECURE_PROPERTIES.format(
                        port=self.port,
                        cport=self.controller_port,
                        data=data,
                        mechanism=SCRAM_MECHANISM,
                        lower=SCRAM_MECHANISM.lower(),
                        admin=admin,
                        password=passwords[admin],
                        keystore=self.ca_file.parent / "server.pem",
                        truststore=self.ca_file,
                    )
                )
            for user, password in passwords.items():
                scram += ["--add-scram", f"{SCRAM_MECHANISM}=[name={user},password={password}]"]
        else:
            self._props.write_text(
                _PROPERTIES.format(port=self.port, cport=self.controller_port, data=data)
            )
        log4j = self.state_dir / "log4j2.properties"
        log4j.write_text(_LOG4J2.format(log=self.state_dir / "server.log"))
        jvm = [
            f"-Dlog4j2.configurationFile={log4j}",
            "-Djava.awt.headless=true",
            "-cp",
            f"{libs}/*",
        ]
        if not (data / "meta.properties").is_file():
            self._format([java, "-Xmx256m", *jvm], data, scram)
        proc = self._server.spawn(
            [java, *_HEAP, *jvm, "kafka.Kafka", str(self._props)],
            self._out,
            {
                "port": self.port,
                "controller_port": self.controller_port,
                "bootstrap": self.bootstrap,
                "secure": self.secure,
            },
        )
        answers = self._answering(self.bootstrap)
        self._server.await_start(proc, self.bootstrap, answers, timeout, self._out)
        return self.bootstrap

    @property
    def _out(self) -> Path:
        return self.state_dir / "broker.out"

    def _format(self, java: list[str], data: Path, scram: list[str]) -> None:
        """Format ``data`` for KRaft (once per data directory) with the ``java`` command line.

        ``scram``: ``--add-scram`` arguments (the secured broker's users).
        """
        cmd = [*java, "kafka.tools.StorageTool", "format", "-t", _cluster_id(),
               "-c", str(self._props), *scram]  # fmt: skip
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LocalKafkaError(f"formatting {data} failed: {exc}") from exc
        if result.returncode != 0:
            out = f"{result.stdout}{result.stderr}".rstrip()
            out = re.sub(r"password=[^\]]*", "password=***", out)  # never show one
            raise LocalKafkaError(f"formatting {data} failed (exit {result.returncode}):\n{out}")
