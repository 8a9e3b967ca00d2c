"""numba's cache of the fast path: unwritable, cold, warm and seeded, each in a fresh process.

numba keys its cache on the absolute path of ``fast/kernel.py`` and needs the cache folder
writable even to read it; when no folder is writable ``cache=True`` raises at decoration (the
shipped image crashed so). The worker must then compile in memory and warn once. Each case runs
in a subprocess (the cache is chosen at import) that decodes the example's rides, good and
malformed, and prints what it saw; its results must equal this process's fast path.

Running as root bypasses permission bits, so "unwritable" is a folder that cannot be made
(under /proc), not a chmod.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_scorer.fast import cache as jitcache
from stream_scorer.fast import kernel

UNWRITABLE = "/proc/stream-scorer-no-cache"
TESTS = Path(__file__).parents[1]

# builds the example's fast path twice (as a model swap would), scores rides and malformed ones
SCRIPT = """
import hashlib, json, logging, sys
warnings = []
class Count(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.WARNING:
            warnings.append(record.getMessage())
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s", stream=sys.stderr)
logging.getLogger().addHandler(Count())
from stream_scorer.example.produce import MALFORMED_KINDS, RideEncoder
from stream_scorer.example.rides import FEATURES, RIDE_SCHEMA_PATH, generate_rides
from stream_scorer.fast import kernel
from stream_scorer.fast.path import FastColumns
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.records import PlainMessage
encoder = RideEncoder()
start = 1_763_900_000_000
values = [encoder.encode(r) for r in generate_rides(50, seed=7, start_ms=start)]
bad = generate_rides(len(MALFORMED_KINDS), seed=8, start_ms=start)
values += [encoder.malformed(kind, r) for kind, r in zip(MALFORMED_KINDS, bad)]
schema = load_schema(RIDE_SCHEMA_PATH)
for _ in range(2):
    fast = FastColumns(
        schema, FEATURES, id_field="ride_id", event_time_field="requested_at",
        max_message_bytes=4096,
    )
    cols = fast.run([PlainMessage(v, o=i) for i, v in enumerate(values)])
print(json.dumps({
    "matrix": hashlib.sha256(cols.matrix.tobytes()).hexdigest(),
    "ids": cols.ids,
    "dead": sorted((d.reason, d.message.offset()) for d in cols.dead),
    "origin": kernel.origin(),
    "cached": kernel.CACHED,
    "warnings": warnings,
    "kernel": kernel.__file__,
}))
"""


def _run(cache_dir: str, seed: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "STREAM_SCORER_"))}
    env["NUMBA_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    if seed is not None:
        env[jitcache.SEED_ENV] = str(seed)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    result["log"] = done.stderr
    return result


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    """The same batch through this process's fast path (tested against fastavro elsewhere)."""
    return _run(os.environ.get("NUMBA_CACHE_DIR") or str(jitcache.cache_dir()))


def _same_scores(result: dict[str, Any], expected: dict[str, Any]) -> None:
    assert len(expected["ids"]) == 50 and len(expected["dead"]) > 0
    for key in ("matrix", "ids", "dead"):
        assert result[key] == expected[key], key


def _cache_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_an_unwritable_cache_folder_compiles_in_memory_and_warns_once(
    expected: dict[str, Any],
) -> None:
    source = Path(expected["kernel"]).parent
    before = set(_cache_files(source))
    result = _run(UNWRITABLE)
    _same_scores(result, expected)
    assert result["cached"] is False
    assert result["origin"].startswith("compiled in memory")
    (warning,) = result["warnings"]
    assert UNWRITABLE in warning and "NUMBA_CACHE_DIR" in warning
    # numba's own fallback would have cached beside the package (writable as root) silently
    assert set(_cache_files(source)) == before


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A cache folder a process started empty, and that process's results."""
    folder = tmp_path_factory.mktemp("cold") / "numba"
    return folder, _run(str(folder))


def test_a_cold_cache_compiles_once_then_a_new_process_loads_everything(
    cold: tuple[Path, dict[str, Any]], expected: dict[str, Any]
) -> None:
    folder, first = cold
    _same_scores(first, expected)
    assert first["cached"] is True and first["warnings"] == []
    assert first["origin"].startswith("compiled (")
    warm = _run(str(folder))
    _same_scores(warm, expected)
    # after a whole batch, ids gathered and all: nothing compiled
    assert warm["origin"] == "loaded from numba's cache"


def test_an_empty_cache_folder_is_seeded_from_a_baked_cache(
    tmp_path: Path, cold: tuple[Path, dict[str, Any]], expected: dict[str, Any]
) -> None:
    baked = cold[0]
    files = {p.relative_to(baked) for p in _cache_files(baked)}
    assert files
    volume = tmp_path / "volume" / "numba"
    seeded = _run(str(volume), seed=baked)
    _same_scores(seeded, expected)
    assert seeded["origin"] == "loaded from numba's cache", seeded["log"]
    assert "copied the cache" in seeded["log"]
    assert files <= {p.relative_to(volume) for p in _cache_files(volume)}


def test_seeding_leaves_a_cache_folder_that_holds_a_cache(tmp_path: Path) -> None:
    source, target = tmp_path / "baked", tmp_path / "cache"
    (source / "fast_x").mkdir(parents=True)
    (source / "fast_x" / "k.nbi").write_bytes(b"baked")
    assert jitcache.seed(target, source) is True
    assert (target / "fast_x" / "k.nbi").read_bytes() == b"baked"
    (target / "fast_x" / "k.nbi").write_bytes(b"newer")
    assert jitcache.seed(target, source) is False
    assert (target / "fast_x" / "k.nbi").read_bytes() == b"newer"
    assert jitcache.seed(tmp_path / "other", tmp_path / "missing") is False


def test_a_function_numba_cannot_cache_is_compiled_in_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a function without a source file: numba finds no locator and raises at decoration
    namespace: dict[str, Any] = {}
    exec(compile("def twice(x):\n    return 2 * x\n", "<generated>", "exec"), namespace)
    monkeypatch.setattr(kernel, "CACHED", True)
    with caplog.at_level(logging.WARNING, logger=kernel.__name__):
        twice = kernel._njit()(namespace["twice"])
    assert twice(np.int64(21)) == 42
    assert kernel.CACHED is False
    (record,) = caplog.records
    assert "no locator" in record.getMessage()
