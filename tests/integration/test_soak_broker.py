"""The soak on a real broker, short and slow: samples taken, every event accounted for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_scorer.devtools.soak import SoakSettings, run_soak
from stream_scorer.example.train import train

pytestmark = pytest.mark.integration


@pytest.mark.slow  # a soak, however short
def test_a_short_soak_samples_memory_and_accounts_for_every_event(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    model = tmp_path / "model"
    train(model, rows=2_000, n_estimators=10)
    cfg = SoakSettings(seconds=12, rate=500, malformed=0.05, interval=1, partitions=2, warmup_s=3)
    lines: list[str] = []
    body = run_soak(
        cfg, out_dir=tmp_path / "out", bootstrap=kafka_bootstrap, model=model, say=lines.append
    )
    summary, samples = body["summary"], body["samples"]
    # a sample per interval while the feeder runs (at most one per tick of the 12 s) and a last
    # one once every event is acknowledged; how many ticks a loaded machine reaches is the bench's
    ticks = int(cfg.seconds / cfg.interval) + 1
    assert 2 <= len(samples) <= ticks + 1 and all(s["rss_mib"] > 50 for s in samples)
    assert all(s["peak_rss_mib"] >= s["rss_mib"] for s in samples)
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    # the feeder never runs ahead of its rate (it may fall behind it: throughput is the bench's)
    assert 0 < summary["produced"] <= cfg.rate * cfg.seconds + 1
    assert summary["malformed"] == pytest.approx(0.05 * summary["produced"], abs=30)
    assert summary["dead_letters"] == summary["malformed"] > 0
    assert summary["predictions"] + summary["dead_letters"] == summary["produced"]
    assert summary["missing"] == 0 and summary["worker_exit_code"] == 0
    assert summary["valid_dead_lettered"] == 0 and summary["malformed_scored"] == 0
    assert samples[-1]["predictions"] == summary["predictions"]
    assert samples[-1]["dead_letters"] == summary["dead_letters"]
    assert summary["rss_min_mib"] <= summary["rss_last_mib"] <= summary["rss_max_mib"]
    written = json.loads(next((tmp_path / "out").glob("soak-*.json")).read_text())
    assert written["summary"] == summary
    table = next((tmp_path / "out").glob("soak-*.md")).read_text()
    assert "| time | RSS MiB |" in table and table in "\n".join(lines)
