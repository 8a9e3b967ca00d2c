"""The soak's pure parts: the slope, the summary and the markdown curve."""

from __future__ import annotations

import numpy as np
import pytest

from stream_scorer.devtools.soak import Sample, markdown, rss_mib, slope_mib_per_min, summarize


def _samples(rss: list[float], every_s: float = 10.0) -> list[Sample]:
    return [
        Sample(i * every_s, r, max(rss[: i + 1]), 100 * i, 99 * i, i, 5) for i, r in enumerate(rss)
    ]


def test_slope_is_mib_per_minute_by_least_squares() -> None:
    # 0.5 MiB every 10 s is 3 MiB per minute, whatever the offset
    assert slope_mib_per_min(_samples([200 + 0.5 * i for i in range(13)])) == pytest.approx(3.0)
    # noisy points: numpy's fit as the reference
    rss = [210.0, 214.0, 209.0, 215.0, 213.0, 220.0]
    want = np.polyfit([10.0 * i for i in range(6)], rss, 1)[0] * 60
    assert slope_mib_per_min(_samples(rss)) == pytest.approx(want)


def test_slope_of_flat_or_too_few_samples_is_zero() -> None:
    assert slope_mib_per_min(_samples([250.0] * 8)) == 0.0
    assert slope_mib_per_min(_samples([250.0])) == 0.0
    assert slope_mib_per_min([]) == 0.0
    same_time = [Sample(5.0, 100.0, 100.0, 0, 0, 0, 0), Sample(5.0, 120.0, 120.0, 0, 0, 0, 0)]
    assert slope_mib_per_min(same_time) == 0.0


def test_summary_leaves_the_warm_up_out() -> None:
    # a start-up climb to 260 in the first minute, then flat around 250
    rss = [100.0, 180.0, 240.0, 260.0, 255.0, 250.0, 251.0, 249.0, 250.0, 252.0, 250.0]
    got = summarize(_samples(rss), warmup_s=60.0)
    assert got["samples_after_warmup"] == 5
    assert (got["rss_first_mib"], got["rss_last_mib"]) == (251.0, 250.0)
    assert (got["rss_min_mib"], got["rss_max_mib"]) == (249.0, 252.0)
    assert got["peak_rss_mib"] == 260.0
    assert abs(got["slope_mib_per_min"]) < 2.0
    assert summarize(_samples(rss), warmup_s=0.0)["slope_mib_per_min"] > 50


def test_summary_of_a_run_shorter_than_the_warm_up_uses_every_sample() -> None:
    got = summarize(_samples([100.0, 110.0, 120.0]), warmup_s=60.0)
    assert got["samples_after_warmup"] == 3
    assert got["rss_first_mib"] == 100.0 and got["slope_mib_per_min"] == pytest.approx(60.0)


def test_markdown_has_one_row_per_minute_and_the_last_sample() -> None:
    samples = _samples([200.0 + i for i in range(14)], every_s=10.0)  # 0 s to 130 s
    summary = summarize(samples) | {
        "produced": 1300,
        "rate_reached": 9999.6,
        "malformed": 13,
        "predictions": 1287,
        "dead_letters": 13,
        "missing": 0,
        "duplicates": 0,
        "malformed_scored": 0,
        "valid_dead_lettered": 0,
        "worker_exit_code": 0,
    }
    text = markdown(samples, summary)
    rows = [line for line in text.splitlines() if line.startswith("| ") and ":" in line[:7]]
    assert [r.split(" | ")[0] for r in rows] == ["| 0:00", "| 1:00", "| 2:00", "| 2:10"]
    assert rows[1] == "| 1:00 | 206.0 | 206.0 | 600 | 594 | 6 | 5 |"
    assert "**+6.000 MiB per minute**" in text
    assert "1,300 at 10,000 events/s (13 malformed)" in text
    assert "1,287 predictions + 13 dead letters, 0 missing" in text


def test_rss_of_this_process_is_positive_and_of_a_missing_one_zero() -> None:
    import os

    assert 5 < rss_mib(os.getpid()) < 100_000
    assert rss_mib(2**22 + 12345) == 0.0


def test_bench_parses_the_soak_options_with_their_defaults() -> None:
    from stream_scorer.cli import build_parser

    args = build_parser().parse_args(["bench", "--soak", "--soak-rate", "500"])
    assert args.soak and args.soak_rate == 500.0
    assert (args.soak_seconds, args.soak_malformed, args.soak_interval) == (600.0, 0.01, 10.0)
    assert not build_parser().parse_args(["bench"]).soak
