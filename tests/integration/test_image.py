"""The shipped image (deploy/Dockerfile), built with podman and run against the session's broker.

``deploy/tools/build-image.sh`` builds it on a Debian base made by mmdebstrap (no registry is
needed) and tags it by a hash of its inputs, so an unchanged tree reuses the image. The worker
runs as Kubernetes runs it (deploy/k8s): read-only root filesystem, an empty writable volume for
numba's cache, the host's network to reach the broker. It must score a small stream with every
malformed record dead-lettered, and load its kernels from the cache baked into the image
instead of compiling them. Podman, runc and mmdebstrap come from ``make tools``; without them
the test fails under CI=true and skips elsewhere. Build and start-up times are printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import committed_lag, free_ports, read_topic, unavailable, wait_for

from stream_scorer import headers as hdr
from stream_scorer.example.produce import expected_reasons, produce_events

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
NUMBA_CACHE_VOLUME = "/var/cache/stream-scorer"  # deploy/k8s/deployment.yaml's numba-cache


def _podman_env() -> dict[str, str]:
    cache = Path(os.environ.get("STREAM_SCORER_CACHE") or Path.home() / ".cache" / "stream-scorer")
    return {**os.environ, "CONTAINERS_CONF": str(cache / "podman" / "containers.conf")}


@pytest.fixture
def image(capsys: pytest.CaptureFixture[str]) -> Iterator[str]:
    missing = [t for t in ("podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    why = ""
    if missing:
        why = f"{', '.join(missing)} missing: run make tools"
    elif os.geteuid() != 0:
        why = "building the image with podman and mmdebstrap needs root"
    if why:
        unavailable(why)
    started = time.monotonic()
    done = subprocess.run(
        ["sh", "deploy/tools/build-image.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    name = done.stdout.strip().splitlines()[-1]
    took = time.monotonic() - started
    size = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", name],
        capture_output=True,
        text=True,
        env=_podman_env(),
        check=True,
    ).stdout.strip()
    built = "built" if "building" in done.stderr else "reused"
    with capsys.disabled():
        print(f"\nimage {name}: {built} in {took:.0f} s, {int(size) / 1e6:.0f} MB")
    yield name


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def _in_container(name: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", "exec", name, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=_podman_env(),
        check=False,
    )


def _healthcheck_command() -> list[str]:
    """The exec form of deploy/Dockerfile's HEALTHCHECK CMD (podman's OCI images drop it)."""
    text = (ROOT / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK")]
    command = json.loads(line.split(" CMD ", 1)[1])
    assert isinstance(command, list)
    return [str(part) for part in command]


def _pod_security_context() -> dict[str, Any]:
    docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (deployment,) = [d for d in docs if d and d.get("kind") == "Deployment"]
    context = deployment["spec"]["template"]["spec"]["securityContext"]
    assert isinstance(context, dict)
    return context


def test_the_image_scores_a_stream_read_only_without_compiling(
    image: str,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    topic, preds, dlq, group = unique("rides"), unique("preds"), unique("dlq"), unique("grp")
    make_topics({topic: 2, preds: 2, dlq: 1})
    report = produce_events(kafka_bootstrap, topic, 2000, malformed_fraction=0.02, seed=5)
    port = free_ports(1)[0]
    name = f"stream-scorer-test-{uuid.uuid4().hex[:8]}"
    argv = [
        "podman", "run", "--rm", "--name", name, "--network", "host",
        # as deploy/k8s runs it: read-only root, an empty volume for numba's cache
        "--read-only", "--tmpfs", f"{NUMBA_CACHE_VOLUME}:rw,mode=1777",
        "-e", f"STREAM_SCORER_KAFKA__BOOTSTRAP_SERVERS={kafka_bootstrap}",
        "-e", f"STREAM_SCORER_INPUT__TOPIC={topic}",
        "-e", f"STREAM_SCORER_INPUT__GROUP_ID={group}",
        "-e", f"STREAM_SCORER_OUTPUT__TOPIC={preds}",
        "-e", f"STREAM_SCORER_DEAD_LETTER__TOPIC={dlq}",
        "-e", f"STREAM_SCORER_METRICS__PORT={port}",
        "-e", "STREAM_SCORER_METRICS__HOST=127.0.0.1",
        image,
    ]  # fmt: skip
    started = time.monotonic()
    worker = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_podman_env()
    )
    try:
        wait_for(
            lambda: worker.poll() is not None or _answers(f"http://127.0.0.1:{port}/healthz"),
            120,
            "the container's worker answering /healthz",
        )
        healthy_s = time.monotonic() - started
        assert worker.poll() is None, worker.communicate()[1][-5000:]
        wait_for(
            lambda: sum(committed_lag(kafka_bootstrap, group, topic).values()) == 0,
            120,
            "the container's worker committing every event",
        )
        scored_s = time.monotonic() - started
        # the Dockerfile's HEALTHCHECK command answers inside the running container, and the
        # worker runs as deploy/k8s's pod runs it: not root, the pod's user and group
        health = _in_container(name, *_healthcheck_command())
        assert health.returncode == 0, health.stderr[-2000:]
        ids = _in_container(name, "python", "-c", "import os; print(os.getuid(), os.getgid())")
        pod = _pod_security_context()
        assert ids.stdout.split() == [str(pod["runAsUser"]), str(pod["runAsGroup"])], ids
        assert pod["runAsUser"] != 0
    finally:
        subprocess.run(
            ["podman", "stop", "--time", "60", name],
            capture_output=True,
            env=_podman_env(),
            check=False,
        )
        out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err[-5000:]
    final = json.loads(out.strip().splitlines()[-1])
    assert final["consumed"] >= 2000

    predictions = read_topic(kafka_bootstrap, preds)
    dead = read_topic(kafka_bootstrap, dlq)
    assert len(predictions) == report.valid
    assert sorted(m.key() for m in dead) == sorted(report.malformed_keys)
    by_reason = Counter(
        (dict(m.headers())[hdr.CONNECT_STAGE].decode(), dict(m.headers())[hdr.REASON].decode())
        for m in dead
    )
    assert by_reason == {
        (stage.value, reason): n
        for (stage, reason), n in expected_reasons(report.malformed_by_kind).items()
    }

    logs = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    (decoder,) = [e["msg"] for e in logs if e["msg"].startswith("decoder: fast path")]
    assert "loaded from numba's cache" in decoder, decoder
    assert any("copied the cache" in e["msg"] for e in logs)
    warnings = [e["msg"] for e in logs if e["level"] in ("WARNING", "ERROR")]
    assert not [w for w in warnings if "numba" in w], warnings
    with capsys.disabled():
        print(
            f"\ncontainer: /healthz after {healthy_s:.1f} s, every event committed after "
            f"{scored_s:.1f} s; {decoder}"
        )
