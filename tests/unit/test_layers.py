"""The package's layers, as import-linter contracts ([tool.importlinter] in pyproject.toml).

``lint-imports`` (``make lint``, CI's lint job) must keep them, and must break them when a
module imports upwards, when the runtime imports an operator command, a dev tool or the
example, and when a new module is left out of the picture: a copy of the package with each
such change fails, so the contracts cannot pass by checking nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from support import tool

ROOT = Path(__file__).parents[2]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package under ``root`` with ``root``'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [tool("lint-imports"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_package_keeps_its_layers() -> None:
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken." in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # stages below worker: the upward import the layers forbid
        (
            "stages/records.py",
            "from stream_scorer.worker import lag as _lag",
            "stream_scorer.stages is not allowed to import stream_scorer.worker",
        ),
        # stages below fast: the v1 prediction writer is handed to the encoder, never imported
        # (an ignored stages.encode -> fast.kernel import let exactly this line pass)
        (
            "stages/encode.py",
            "from stream_scorer.fast import kernel as _kernel",
            "stream_scorer.stages is not allowed to import stream_scorer.fast",
        ),
        # kafka below the operator commands (what worker/* did through ops.acl and ops.topics)
        (
            "kafka/access.py",
            "from stream_scorer.ops import replay as _replay",
            "The runtime never imports the operator commands, the dev tools or the example\n------",
        ),
        # ops and worker are siblings: neither imports the other (ops.lag used worker.lag.TP)
        (
            "ops/lag.py",
            "from stream_scorer.worker import lag as _lag",
            "stream_scorer.ops is not allowed to import stream_scorer.worker",
        ),
        # a new top-level module must be placed in a layer (exhaustive)
        ("unplaced.py", "", "unplaced"),
    ],
)
def test_lint_imports_rejects_a_copy_that_bends_the_layers(
    tmp_path: Path, module: str, line: str, broken: str
) -> None:
    shutil.copytree(
        ROOT / "stream_scorer",
        tmp_path / "stream_scorer",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint_imports(tmp_path).returncode == 0  # the copy keeps them, as the package does
    target = tmp_path / "stream_scorer" / module
    text = target.read_text(encoding="utf-8") if target.exists() else ""
    target.write_text(f"{text}\n{line}\n", encoding="utf-8")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0, proc.stdout
    assert broken in proc.stdout + proc.stderr, proc.stdout + proc.stderr
