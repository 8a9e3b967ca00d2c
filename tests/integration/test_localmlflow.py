"""``stream-scorer local-mlflow``: the MLflow server of ``models:/`` sources, as users start it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_ports

from stream_scorer.devtools.process import alive
from stream_scorer.model.mlflow import MlflowRegistry

pytestmark = pytest.mark.integration


def _mlflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "stream_scorer", "local-mlflow", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def _group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid`` (the server and its web workers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def test_start_status_registry_answers_stop_leaves_no_process(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    args = ("--port", str(port), "--dir", str(tmp_path / "mlflow"))
    try:
        started = _mlflow("start", *args)
        assert started.returncode == 0, started.stdout + started.stderr
        uri = f"http://127.0.0.1:{port}"
        assert started.stdout.splitlines()[0] == uri
        status = _mlflow("status", *args)
        assert status.returncode == 0 and status.stdout.strip().endswith(f"{uri}: answering")
        pid = int(status.stdout.split()[1])
        again = _mlflow("start", *args)  # a second start reports the running one
        assert again.returncode == 0 and f"already running at {uri} (pid {pid})" in again.stdout
        # the registry a models:/ source reads answers: no registered model yet
        found = MlflowRegistry(uri).call("GET", "registered-models/search")
        assert found.get("registered_models", []) == []
        members = _group_members(pid)
        assert pid in members and len(members) >= 2  # the server and its web server
    finally:
        stopped = _mlflow("stop", *args)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert not alive(pid) and _group_members(pid) == []  # its web workers stopped with it
    gone = _mlflow("status", *args)
    assert gone.returncode == 1 and gone.stdout.strip() == "not running"
