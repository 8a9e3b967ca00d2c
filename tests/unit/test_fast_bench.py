"""The benchmark's broker-free parts: stage profiles and the results table."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_scorer.devtools.bench import (
    STAGES,
    ModeResult,
    example_config,
    example_payloads,
    markdown,
    profile_fast_path,
    profile_stages,
)
from stream_scorer.example.train import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-model")
    train(out, rows=2_000, n_estimators=10)
    return out


@pytest.mark.parametrize("fast_path", [True, False])
def test_stage_profile_times_every_stage(model_dir: Path, fast_path: bool) -> None:
    cfg = example_config(model_dir, input={"fast_path": fast_path})
    profile = profile_stages(cfg, example_payloads(1_500), batch=500, rounds=1)
    assert set(profile) == set(STAGES)
    assert all(v > 0 for v in profile.values())


def test_fast_path_profile_splits_kernel_and_columns(model_dir: Path) -> None:
    got = profile_fast_path(example_config(model_dir), example_payloads(1_000), batch=500)
    assert set(got) == {"kernel", "columns", "total", "first_call_s"}
    assert got["kernel"] > 0 and got["total"] >= got["kernel"]


def test_table_ratios_are_against_the_naive_loop_and_the_ceiling() -> None:
    rows = [
        ModeResult("ceiling (passthrough)", "-", events_per_s=40_000),
        ModeResult(
            "naive (per message)", "m", events_per_s=2_000, p50_ms=3.0, p99_ms=9.5, p99_all_ms=20.0
        ),
        ModeResult("stream-scorer", "m", 2, events_per_s=30_000, peak_rss_mib=[200.0, 210.5]),
    ]
    table = markdown(rows).splitlines()
    assert len(table) == 5
    assert "| stream-scorer | m | 2 | 1 | 0 | 30,000 | 15.0 | 75% | - | - | - |" in table[4]
    assert "200.0, 210.5" in table[4]
    assert "| 3.0 | 9.5 | 20.0 |" in table[3]


def test_a_cached_model_with_stale_features_is_trained_again(tmp_path: Path) -> None:
    import dataclasses

    from stream_scorer.contracts.manifest import read_manifest, write_manifest
    from stream_scorer.devtools.bench import ensure_example_model
    from stream_scorer.example.rides import FEATURES

    model = ensure_example_model(tmp_path / "m", trees=3, depth=2)
    stamp = (model / "manifest.json").stat().st_mtime_ns
    assert ensure_example_model(model, trees=3, depth=2) == model
    assert (model / "manifest.json").stat().st_mtime_ns == stamp  # current: reused
    old = read_manifest(model)
    stale = [dataclasses.replace(f, min=None, max=None, policy={}) for f in old.features]
    write_manifest(model, dataclasses.replace(old, features=tuple(stale)))
    assert tuple(read_manifest(model).features) != FEATURES
    ensure_example_model(model, trees=3, depth=2)
    assert tuple(read_manifest(model).features) == FEATURES
    # a model cached before drift had no reference bins: trained again, with them
    write_manifest(model, dataclasses.replace(read_manifest(model), reference={}))
    ensure_example_model(model, trees=3, depth=2)
    assert read_manifest(model).reference["rows"] > 0


def test_the_table_has_the_drift_stage_column() -> None:
    rows = [
        ModeResult("stream-scorer, drift on", "m", events_per_s=9, stages_us={"drift": 0.25}),
    ]
    head, _rule, row = markdown(rows).splitlines()
    assert head.endswith("| produce | drift |") and row.endswith("| 0.00 | 0.25 |")
