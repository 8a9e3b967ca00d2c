"""Drift on a real broker: the worker's PSI gauges for an unshifted and a shifted ride stream.

One worker (in this process, its metrics endpoint scraped) scores the example model, packed with
reference bins of its training rows. First 3,000 rides drawn like the training sample: every
feature's PSI stays under 0.1. Then 3,000 rides whose distance is doubled (the example's
generator, shifted here: the worker knows no field of the example): once the window holds only
shifted rides, distance_km's PSI is past 0.2 and every other feature's still under 0.1.
"""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from support import free_ports, produce_raw, wait_for

from stream_scorer.cli import main
from stream_scorer.config import load_config
from stream_scorer.contracts.manifest import read_manifest
from stream_scorer.example.produce import RideEncoder
from stream_scorer.example.rides import FEATURES, generate_columns, to_records
from stream_scorer.example.train import train
from stream_scorer.stages.drift import bins_of
from stream_scorer.worker.flow import StopFlag
from stream_scorer.worker.loop import run_worker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
WINDOW = 3000
SHIFTED = "distance_km"


def _rides(n: int, seed: int, shift: float = 1.0) -> list[tuple[bytes, bytes]]:
    cols = generate_columns(n, seed)
    cols[SHIFTED] = np.round(cols[SHIFTED] * shift, 2)
    encoder = RideEncoder()
    return [(r["ride_id"].encode(), encoder.encode(r)) for r in to_records(cols)]


def _drift(port: int) -> dict[str, dict[tuple[str, ...], float]]:
    """The drift gauges by name, each by its model, version and feature labels' values."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, dict[tuple[str, ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("stream_scorer_drift_") or s.name.startswith(
                "stream_scorer_predictions_produced"
            ):
                key = tuple(s.labels[k] for k in ("model", "version", "feature") if k in s.labels)
                out.setdefault(s.name, {})[key] = s.value
    return out


def test_a_shifted_feature_drifts_past_0_2_and_the_others_stay_under_0_1(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    model = tmp_path / "rides"
    manifest = train(model, rows=20_000, n_estimators=20, max_depth=4)
    assert manifest.reference["rows"] > 15_000
    topic, out, dlq = unique("rides"), unique("preds"), unique("dlq")
    make_topics({topic: 2, out: 2, dlq: 1})
    port = free_ports(1)[0]
    raw: dict[str, Any] = {
        "kafka": {"bootstrap_servers": kafka_bootstrap},
        "input": {
            "topic": topic,
            "group_id": unique("grp"),
            "schema": str(ROOT / "schemas" / "ride_request.v1.avsc"),
            "id_field": "ride_id",
            "event_time_field": "requested_at",
        },
        "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": dlq},
        "model": {"path": str(model)},
        "batch": {"max_records": 500},
        "metrics": {"port": port, "host": "127.0.0.1"},
        "drift": {"window_events": WINDOW, "min_events": 1000, "export_interval_s": 0.2},
    }
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "w.yaml", environ={})
    stop = StopFlag()
    labels = ("rides", manifest.model_version)
    names = [f.name for f in FEATURES]
    seen: dict[str, dict[tuple[str, ...], float]] = {}
    failures: list[BaseException] = []

    def exported_after(produced: int) -> Callable[[], bool]:
        def ready() -> bool:
            if stop:
                raise AssertionError(f"the worker stopped: {stop.reason}")
            try:
                got = _drift(port)
            except OSError:
                return False
            done = got.get("stream_scorer_predictions_produced_total", {}).get((), 0)
            events = got.get("stream_scorer_drift_window_events", {}).get(labels, 0)
            if done < produced or events < WINDOW:  # every ride scored, a full window read
                return False
            seen.clear()
            seen.update(got)
            return True

        return ready

    def check() -> None:  # beside the worker, which runs in the main thread (signals)
        try:
            produce_raw(kafka_bootstrap, topic, _rides(3000, seed=11), 2)
            wait_for(exported_after(3000), 60, "no drift reading of 3,000 scored rides")
            calm = {n: seen["stream_scorer_drift_psi"][(*labels, n)] for n in names}
            assert all(v < 0.1 for v in calm.values()), calm
            assert seen["stream_scorer_drift_prediction_psi"][labels] < 0.1
            assert seen["stream_scorer_drift_window_fill"][labels] == 1.0
            produce_raw(kafka_bootstrap, topic, _rides(3000, seed=12, shift=2.0), 2)

            def shifted() -> bool:
                return (
                    exported_after(6000)()
                    and seen["stream_scorer_drift_psi"][(*labels, SHIFTED)] > 0.2
                )

            wait_for(shifted, 60, f"{SHIFTED}'s PSI never passed 0.2")
            drifted = {n: seen["stream_scorer_drift_psi"][(*labels, n)] for n in names}
            assert all(v < 0.1 for n, v in drifted.items() if n != SHIFTED), drifted
            missing = seen["stream_scorer_drift_missing_share"][(*labels, "surge_multiplier")]
            assert 0.1 < missing < 0.3  # the generator's 20% null surges
        except BaseException as exc:
            failures.append(exc)
        finally:
            stop.set("test")

    checker = threading.Thread(target=check, daemon=True)
    checker.start()
    report = run_worker(cfg, stop)
    checker.join(timeout=60)
    if failures:
        raise failures[0]
    assert report.consumed == 6000


def test_model_pack_draws_reference_bins_from_a_topic(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> None:
    trained = train(tmp_path / "trained", rows=3000, n_estimators=5, max_depth=3)
    topic = unique("sample")
    make_topics({topic: 3})
    produce_raw(kafka_bootstrap, topic, _rides(2000, seed=21), 3)
    mapping = {
        "features": [
            {"name": f.name, "field": f.field, "transform": f.transform}
            | ({"categories": list(f.categories)} if f.categories else {})
            for f in FEATURES
        ]
    }
    (tmp_path / "features.yaml").write_text(yaml.safe_dump(mapping))
    out = tmp_path / "packed"
    args = ["model", "pack", str(tmp_path / "trained" / "model.ubj"), "--out", str(out)]
    args += ["--schema", str(ROOT / "schemas" / "ride_request.v1.avsc")]
    args += ["--features", str(tmp_path / "features.yaml"), "--reference-topic", topic]
    args += ["--reference-count", "1500", "--bootstrap-servers", kafka_bootstrap]
    assert main(args) == 0
    reference = read_manifest(out).reference
    assert reference["rows"] == 1500
    assert set(reference["features"]) == {f.name for f in FEATURES}
    # the same bins as the training rows' up to sampling noise: the topic's rides are alike
    bins = bins_of(reference, read_manifest(out).features)
    ref = bins_of(trained.reference, trained.features)
    assert bins is not None and ref is not None
    assert bins.names == ref.names
    assert list(reference["features"]["vehicle_type"]["shares"]) == pytest.approx(
        list(trained.reference["features"]["vehicle_type"]["shares"]), abs=0.05
    )
