"""The package as a user installs it: a wheel in a fresh virtualenv, run from another folder.

No editable install and no checkout on the path: every command README and the manual,
deploy/Dockerfile and
docker-compose.yml run must find what it needs inside the installed package. The commands run
against the session's real broker (and the demo against a local broker of its own).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import free_ports, read_topic

import stream_scorer
from stream_scorer import headers as hdr

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
NOT_SOURCES = (
    ".git",
    ".venv",
    "build",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    "models",
)


class Installed:
    """A virtualenv holding the built wheel, and a working folder outside the checkout."""

    def __init__(self, venv: Path, cwd: Path, cache: Path) -> None:
        self.bin = venv / "bin"
        self.cwd = cwd
        # no PYTHONPATH (the test runner's points into the checkout); an empty cache folder
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        self.env["STREAM_SCORER_CACHE"] = str(cache)

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``stream-scorer ARGS`` (or ``python`` when the first is ``python``)."""
        exe = str(self.bin / ("python" if args[0] == "python" else "stream-scorer"))
        argv = [exe, *(args[1:] if args[0] == "python" else args)]
        done = subprocess.run(
            argv,
            cwd=self.cwd,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert done.returncode == 0, f"{shlex.join(args)}: {done.stdout}\n{done.stderr}"
        return done


def _call(*argv: str | Path, cwd: Path) -> None:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("installed")
    wheels, venv, cwd = base / "wheels", base / "venv", base / "elsewhere"
    cwd.mkdir()
    # from a copy of the sources: setuptools' build/ folder in a checkout keeps removed modules
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    _call(
        sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", wheels, source, cwd=cwd
    )
    (wheel,) = wheels.glob("stream_scorer-*.whl")
    _call(sys.executable, "-m", "venv", venv, cwd=cwd)
    # with the extra README's install line names (confluent-kafka's serializers)
    _call(venv / "bin" / "pip", "install", "--quiet", f"{wheel}[producer]", cwd=cwd)
    yield Installed(venv, cwd, base / "cache")


def test_the_installed_package_holds_no_checkout_paths(installed: Installed) -> None:
    done = installed.run(
        "python", "-c", "import stream_scorer, sys; print(stream_scorer.__file__); print(sys.path)"
    )
    module, path = done.stdout.splitlines()
    assert "site-packages" in module and str(ROOT) not in path


def test_every_documented_command_runs_from_the_installed_package(
    installed: Installed,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    # the example's files, and the model, as the manual says (docs/manual/demo.md)
    installed.run("example", "init", "example")
    installed.run("train", "--out", "example/models/rides", "--rows", "3000", "--trees", "20")
    config = installed.cwd / "example" / "rides.yaml"
    # deploy/Dockerfile compiles the fast path's kernel with this very line (its config and its
    # virtualenv, /opt/venv, mapped to this one's): the kernel is the installed one, cached
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    (snippet,) = re.findall(r'RUN python -c "(.*build_pipeline.*)"', dockerfile)
    snippet = snippet.replace("/app/deploy/config/rides.yaml", str(config))
    installed.run("python", "-c", snippet.replace("'/opt/venv/'", repr(f"{installed.bin.parent}/")))

    topic, out, dlq, group = unique("rides"), unique("preds"), unique("dlq"), unique("grp")
    make_topics({topic: 2, out: 2, dlq: 1, f"{topic}-again": 1})
    events, malformed = 400, 0.05
    installed.run(
        "produce", "--bootstrap-servers", kafka_bootstrap, "--topic", topic,
        "--count", str(events), "--malformed-fraction", str(malformed),
    )  # fmt: skip
    env = {
        "STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAM_SCORER_INPUT__TOPIC": topic,
        "STREAM_SCORER_INPUT__GROUP_ID": group,
        "STREAM_SCORER_OUTPUT__TOPIC": out,
        "STREAM_SCORER_DEAD_LETTER__TOPIC": dlq,
        "STREAM_SCORER_METRICS__PORT": "0",
    }
    done = installed.run(
        "run", "--config", str(config), "--max-messages", str(events), env=env, timeout=180
    )
    report = json.loads(done.stdout.splitlines()[-1])
    dead = sum(report["dead_letters"].values())
    assert report["consumed"] == events and dead == events * malformed
    assert len(read_topic(kafka_bootstrap, out)) + dead == events

    # the same model on stored records: a Parquet file in, predictions out (docs/manual/batch.md)
    installed.run(
        "python", "-c",
        "import pyarrow.parquet as pq; from stream_scorer.example.rides import generate_columns,"
        " to_table; pq.write_table(to_table(generate_columns(300, 5)), 'rides.parquet')",
    )  # fmt: skip
    scored = installed.run(
        "score", "--config", str(config), "--input", "rides.parquet", "--output", "p.parquet"
    )
    assert json.loads(scored.stdout.splitlines()[-1])["predictions"] == 300
    assert (installed.cwd / "p.parquet").is_file()

    lag_args = ("lag", "--group", group, "--topic", topic, "--bootstrap-servers", kafka_bootstrap)
    lag = json.loads(installed.run(*lag_args, "--json").stdout)
    assert lag["total"]["lag_records"] == 0
    # the version from the installed metadata; a rewind's plan (the window: everything)
    version = installed.run("--version").stdout.splitlines()
    assert version[0] == f"stream-scorer {stream_scorer.__version__}"
    rewind_args = ("rewind", *lag_args[1:], "--by", "1h", "--dry-run", "--json")
    plan = json.loads(installed.run(*rewind_args).stdout)
    assert plan["dry_run"] is True and plan["total"]["again"] == events

    replay = json.loads(
        installed.run(
            "dlq", "replay", "--config", str(config), "--to", f"{topic}-again", env=env
        ).stdout.splitlines()[-1]
    )
    assert replay["replayed"] == dead
    replayed = read_topic(kafka_bootstrap, f"{topic}-again")
    originals = {bytes(m.value() or b"") for m in read_topic(kafka_bootstrap, dlq)}
    assert {bytes(m.value() or b"") for m in replayed} == originals
    assert all(dict(m.headers() or [])[hdr.REASON] for m in read_topic(kafka_bootstrap, dlq))


def test_local_kafka_fetch_and_a_small_demo_from_an_empty_cache(installed: Installed) -> None:
    fetched = installed.run("local-kafka", "fetch", timeout=600)
    assert Path(fetched.stdout.strip().splitlines()[-1]).is_relative_to(
        installed.env["STREAM_SCORER_CACHE"]
    )
    (port,) = free_ports(1)
    demo = installed.run(
        "demo", "--events", "2000", "--workers", "1", "--port", str(port), timeout=600
    )
    assert "OK: every event has exactly one prediction or one dead letter" in demo.stdout


def _walkthrough_blocks() -> list[str]:
    """The ``sh`` blocks of README's five-minute own-model path, after its install line."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    heading = "\n## Five minutes with your own schema and model\n"
    section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.DOTALL)
    assert "pip install" in blocks[0]  # the install line: the fixture's own install
    return blocks[1:]


def test_readmes_own_model_walkthrough_runs_from_the_installed_wheel(
    installed: Installed, tmp_path: Path
) -> None:
    from stream_scorer.devtools.localkafka import KAFKA_VERSION, default_cache_dir

    # the extra of the install line brings the Confluent serializers
    installed.run("python", "-c", "import confluent_kafka.schema_registry.avro")
    blocks = _walkthrough_blocks()
    assert len(blocks) == 3
    # its own folder and cache, the broker jars linked from this machine's cache (no download);
    # the broker on free ports instead of 9092/9093
    cwd, cache = tmp_path / "walkthrough", tmp_path / "cache"
    cwd.mkdir()
    cache.mkdir()
    jars = default_cache_dir() / f"kafka-{KAFKA_VERSION}"
    if jars.is_dir():
        (cache / jars.name).symlink_to(jars)
    port, controller = free_ports(2)
    env = {
        **installed.env,
        "STREAM_SCORER_CACHE": str(cache),
        "PATH": f"{installed.bin}:{os.environ['PATH']}",
    }
    local = f"--port {port} --controller-port {controller}"
    try:
        for i, block in enumerate(blocks):
            script = block.replace("127.0.0.1:9092", f"127.0.0.1:{port}")
            script = script.replace("local-kafka start", f"local-kafka start {local}")
            script = script.replace("local-kafka stop", f"local-kafka stop {local}")
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", script],
                cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
            assert done.returncode == 0, f"block {i + 1}:\n{script}\n{done.stdout}\n{done.stderr}"
            if i == 1:
                assert "OK payments.yaml: payments -> payment-scores" in done.stdout
    finally:
        subprocess.run(
            [str(installed.bin / "stream-scorer"), "local-kafka", "stop", *local.split()],
            cwd=cwd, env=env, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{")))
    assert report["consumed"] == 4 and report["predictions"] == 4, report
    assert "feature 'channel' met a value none of its categories" in done.stderr
