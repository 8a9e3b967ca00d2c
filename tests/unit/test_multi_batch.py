"""Several models on one batch: the pure batch functions, the sink's counting, the shadow slot."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support import Msg, wait_for
from test_pipeline_sink import PREDICTION_SCHEMA, FakeProducer

from stream_scorer import headers as hdr
from stream_scorer.config import load_config
from stream_scorer.config.sections import ModelConfig, ModelEntry, OutputConfig
from stream_scorer.errors import ConfigError
from stream_scorer.retry import RetryPolicy
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.encode import PredictionEncoder
from stream_scorer.stages.multi import (
    ModelOutput,
    MultiResult,
    Scoring,
    compare,
    score_batch,
)
from stream_scorer.stages.pipeline import BatchResult, Pipeline
from stream_scorer.stages.records import Columns, DeadLetter, Message, Reason, Scored, Stage
from stream_scorer.stages.score import Predictions
from stream_scorer.worker.metrics import Metrics
from stream_scorer.worker.offsets import OffsetTracker
from stream_scorer.worker.refresh import LoadedModel
from stream_scorer.worker.sink import Sink, SinkContext
from stream_scorer.worker.slots import Slot


# --- score_batch --------------------------------------------------------------------------------
class Builder:
    """A decode + features step: a value ``b"bad"`` does not decode; ``refuse`` offsets are a
    feature-stage dead letter of this builder; every other record is one row (its offset)."""

    def __init__(self, refuse: frozenset[int] = frozenset()) -> None:
        self.refuse = refuse
        self.runs = 0

    def run(self, messages: Any) -> Columns:
        self.runs += 1
        kept: list[Message] = []
        dead = []
        for m in messages:
            if m.value() == b"bad":
                dead.append(DeadLetter(m, Stage.DECODE, Reason.TRUNCATED, "x", "bad"))
            elif m.offset() in self.refuse:
                dead.append(DeadLetter(m, Stage.FEATURES, Reason.MISSING_VALUE, "x", "none"))
            else:
                kept.append(m)
        matrix = np.asarray([[float(m.offset() or 0)] for m in kept], dtype=np.float32)
        ids = [f"id{m.offset()}" for m in kept]
        return Columns(kept, ids, [1] * len(kept), matrix.reshape(-1, 1), dead, 0.0, {})


class Model:
    """Predicts ``scale * offset``; raises on ``fail`` offsets (or on any batch: ``always``)."""

    def __init__(
        self,
        version: str,
        scale: float,
        fail: frozenset[int] = frozenset(),
        always: bool = False,
        threshold: float | None = None,
    ) -> None:
        self.model_version = version
        self.scale = scale
        self.fail = fail
        self.always = always
        self.threshold = threshold

    def predict(self, matrix: Any) -> Predictions:
        if self.always or any(int(x) in self.fail for x in matrix[:, 0]):
            raise ValueError("model broke")
        values = matrix[:, 0].astype(np.float64) * self.scale
        labels = None if self.threshold is None else (values >= self.threshold).astype(np.int8)
        return Predictions(values, labels)


ENCODER = PredictionEncoder(load_schema(PREDICTION_SCHEMA))


def _scoring(name: str, builder: Builder, model: Model, shadow: bool = False) -> Scoring:
    return Scoring(name, f"out-{name}", Pipeline(builder, model, ENCODER), shadow)


def _offsets(messages: list[Any]) -> list[int]:
    return [m.offset() for m in messages]


def _summary(result: MultiResult) -> dict[str, Any]:
    return {
        "shared": sorted((d.message.offset(), d.stage.value) for d in result.dead),
        **{
            o.name: (
                _offsets(o.result.scored.messages),
                sorted((d.message.offset(), d.reason.value) for d in o.result.dead),
                o.refused,
                o.failed is not None,
            )
            for o in result.outputs
        },
    }


MSGS = [Msg(b"ok", o=i) for i in range(6)]
MSGS[2] = Msg(b"bad", o=2)


def _case(name: str) -> tuple[list[Scoring], dict[str, Any], dict[str, int]]:
    """(models, expected summary, expected builder runs) of each case."""
    a, b = Builder(), Builder(refuse=frozenset({4}))
    cases: dict[str, tuple[list[Scoring], dict[str, Any], dict[str, Builder]]] = {
        # one model: as the single form always was, every dead letter its own
        "single": (
            [_scoring("", a, Model("v1", 1.0))],
            {"shared": [], "": ([0, 1, 3, 4, 5], [(2, "truncated")], 0, False)},
            {"a": a},
        ),
        # two models with the same features share one decode; the undecodable record is one
        # shared dead letter; a model failing on record 3 dead-letters it for itself only
        "shared features": (
            [
                _scoring("m1", a, Model("v1", 1.0)),
                _scoring("m2", a, Model("v2", 2.0, fail=frozenset({3}))),
            ],
            {
                "shared": [(2, "decode")],
                "m1": ([0, 1, 3, 4, 5], [], 0, False),
                "m2": ([0, 1, 4, 5], [(3, "model_failed")], 0, False),
            },
            {"a": a},
        ),
        # another feature list (a policy refusing record 4): a second decode, its dead letter
        "other features": (
            [_scoring("m1", a, Model("v1", 1.0)), _scoring("m3", b, Model("v3", 3.0))],
            {
                "shared": [(2, "decode")],
                "m1": ([0, 1, 3, 4, 5], [], 0, False),
                "m3": ([0, 1, 3, 5], [(4, "missing_value")], 0, False),
            },
            {"a": a, "b": b},
        ),
        # a shadow refusing a record: counted, no dead letter; a shadow that raises: failed
        "shadows": (
            [
                _scoring("m1", a, Model("v1", 1.0)),
                _scoring("s1", b, Model("v4", 1.5), shadow=True),
                _scoring("s2", a, Model("v5", 1.0, always=True), shadow=True),
            ],
            {
                "shared": [(2, "decode")],
                "m1": ([0, 1, 3, 4, 5], [], 0, False),
                "s1": ([0, 1, 3, 5], [], 2, False),
                "s2": ([], [], 0, True),
            },
            {"a": a, "b": b},
        ),
    }
    models, expected, builders = cases[name]
    return models, expected, {k: id(v) for k, v in builders.items()}


@pytest.mark.parametrize("case", ["single", "shared features", "other features", "shadows"])
def test_score_batch_decodes_once_per_feature_list_and_keeps_refusals_per_model(
    case: str,
) -> None:
    models, expected, builders = _case(case)
    result = score_batch(models, MSGS)
    assert _summary(result) == expected
    distinct = {id(m.pipeline.columns): m.pipeline.columns for m in models}
    assert len(distinct) == len(builders)
    assert all(b.runs == 1 for b in distinct.values())  # type: ignore[attr-defined]
    for out, m in zip(result.outputs, models, strict=True):
        assert out.topic == m.topic
        assert out.result.model_version == m.pipeline.model.model_version
        assert len(out.result.values) == len(out.result.scored)


def _result(offsets: list[int], values: list[float], labels: list[int] | None) -> BatchResult:
    msgs: list[Message] = [MSGS[i] for i in offsets]
    return BatchResult(
        Scored(msgs, [b""] * len(msgs), [0] * len(msgs)),
        [],
        {},
        "v",
        values=np.array(values, dtype=np.float64),
        labels=None if labels is None else np.array(labels, dtype=np.int64),
    )


@pytest.mark.parametrize(
    ("champion", "shadow", "compared", "agreed", "deltas"),
    [
        (([0, 1], [0.2, 0.8], [0, 1]), ([0, 1], [0.4, 0.6], [1, 1]), 2, 1, [0.2, -0.2]),
        (([0, 1, 3], [1.0, 2.0, 3.0], None), ([3, 0], [3.5, 1.0], None), 2, 0, [0.5, 0.0]),
        (([0], [0.5], [1]), ([1], [0.5], [1]), 0, 0, []),  # nothing scored by both
        (([], [], None), ([], [], None), 0, 0, []),
    ],
)
def test_compare_pairs_records_by_identity(
    champion: Any, shadow: Any, compared: int, agreed: int, deltas: list[float]
) -> None:
    seen = compare(_result(*champion), _result(*shadow))
    assert (seen.compared, seen.agreed) == (compared, agreed)
    np.testing.assert_allclose(seen.deltas, deltas)


# --- the sink: a record's offset moves once every model's output is acknowledged --------------
def test_the_offset_moves_only_when_every_models_output_and_dead_letter_is_acknowledged() -> None:
    producer = FakeProducer()
    tracker = OffsetTracker()
    sink = Sink(producer, SinkContext("out", "dlq", "grp", "w1", "v9"), tracker, Metrics())
    msgs = [Msg(b"x", o=i) for i in range(3)]
    ticket = tracker.track(msgs)

    def out(name: str, offsets: list[int], dead: list[int]) -> ModelOutput:
        scored = Scored([msgs[i] for i in offsets], [b"p"] * len(offsets), [0] * len(offsets))
        letters = [DeadLetter(msgs[i], Stage.FEATURES, Reason.NAN_VALUE, "x", "y") for i in dead]
        return ModelOutput(name, f"out-{name}", BatchResult(scored, letters, {}, f"{name}-1"))

    batch = MultiResult([out("a", [0, 1, 2], []), out("b", [0, 2], [1])])
    # produce without serving the acknowledgements
    producer_poll, producer.poll = producer.poll, lambda timeout=0: 0  # type: ignore[method-assign]
    sink.publish_batch(batch, ticket)
    producer.poll = producer_poll  # type: ignore[method-assign]
    sent = producer.sent
    assert [(s["topic"], s["key"]) for s in sent][:5] == [("out-a", b"key")] * 3 + [
        ("out-b", b"key")
    ] * 2
    assert [s["headers"][hdr.MODEL_VERSION] for s in sent[:5]] == [b"a-1"] * 3 + [b"b-1"] * 2
    letter = sent[5]
    assert letter["topic"] == "dlq"
    assert letter["headers"][hdr.MODEL_NAME] == b"b"
    assert letter["headers"][hdr.MODEL_VERSION] == b"b-1"
    pending = producer.pending
    for i, (callback, err, msg) in enumerate(pending):  # acknowledge one output at a time
        assert tracker.take_committable() == [], i
        callback(err, msg)
    producer.pending = []
    assert tracker.take_committable() == [("in", 0, 3)]
    assert ticket.spans


# --- config ------------------------------------------------------------------------------------
def _models_config(tmp_path: Path, models: Any, **extra: Any) -> Path:
    raw = {
        "kafka": {"bootstrap_servers": "unused:9092"},
        "input": {
            "topic": "in",
            "group_id": "g",
            "schema": str(PREDICTION_SCHEMA),
            "id_field": "x",
        },
        "dead_letter": {"topic": "dlq"},
        "models": models,
        **extra,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _entry(name: str, topic: str, tmp_path: Path, **more: Any) -> dict[str, Any]:
    return {"name": name, "model": {"path": str(tmp_path)}, "output": {"topic": topic}, **more}


@pytest.mark.parametrize(
    ("models", "extra", "message"),
    [
        ([("a", "o1", {}), ("a", "o2", {})], {}, r"models\[1\]\.name: 'a' is also the name"),
        ([("a", "o1", {}), ("b", "o1", {})], {}, r"models\[0\]\.output\.topic: .*must differ"),
        (
            [("a", "o1", {}), ("b", "o2", {"role": "shadow", "shadow_of": "c"})],
            {},
            r"models\[1\]\.shadow_of: 'c' is not the name of a serve entry",
        ),
        ([("b", "o2", {"role": "shadow", "shadow_of": "b"})], {}, r"models: needs at least one"),
        ([("a", "o1", {})], {"model": {"path": "."}}, r"models: give either models or model"),
        ([("a", "o1", {"model": {"pathh": "."}})], {}, r"models\[0\]\.model\.pathh: unknown key"),
        ([("a", "o1", {"colour": 1})], {}, r"models\[0\]\.colour: unknown key"),
    ],
)
def test_a_bad_models_list_names_the_field(
    tmp_path: Path, models: Any, extra: dict[str, Any], message: str
) -> None:
    entries = []
    for name, topic, more in models:
        entry = _entry(name, topic, tmp_path)
        for key, value in more.items():
            entry[key] = {**entry[key], **value} if isinstance(value, dict) else value
        if "pathh" in entry["model"]:
            del entry["model"]["path"]
        entries.append(entry)
    with pytest.raises(ConfigError, match=message):
        load_config(_models_config(tmp_path, entries, **extra), environ={})


def test_a_models_list_gives_one_entry_each_and_the_single_form_one_default(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        _models_config(
            tmp_path,
            [
                _entry("a", "o1", tmp_path),
                _entry("b", "o2", tmp_path, role="shadow", shadow_of="a"),
            ],
        ),
        environ={},
    )
    assert [(e.name, e.role, e.shadow_of, e.output.topic, e.key) for e in cfg.entries] == [
        ("a", "serve", "", "o1", "models[0]"),
        ("b", "shadow", "a", "o2", "models[1]"),
    ]
    assert cfg.entries[1].field("model", "path") == "models[1].model.path"


# --- the shadow slot: failed, retried with backoff, back at a batch boundary ------------------
class Source:
    """A model source whose fetch works once ``ok`` is set."""

    tracks = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ok = threading.Event()
        self.fetches = 0

    def wanted(self) -> str:
        return "1"

    def fetch(self, version: str) -> Path:
        self.fetches += 1
        if not self.ok.is_set():
            raise OSError("store down")
        return self.directory

    def describe(self) -> str:
        return "test source"

    def rollout(self) -> None:
        return None  # no rollout of the alias

    def close(self) -> None:
        pass


def test_a_failed_shadow_is_marked_retried_with_backoff_and_swapped_in_between_batches(
    tmp_path: Path,
) -> None:
    from support import train_payment_classifier

    from stream_scorer.stages.score import Scorer

    train_payment_classifier(tmp_path, version="shadow-1")
    metrics = Metrics()
    source = Source(tmp_path)
    entry = ModelEntry(
        "s", ModelConfig(path=tmp_path), OutputConfig(topic="o"), "shadow", "a", "models[1]"
    )

    def load(directory: Path) -> tuple[Pipeline, Scorer]:
        scorer = Scorer(directory)
        return Pipeline(Builder(), scorer, ENCODER), scorer

    slot = Slot(
        entry,
        source,
        load,
        metrics,
        refresh_s=0,
        policy=RetryPolicy(initial_s=0.01, max_s=0.05),
        named=True,
    )
    slot.start()  # the store is down: marked failed, not raised
    failed = metrics.prometheus.get_sample_value
    assert slot.failed and slot.scoring() is None
    assert failed("stream_scorer_shadow_failed", {"model": "s"}) == 1
    wait_for(lambda: source.fetches >= 3, 10, "retries")  # retried, with backoff, in a thread
    assert slot.swap() is None  # nothing loaded yet
    source.ok.set()
    swaps: list[Any] = []

    def swapped_in() -> bool:  # only between batches (swap) does it come back
        swaps.append(slot.swap())
        return swaps[-1] is not None

    wait_for(swapped_in, 10, "the reload")
    assert swaps[-1].model_version == "shadow-1"
    assert slot.scoring() is not None
    assert failed("stream_scorer_shadow_failed", {"model": "s"}) == 0
    assert (
        failed(
            "stream_scorer_model_version_info",
            {"model": "s", "model_version": "shadow-1", "role": "shadow"},
        )
        == 1
    )
    slot.fail(ValueError("raised on a batch"))  # a shadow raising on a batch: failed again
    assert slot.failed
    assert failed("stream_scorer_shadow_failed", {"model": "s"}) == 1
    slot.close()


def test_a_shadow_raising_on_a_batch_is_marked_failed_and_its_champion_scores_on(
    tmp_path: Path,
) -> None:
    from stream_scorer.worker.loop import Models

    metrics = Metrics()
    shared = Builder()
    pipelines = {
        "champ": Pipeline(shared, Model("c-1", 1.0, threshold=2.5), ENCODER),
        "twin": Pipeline(shared, Model("t-1", 1.0, threshold=3.5), ENCODER),
        "bad": Pipeline(shared, Model("b-1", 1.0, always=True), ENCODER),
    }
    slots = []
    for name, role in (("champ", "serve"), ("twin", "shadow"), ("bad", "shadow")):
        entry = ModelEntry(
            name, ModelConfig(path=tmp_path), OutputConfig(topic=name), role, "champ", name
        )
        slot = Slot(
            entry,
            Source(tmp_path),
            lambda _d: (pipelines["champ"], pipelines["champ"].model),  # type: ignore[arg-type, return-value]
            metrics,
            refresh_s=0,
            policy=RetryPolicy(initial_s=60, max_s=60),  # no reload during the test
            named=True,
        )
        pipeline = pipelines[name]
        slot._use(LoadedModel("1", pipeline, pipeline.model, tmp_path), None)  # type: ignore[arg-type]
        slots.append(slot)
    models = Models(slots, metrics, None)  # type: ignore[arg-type]
    result = models.score(MSGS)
    by_name = {o.name: o for o in result.outputs}
    assert _offsets(by_name["champ"].result.scored.messages) == [0, 1, 3, 4, 5]
    assert _offsets(by_name["twin"].result.scored.messages) == [0, 1, 3, 4, 5]
    assert by_name["bad"].failed is not None and not by_name["bad"].result.dead
    assert slots[2].failed and slots[2].scoring() is None
    sample = metrics.prometheus.get_sample_value
    assert sample("stream_scorer_shadow_failed", {"model": "bad"}) == 1
    assert sample("stream_scorer_shadow_failed", {"model": "twin"}) == 0
    # the twin predicts the same values; its labels differ where 2.5 <= value < 3.5 (offset 3)
    assert sample("stream_scorer_shadow_compared_records_total", {"model": "twin"}) == 5
    assert sample("stream_scorer_shadow_agreed_records_total", {"model": "twin"}) == 4
    # signed deltas: negative buckets, so no _count/_sum (OpenMetrics); +Inf counts them all
    delta = "stream_scorer_shadow_prediction_delta_bucket"
    assert sample(delta, {"model": "twin", "le": "+Inf"}) == 5
    assert sample(delta, {"model": "twin", "le": "0.0"}) == 5  # the same values: all 0
    # the next batch: the failed shadow is not scored at all
    assert [o.name for o in models.score(MSGS).outputs] == ["champ", "twin"]
    for slot in slots:
        slot.close()


# --- rollouts and drift on models: entries --------------------------------------------------
def test_a_routed_entry_shares_the_decode_and_scores_each_record_with_its_keys_version() -> None:
    from stream_scorer.stages.route import RoutedPipeline, split_keys

    shared = Builder()
    msgs = [Msg(b"ok", k=f"k{i}".encode(), o=i) for i in range(40)]
    msgs[5] = Msg(b"bad", k=b"k5", o=5)
    routed = RoutedPipeline(
        [
            Pipeline(shared, Model("a-2", 2.0), ENCODER),
            Pipeline(shared, Model("a-1", 1.0), ENCODER),
        ],
        [50],
    )
    models = [
        Scoring("a", "out-a", routed),
        Scoring("b", "out-b", Pipeline(shared, Model("b-1", 3.0), ENCODER)),
    ]
    result = score_batch(models, msgs)
    assert shared.runs == 1  # one decode for both entries and both versions
    routes = split_keys([m.key() for m in msgs], [50])
    want = {i: "a-2" if r == 0 else "a-1" for i, r in enumerate(routes) if i != 5}
    assert {"a-1", "a-2"} <= set(want.values())
    a, b = (o.result for o in result.outputs)
    assert a.scored.versions is not None
    assert dict(zip(_offsets(a.scored.messages), a.scored.versions, strict=True)) == want
    scale = {"a-1": 1.0, "a-2": 2.0}
    offsets = _offsets(a.scored.messages)
    np.testing.assert_array_equal(a.values, [scale[want[o]] * o for o in offsets])
    assert b.scored.versions is None and _offsets(b.scored.messages) == sorted(want)
    # the undecodable record: one dead letter of no model in particular
    assert [d.message.offset() for d in result.dead] == [5] and not a.dead and not b.dead


def test_each_models_copy_headers_apply_to_its_own_predictions() -> None:
    producer = FakeProducer()
    ctx = SinkContext("out", "dlq", "grp", "w1", "v9", copy_headers=frozenset({"ctx"}))
    sink = Sink(producer, ctx, OffsetTracker(), Metrics())
    msg = Msg(b"x", hdrs=[("trace", b"t"), ("ctx", b"c"), ("other", b"o")])

    def out(name: str, copy: frozenset[str] | None) -> ModelOutput:
        result = BatchResult(Scored([msg], [b"p"], [0]), [], {}, f"{name}-1")
        return ModelOutput(name, f"out-{name}", result, copy_headers=copy)

    sink.publish_batch(MultiResult([out("a", frozenset({"trace"})), out("b", None)]))
    copied = {
        s["topic"]: {k for k in s["headers"] if k in ("trace", "ctx", "other")}
        for s in producer.sent
    }
    assert copied == {"out-a": {"trace"}, "out-b": {"ctx"}}


def test_delivered_counts_versions_and_feeds_each_entrys_drift_watch(tmp_path: Path) -> None:
    from stream_scorer.worker.loop import Models, model_name

    cfg = load_config(
        _models_config(
            tmp_path,
            [
                _entry("a", "o1", tmp_path),
                _entry("b", "o2", tmp_path, role="shadow", shadow_of="a"),
            ],
        ),
        environ={},
    )
    assert [model_name(cfg, e) for e in cfg.entries] == ["a", "b"]

    class Watch:
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []
            self.ticks = 0

        def observe(self, manifest: Any, matrix: Any, values: Any) -> None:
            self.seen.append((manifest.model_version, len(values)))

        def tick(self) -> None:
            self.ticks += 1

    class Manifest:
        def __init__(self, version: str) -> None:
            self.model_version = version

    class Scorer(Model):
        def __init__(self, version: str, scale: float) -> None:
            super().__init__(version, scale)
            self.manifest = Manifest(version)

    metrics = Metrics()
    shared = Builder()
    slots, watches = [], {}
    for entry, scale in zip(cfg.entries, (1.0, 2.0), strict=True):
        slot = Slot(
            entry,
            Source(tmp_path),
            lambda _d: None,  # type: ignore[arg-type, return-value]
            metrics,
            refresh_s=0,
            policy=RetryPolicy(),
            named=True,
        )
        scorer = Scorer(f"{entry.name}-1", scale)
        pipeline = Pipeline(shared, scorer, ENCODER)
        slot._use(LoadedModel("1", pipeline, scorer, tmp_path), None)  # type: ignore[arg-type]
        slots.append(slot)
        watches[entry.name] = Watch()
    models = Models(slots, metrics, None, watches)  # type: ignore[arg-type]
    models.delivered(models.score(MSGS))
    models.tick()
    assert {n: (w.seen, w.ticks) for n, w in watches.items()} == {
        "a": ([("a-1", 5)], 1),
        "b": ([("b-1", 5)], 1),
    }
    sample = metrics.prometheus.get_sample_value
    for name in ("a", "b"):
        labels = {"model": name, "model_version": f"{name}-1"}
        assert sample("stream_scorer_version_predictions_total", labels) == 5
        assert sample("stream_scorer_rollout_weight_percent", labels) == 100
    for slot in slots:
        slot.close()
