"""The numba kernel's tests again, with every array access bounds-checked (``NUMBA_BOUNDSCHECK=1``).

Compiled numba code does not check indices: a read past the end of a buffer returns whatever
lies there and a write corrupts memory, silently. Under ``NUMBA_BOUNDSCHECK=1`` an out-of-bounds
access raises ``IndexError`` instead. The fast path's test files run in a subprocess with the
flag and a fresh ``NUMBA_CACHE_DIR`` (machine code cached without the checks must not be
reused). Slower than the unit tier should be (the kernel compiles from scratch), so marked
``boundscheck``: ``make unit`` leaves it out, the full suite (``make test``) runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.boundscheck

ROOT = Path(__file__).parents[2]
FAST_PATH_TESTS = (
    "tests/unit/test_fast_differential.py",
    "tests/unit/test_fast_decode.py",
    "tests/unit/test_fast_pipeline.py",
    "tests/unit/test_fast_read.py",
    "tests/unit/test_framing.py",
)
#: Reads one element past the end of a 3-element view of a larger array: without bounds checks
#: it quietly reads the next element of the larger one (defined memory, so the control is safe).
PROBE = """
import numba, numpy as np

@numba.njit
def at(a, i):
    return a[i]

whole = np.arange(10.0)
try:
    print("read", at(whole[:3], 3))
except IndexError as exc:
    print("IndexError", exc)
"""


def _env(boundscheck: bool, cache: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {
        **os.environ,
        "NUMBA_BOUNDSCHECK": "1" if boundscheck else "0",
        "NUMBA_CACHE_DIR": str(cache),
        "PYTHONPATH": path,
    }


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_the_flag_turns_an_out_of_bounds_read_into_an_index_error(tmp_path: Path) -> None:
    checked = _run(["-c", PROBE], _env(True, tmp_path / "checked"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("IndexError"), checked.stdout
    unchecked = _run(["-c", PROBE], _env(False, tmp_path / "unchecked"))
    assert unchecked.stdout.strip() == "read 3.0", unchecked.stdout + unchecked.stderr


def test_the_fast_path_tests_pass_with_bounds_checks(tmp_path: Path) -> None:
    cache = tmp_path / "numba-cache"
    done = _run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", *FAST_PATH_TESTS],
        _env(True, cache),
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
    # the kernel was compiled with the checks, into the fresh cache, not loaded from another one
    assert list(cache.rglob("*kernel*.nbi")), sorted(p.name for p in cache.rglob("*"))
