"""The benchmark's measured loops on a real broker, at a tiny size (not a timed test)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from stream_scorer.devtools import benchkafka as bk
from stream_scorer.devtools.bench import example_payloads
from stream_scorer.example.train import train

pytestmark = pytest.mark.integration
EVENTS = 2_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-broker-model")
    train(out, rows=2_000, n_estimators=10)
    return out


def _topics(
    unique: Callable[[str], str], make_topics: Callable[[dict[str, int]], None]
) -> tuple[str, str, str]:
    inp, out, dlq = unique("bench-in"), unique("bench-out"), unique("bench-dlq")
    make_topics({inp: 4, dlq: 1})
    make_topics({out: 4})
    return inp, out, dlq


@pytest.mark.parametrize("mode", ["ceiling", "naive"])
def test_client_loops_pass_every_event_through(
    mode: str,
    model_dir: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    inp, out, _dlq = _topics(unique, make_topics)
    args: dict[str, Any] = {
        "bootstrap": kafka_bootstrap,
        "topic": inp,
        "out": out,
        "group": unique("g"),
    }
    args.update(model=str(model_dir), limit=EVENTS, idle_s=60)
    proc = bk.start_client(mode, args)
    bk.burst(kafka_bootstrap, inp, example_payloads(EVENTS), 4)
    got = bk.client_result(proc)
    assert got["events"] == EVENTS and got["seconds"] > 0 and 10 < got["rss"] < 1000  # its own
    assert ("predict" in got["stages"]) == (mode == "naive")
    lat = bk.latencies(kafka_bootstrap, inp, out)
    assert len(lat) == EVENTS and min(lat) >= 0


def test_workers_are_measured_through_their_metrics(
    model_dir: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    topics = _topics(unique, make_topics)
    workers = bk.Workers(kafka_bootstrap, topics, model_dir, 1, 1)
    try:
        workers.wait_assigned()
        # fed while measured (as the bench's latency phase is): fed first, a fast worker could
        # have consumed everything before the first sample, leaving nothing to measure
        with ThreadPoolExecutor(1) as feeder:
            feed = feeder.submit(
                bk.paced, kafka_bootstrap, topics[0], example_payloads(EVENTS), 4, 1_000.0
            )
            seconds, events, stages = workers.measure(EVENTS, timeout=120)
            reached = feed.result()
        rss = workers.peak_rss()
    finally:
        workers.stop()
    assert reached > 0  # the rate the feeder reached: reported by the bench, never asserted
    assert 0 < events <= EVENTS and seconds > 0
    assert set(stages) == {*bk.STAGES, "drift"} and stages["decode"] > 0
    assert rss[0] > 50
    assert len(bk.latencies(kafka_bootstrap, topics[0], topics[1])) == EVENTS
