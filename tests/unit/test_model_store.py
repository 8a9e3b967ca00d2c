"""Model sources and the model store: aliases, promotion, rollback; the hot-swap refresher."""

from __future__ import annotations

import base64
import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest
from support import Msg, OnePipeline, http_server, train_payment_classifier
from test_pipeline_sink import FakeProducer

from stream_scorer import headers as hdr
from stream_scorer.contracts.manifest import read_manifest, write_manifest
from stream_scorer.errors import (
    EXIT_DEPLOYMENT,
    EXIT_FAILURE,
    ModelError,
    StreamScorerError,
    UnavailableError,
    exit_code,
)
from stream_scorer.model.store import (
    DirectorySource,
    ModelStore,
    StoreSource,
    open_source,
    parse_ref,
    promote,
    rollback,
)
from stream_scorer.stages.records import DeadLetter, Reason, Scored, Stage
from stream_scorer.stages.score import Scorer
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.refresh import LoadedModel, ModelRefresher, load_model
from stream_scorer.worker.sink import Sink, SinkContext


def _model(tmp_path: Path, version: str) -> Path:
    """A payment classifier whose manifest says ``version``."""
    path = tmp_path / "src" / version
    manifest = train_payment_classifier(path)
    write_manifest(path, dataclasses.replace(manifest, model_version=version))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    root = tmp_path_factory.mktemp("store")
    out = ModelStore(root, "fraud")
    for version in ("v1", "v2"):
        assert out.publish(_model(root, version)) == version
    return out


def test_parse_ref_reads_aliases_and_versions() -> None:
    ref = parse_ref("store:/models/root/fraud@champion")
    assert (ref.location, ref.name, ref.alias, ref.version) == (
        "/models/root",
        "fraud",
        "champion",
        None,
    )
    ref = parse_ref("store:/models/root/fraud/v3")
    assert (ref.location, ref.name, ref.alias, ref.version) == ("/models/root", "fraud", None, "v3")
    ref = parse_ref("models:/fraud@prod")
    assert (ref.name, ref.alias) == ("fraud", "prod")
    assert parse_ref("models:/fraud/7").version == "7"
    with pytest.raises(ModelError, match="name an alias"):
        parse_ref("models:/fraud")
    with pytest.raises(ModelError, match=r"alias '\.\./x'"):
        parse_ref("store:/m/fraud@../x")


def test_promote_and_rollback_move_the_alias_and_keep_a_history(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fraud")
    for version in ("v1", "v2", "v3"):
        store.publish(_model(tmp_path, version))
    assert promote(store, "v1").before is None
    promote(store, "v2")
    move = promote(store, "v3")
    assert (move.before, move.after) == ("v2", "v3")
    assert (tmp_path / "fraud" / "aliases" / "champion").read_text() == "v3\n"
    assert store.get_history("champion") == ["v1", "v2"]
    assert rollback(store).after == "v2"
    assert rollback(store).after == "v1"
    assert store.get_alias("champion") == "v1"
    with pytest.raises(ModelError, match="no earlier version"):
        rollback(store)
    # the versions rolled away from stay loadable
    assert read_manifest(store.version_dir("v3")).model_version == "v3"
    # no temporary file left behind by the atomic writes
    assert sorted(p.name for p in (tmp_path / "fraud" / "aliases").iterdir()) == [
        ".lock",
        "champion",
        "champion.history",
    ]


def test_promote_refuses_a_version_that_is_not_there(store: ModelStore) -> None:
    with pytest.raises(ModelError, match=r"no version 'v9' \(versions: v1, v2\)"):
        promote(store, "v9")


def test_publish_refuses_to_overwrite_a_version(store: ModelStore) -> None:
    with pytest.raises(ModelError, match="exists already"):
        store.publish(store.version_dir("v1"))


def test_sources_from_their_text(store: ModelStore, tmp_path: Path) -> None:
    promote(store, "v1", "prod")
    source = open_source(f"store:{store.model_dir}@prod")
    assert isinstance(source, StoreSource) and source.tracks
    assert source.wanted() == "v1"
    assert source.fetch("v1") == store.version_dir("v1")
    pinned = open_source(f"store:{store.model_dir}/v2")
    assert not pinned.tracks and pinned.wanted() == "v2"
    plain = open_source("v1", base=store.model_dir)
    assert isinstance(plain, DirectorySource) and not plain.tracks
    with pytest.raises(ModelError, match="alias 'nope' is not set"):
        open_source(f"store:{store.model_dir}@nope").wanted()
    with pytest.raises(ModelError, match="no such directory"):
        open_source(str(tmp_path / "missing"))


# --- the refresher ------------------------------------------------------------------------------


def _scorer_only(directory: Path) -> tuple[Any, Scorer]:
    """A loader without the decode/encode stages (the refresher needs only the scorer)."""
    return object(), Scorer(directory)


def test_the_refresher_swaps_refuses_and_rolls_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fraud")
    for version in ("v1", "v2", "v3"):
        store.publish(_model(tmp_path, version))
    # v3 is broken: its model file does not match the manifest's sha256 any more
    (store.version_dir("v3") / "model.ubj").write_bytes(b"not a model")
    promote(store, "v1")
    source = StoreSource(store, "champion", None)
    metrics = Metrics()
    first = load_model(source, source.wanted(), _scorer_only)
    refresher = ModelRefresher(source, first, _scorer_only, metrics, interval_s=60)
    refresher.check_now()
    assert refresher.take() is None  # nothing moved

    promote(store, "v2")
    refresher.check_now()
    second = refresher.take()
    assert second is not None and second.model_version == "v2"
    assert refresher.take() is None  # taken once

    promote(store, "v3")
    refresher.check_now()
    refresher.check_now()  # refused once: not tried again, one error
    assert refresher.take() is None
    assert metrics.prometheus.get_sample_value("stream_scorer_model_refused_total") == 1

    rollback(store)  # back to v2: the version in use, nothing to do
    refresher.check_now()
    assert refresher.take() is None
    rollback(store)  # back to v1: still loaded, swapped in again without a load
    refresher.check_now()
    assert refresher.take() is first


def test_a_source_that_cannot_answer_keeps_the_model(tmp_path: Path) -> None:
    class Failing(StoreSource):
        def wanted(self) -> str:
            raise ModelError("registry down")

    store = ModelStore(tmp_path, "fraud")
    store.publish(_model(tmp_path, "v1"))
    source = Failing(store, "champion", None)
    current = LoadedModel("v1", object(), Scorer(store.version_dir("v1")), tmp_path)  # type: ignore[arg-type]
    refresher = ModelRefresher(source, current, _scorer_only, Metrics(), interval_s=60)
    refresher.check_now()
    assert refresher.take() is None


def test_a_version_whose_download_fails_in_an_outage_is_fetched_again(tmp_path: Path) -> None:
    """A registry that stops answering mid-download is an outage, not a bad version."""
    store = ModelStore(tmp_path, "fraud")
    for version in ("v1", "v2"):
        store.publish(_model(tmp_path, version))
    promote(store, "v1")
    calls: list[str] = []

    def flaky(directory: Path) -> tuple[Any, Scorer]:
        calls.append(directory.name)
        if len(calls) == 2:  # the first load of v2
            raise UnavailableError("registry down mid-download")
        return _scorer_only(directory)

    source = StoreSource(store, "champion", None)
    metrics = Metrics()
    first = load_model(source, source.wanted(), flaky)
    refresher = ModelRefresher(source, first, flaky, metrics, interval_s=60)
    promote(store, "v2")
    refresher.check_now()
    assert refresher.take() is None
    assert metrics.prometheus.get_sample_value("stream_scorer_model_refused_total") == 0
    refresher.check_now()  # the registry answers again: v2 is loaded, not refused
    second = refresher.take()
    assert second is not None and second.model_version == "v2"


def test_the_refresher_thread_polls_and_stops(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "fraud")
    for version in ("v1", "v2"):
        store.publish(_model(tmp_path, version))
    promote(store, "v1")
    source = StoreSource(store, "champion", None)
    first = load_model(source, "v1", _scorer_only)
    got: list[LoadedModel] = []
    with ModelRefresher(source, first, _scorer_only, Metrics(), interval_s=0.05) as refresher:
        assert refresher.enabled
        promote(store, "v2")
        tick = threading.Event()
        for _ in range(200):
            new = refresher.take()
            if new is not None:
                got.append(new)
                break
            tick.wait(0.05)
    assert [m.model_version for m in got] == ["v2"]
    assert not ModelRefresher(DirectorySource(tmp_path), first, _scorer_only, Metrics(), 1).enabled


# --- every output carries the version of its batch -----------------------------------------------


def test_outputs_carry_the_version_that_scored_their_batch() -> None:
    producer, tracker = FakeProducer(), OffsetTracker()
    sink = Sink(producer, SinkContext("out", "dlq", "g", "w", "v1"), tracker, Metrics())
    for version in ("v1", "v2", ""):
        good, bad = Msg(b"v", t="in", p=0, o=1), Msg(b"x", t="in", p=0, o=2)
        dead = [DeadLetter(bad, Stage.DECODE, Reason.TRUNCATED, "EOFError", "short")]
        sink.publish(Scored([good], [b"p"], [1]), dead, tracker.track([good, bad]), version)
    stamps = [(s["topic"], s["headers"][hdr.MODEL_VERSION]) for s in producer.sent]
    assert stamps == [
        ("out", b"v1"),
        ("dlq", b"v1"),
        ("out", b"v2"),
        ("dlq", b"v2"),
        ("out", b"v1"),  # none given: the context's
        ("dlq", b"v1"),
    ]


# --- configuration ------------------------------------------------------------------------------


def _config(tmp_path: Path, model: dict[str, Any]) -> Any:
    from stream_scorer.config import load_config

    schema = tmp_path / "s.avsc"
    schema.write_text('{"type": "record", "name": "r", "fields": []}')
    return load_config(
        None,
        environ={},
        overrides={
            "kafka": {"bootstrap_servers": "unused:9092"},
            "input": {"topic": "in", "group_id": "g", "schema": str(schema), "id_field": "id"},
            "output": {"topic": "out", "schema": str(schema)},
            "dead_letter": {"topic": "dlq"},
            "model": model,
        },
    )


def test_the_configuration_takes_a_path_or_a_source(tmp_path: Path) -> None:
    from stream_scorer.errors import ConfigError
    from stream_scorer.worker.loop import model_source

    cfg = _config(tmp_path, {"source": "store:models/fraud@champion", "refresh_s": 2})
    assert cfg.model.source == f"store:{Path.cwd() / 'models/fraud'}@champion"  # made absolute
    assert cfg.model.refresh_s == 2
    assert isinstance(model_source(cfg), StoreSource)
    cfg = _config(tmp_path, {"source": "models:/fraud@champion"})
    assert cfg.model.source == "models:/fraud@champion"
    with pytest.raises(ConfigError, match=r"exactly one of model\.path and model\.source"):
        _config(tmp_path, {"path": str(tmp_path), "source": "models:/fraud@champion"})
    with pytest.raises(ConfigError, match=r"exactly one of model\.path and model\.source"):
        _config(tmp_path, {})
    assert _config(tmp_path, {"path": "none", "source": "models:/f@a"}).model.path is None
    with pytest.raises(ConfigError, match=r"model\.refresh_s"):
        _config(tmp_path, {"path": str(tmp_path), "refresh_s": -1})


# --- the commands -------------------------------------------------------------------------------


def test_publish_promote_rollback_and_config_check_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stream_scorer.cli import main

    v1, v2 = _model(tmp_path, "v1"), _model(tmp_path, "v2")
    spec = f"store:{tmp_path / 'store' / 'fraud'}"
    assert main(["model", "publish", str(v1), spec, "--promote"]) == 0
    assert main(["model", "publish", str(v2), "fraud", "--store", str(tmp_path / "store")]) == 0
    assert main(["model", "promote", spec, "v2"]) == 0
    assert "@champion: v1 -> v2" in capsys.readouterr().out
    assert main(["model", "rollback", spec]) == 0
    assert "@champion: v2 -> v1" in capsys.readouterr().out
    assert main(["model", "rollback", spec]) == 2  # no earlier version
    assert main(["model", "promote", spec, "v9"]) == 2  # no such version
    assert main(["model", "promote", "fraud", "v2"]) == 2  # no --store: which store?


def test_metrics_and_readiness_follow_a_swap() -> None:
    from stream_scorer.config import load_config
    from stream_scorer.worker.health import Monitor

    metrics = Metrics()
    metrics.model_swapped(None, "v1")
    metrics.model_swapped("v1", "v2")
    sample = metrics.prometheus.get_sample_value
    assert sample("stream_scorer_model_info", {"model_version": "v1"}) is None
    assert sample("stream_scorer_model_info", {"model_version": "v2"}) == 1
    assert sample("stream_scorer_model_swaps_total") == 1
    assert (sample("stream_scorer_model_loaded_timestamp_seconds") or 0) > 0
    cfg = load_config(
        None,
        environ={},
        overrides={
            "kafka": {"bootstrap_servers": "unused:9092"},
            "input": {"topic": "i", "group_id": "g", "schema": __file__, "id_field": "id"},
            "output": {"topic": "o", "schema": __file__},
            "dead_letter": {"topic": "d"},
            "model": {"path": str(Path(__file__).parent)},
        },
    )
    monitor = Monitor(cfg, metrics, "v1")
    monitor.set_model_version("v2")
    assert monitor.readiness()[1]["model_version"] == "v2"


# --- the main loop swaps only between batches ---------------------------------------------------


def test_the_loop_swaps_the_model_between_batches_only(tmp_path: Path) -> None:

    from stream_scorer.stages.multi import MultiResult
    from stream_scorer.stages.pipeline import BatchResult
    from stream_scorer.worker.flow import StopFlag
    from stream_scorer.worker.loop import WorkerReport, _loop

    events: list[str] = []
    stop = StopFlag()
    batches = [[Msg(b"x", o=3 * i + j) for j in range(3)] for i in range(4)]

    class Source:
        rebalances, joined, group_settled = 1, True, True

        def poll_batch(self, _n: int, _wait: float) -> list[Msg]:
            if not batches:
                stop.set("done")
                return []
            return batches.pop(0)

        def fetched_to_end(self) -> bool:
            return True

        def split(self, batch: list[Msg]) -> tuple[list[Msg], list[Any]]:
            return batch, []

        def raise_errors(self) -> None:
            pass

    class Pipeline:
        def __init__(self, version: str) -> None:
            self.version = version

        def process(self, batch: list[Msg]) -> BatchResult:
            events.append(f"process {self.version}")
            return BatchResult(Scored([], [], []), [], {}, self.version)

    class Delivery:
        paused = False

        def deliver(self, _ticket: Any, result: MultiResult) -> bool:
            events.append(f"deliver {result.main.model_version}")
            return True

        def service(self) -> None:
            pass

    models = iter(["v2", "v3"])

    def swap(model: Any) -> Any:
        # a new version is ready after each delivered batch, once each
        if events and events[-1].startswith("deliver"):
            version = next(models, None)
            if version is not None:
                events.append(f"swap {version}")
                return Pipeline(version)
        return model

    _loop(
        _config(tmp_path, {"path": str(tmp_path)}),
        Source(),  # type: ignore[arg-type]
        OnePipeline(Pipeline("v1"), swap),  # type: ignore[arg-type]
        Delivery(),  # type: ignore[arg-type]
        OffsetTracker(),
        Metrics(),
        WorkerReport("w"),
        stop,
    )
    assert events == [
        "process v1",
        "deliver v1",
        "swap v2",
        "process v2",
        "deliver v2",
        "swap v3",
        "process v3",
        "deliver v3",
        "process v3",
        "deliver v3",
    ]


# --- MLflow over HTTP: refusals are configuration errors, server errors outages --------------
@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (401, "RefusedError", EXIT_DEPLOYMENT),
        (403, "RefusedError", EXIT_DEPLOYMENT),
        (500, "UnavailableError", EXIT_FAILURE),
        (503, "UnavailableError", EXIT_FAILURE),
        (404, "MlflowError", EXIT_DEPLOYMENT),
    ],
)
def test_mlflow_answers_are_classified(status: int, error: str, code: int) -> None:
    from stream_scorer.model.mlflow import MlflowRegistry

    def answer(method: str, path: str) -> tuple[int, Any]:
        return status, {"error_code": "X", "message": f"answer {status}"}

    with http_server(answer) as (url, seen):
        host = url[len("http://") :]
        model = MlflowRegistry(f"http://ann:pw-9@{host}").model("m")
        with pytest.raises(StreamScorerError) as err:
            model.check_version("1")
    assert type(err.value).__name__ == error
    assert exit_code(err.value) == code
    assert len(seen) == 1 and seen[0][2] == "Basic " + base64.b64encode(b"ann:pw-9").decode()
    assert "pw-9" not in str(err.value)
    if status != 404:
        assert f"MLflow server {url}" in str(err.value)
    if status in (401, 403):
        assert "user 'ann'" in str(err.value)
