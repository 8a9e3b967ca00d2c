"""Several models on one stream (``models:``), and shadow challengers, against a real broker."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xgboost as xgb
import yaml
from support import (
    PAYMENT_FEATURES,
    PAYMENT_SCHEMA,
    avro,
    committed_lag,
    payment_matrix,
    payments,
    produce_raw,
    read_record,
    read_topic,
    train_model,
    train_payment_classifier,
    write_schema,
)

from stream_scorer import headers as hdr
from stream_scorer.config import load_config
from stream_scorer.contracts.manifest import FeatureSpec
from stream_scorer.model.rollout import make
from stream_scorer.model.store import ModelStore, promote, start_rollout
from stream_scorer.stages.decode import load_schema
from stream_scorer.stages.route import split_keys
from stream_scorer.worker.loop import run_worker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
PREDICTION = ROOT / "schemas" / "prediction.v1.avsc"
PARTITIONS = 3
#: The third model's features: a subset, and a policy the other two do not have (a missing age
#: is a dead letter for this model only).
AGE_FEATURES = (
    FeatureSpec("amount", "amount"),
    FeatureSpec("age", "customer.age", policy={"missing": "dead_letter"}),
    FeatureSpec("tenure", "customer.tenure_days"),
)
AGE_COLUMNS = [0, 5, 6]


@dataclass(frozen=True)
class Models:
    fraud: Path
    spend: Path
    age: Path
    challenger: Path
    broken: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    """Four models on the payment schema's features, and one that cannot load."""
    base = tmp_path_factory.mktemp("models")
    train_payment_classifier(base / "fraud", threshold=0.3, version="fraud-1")
    x = payment_matrix(payments(2000, seed=99))
    spend = 0.01 * x[:, 0] + 0.001 * x[:, 6]
    train_model(base / "spend", PAYMENT_FEATURES, x, spend, "reg:squarederror", version="spend-1")
    age = np.nan_to_num(x[:, 5], nan=40.0) / 10 + 0.002 * x[:, 0]
    train_model(
        base / "age", AGE_FEATURES, x[:, AGE_COLUMNS], age, "reg:squarederror", version="age-1"
    )
    # a challenger whose manifest names a field the input does not have: it cannot load
    train_model(
        base / "broken",
        (FeatureSpec("nope", "no_such_field"),),
        x[:, :1],
        spend,
        "reg:squarederror",
        version="broken-1",
    )
    # the challenger differs from the champion: retrained on other labels
    xc = payment_matrix(payments(2000, seed=7))
    train_model(
        base / "challenger",
        PAYMENT_FEATURES,
        xc,
        (xc[:, 0] > 80).astype(np.float32),
        "binary:logistic",
        threshold=0.3,
        version="fraud-2",
    )
    return Models(
        base / "fraud", base / "spend", base / "age", base / "challenger", base / "broken"
    )


@dataclass
class Stream:
    bootstrap: str
    topic: str
    dlq: str
    recs: list[dict[str, Any]]
    items: list[tuple[bytes | None, bytes | None]]
    raw: dict[str, Any]
    unique: Callable[[str], str]
    make_topics: Callable[[dict[str, int]], None]

    def config(self, tmp: Path, entries: list[tuple[str, Path | str, str]], **extra: Any) -> Path:
        """A configuration scoring with ``entries`` (name, model directory or source spec,
        role[:champion])."""
        models = []
        for name, directory, role in entries:
            out = self.unique(f"out-{name}")
            self.make_topics({out: PARTITIONS})
            entry: dict[str, Any] = {
                "name": name,
                "model": (
                    {"source": directory}
                    if isinstance(directory, str)
                    else {"path": str(directory)}
                ),
                "output": {"topic": out, "schema": str(PREDICTION)},
            }
            if role.startswith("shadow:"):
                entry |= {"role": "shadow", "shadow_of": role.split(":", 1)[1]}
            models.append(entry)
        raw = {
            **self.raw,
            "input": {**self.raw["input"], "group_id": self.unique("grp")},
            "models": models,
            **extra,
        }
        path = tmp / f"{self.unique('worker')}.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path


@pytest.fixture
def stream(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
) -> Stream:
    """An input topic holding 600 payments and 2 records no model can decode."""
    topic, dlq = unique("payments"), unique("dlq")
    make_topics({topic: PARTITIONS, dlq: 1})
    recs = payments(600, seed=31)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    items += [(b"bad-trunc", avro(PAYMENT_SCHEMA, recs[0])[:5]), (b"bad-empty", b"")]
    produce_raw(kafka_bootstrap, topic, items, PARTITIONS)
    raw = {
        "kafka": {"bootstrap_servers": kafka_bootstrap},
        "input": {
            "topic": topic,
            "schema": str(write_schema(tmp_path / "payment.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
            "event_time_field": "at",
        },
        "dead_letter": {"topic": dlq},
        "batch": {"max_records": 200, "max_wait_ms": 20},
        "metrics": {"port": 0},
    }
    return Stream(kafka_bootstrap, topic, dlq, recs, items, raw, unique, make_topics)


def _outputs(bootstrap: str, topic: str) -> dict[str, dict[str, Any]]:
    """The predictions of ``topic`` by input id (read_committed); each id must come once."""
    schema = load_schema(PREDICTION)
    msgs = read_topic(bootstrap, topic)
    decoded = [read_record(schema, m.value()) for m in msgs]
    counts = Counter(d["input_id"] for d in decoded)
    assert max(counts.values(), default=1) == 1, counts.most_common(3)
    for msg, d in zip(msgs, decoded, strict=True):
        assert msg.key() == d["input_id"].encode()
        assert dict(msg.headers())[hdr.MODEL_VERSION] == d["model_version"].encode()
    return {d["input_id"]: d for d in decoded}


def _expected(directory: Path, recs: list[dict[str, Any]], columns: list[int] | None = None) -> Any:
    """The model's own xgboost predictions for ``recs`` (features computed independently)."""
    booster = xgb.Booster(model_file=str(directory / "model.ubj"))
    x = payment_matrix(recs)
    return booster.inplace_predict(x if columns is None else x[:, columns])


def _topics(cfg_path: Path) -> dict[str, str]:
    cfg = load_config(cfg_path, environ={})
    return {e.name: e.output.topic for e in cfg.entries}


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_three_models_score_every_event_once_each(
    tmp_path: Path, stream: Stream, models: Models, mode: str
) -> None:
    path = stream.config(
        tmp_path,
        [
            ("fraud", models.fraud, "serve"),
            ("spend", models.spend, "serve"),
            ("age", models.age, "serve"),
        ],
        delivery={"mode": mode},
    )
    cfg = load_config(path, environ={}, overrides={"worker": {"max_messages": len(stream.items)}})
    report = run_worker(cfg)
    assert report.consumed == len(stream.items)

    topics = _topics(path)
    by_id = {r["txn_id"]: r for r in stream.recs}
    no_age = {r["txn_id"] for r in stream.recs if r["customer"]["age"] is None}
    assert 50 < len(no_age) < 200
    for name, directory, columns, want in (
        ("fraud", models.fraud, None, set(by_id)),
        ("spend", models.spend, None, set(by_id)),
        ("age", models.age, AGE_COLUMNS, set(by_id) - no_age),
    ):
        got = _outputs(stream.bootstrap, topics[name])
        assert set(got) == want, name  # one output per event this model can score, by key
        ids = sorted(got)
        expected = _expected(directory, [by_id[i] for i in ids], columns).astype(np.float64)
        np.testing.assert_array_equal([got[i]["prediction"] for i in ids], expected)
        assert {d["model_version"] for d in got.values()} == {f"{name}-1"}
    labels = _outputs(stream.bootstrap, topics["fraud"])
    assert all(d["label"] == int(d["prediction"] >= 0.3) for d in labels.values())

    dead = read_topic(stream.bootstrap, stream.dlq)
    heads = [dict(m.headers()) for m in dead]
    # the two undecodable records: one dead letter each, naming no model
    undecodable = [h for m, h in zip(dead, heads, strict=True) if m.key().startswith(b"bad-")]
    assert sorted(h[hdr.CONNECT_STAGE] for h in undecodable) == [b"decode", b"decode"]
    assert all(hdr.MODEL_NAME not in h for h in undecodable)
    # a missing age: a dead letter of the age model only, with the original bytes
    refused = [(m, h) for m, h in zip(dead, heads, strict=True) if hdr.MODEL_NAME in h]
    assert {m.key().decode() for m, _ in refused} == no_age
    assert len(refused) == len(no_age)
    assert {h[hdr.MODEL_NAME] for _, h in refused} == {b"age"}
    assert {h[hdr.REASON] for _, h in refused} == {b"missing_value"}
    assert {h[hdr.MODEL_VERSION] for _, h in refused} == {b"age-1"}
    originals = dict(stream.items)
    assert all(m.value() == originals[m.key()] for m, _ in refused)
    assert len(dead) == 2 + len(no_age)
    assert committed_lag(stream.bootstrap, cfg.input.group_id, stream.topic) == dict.fromkeys(
        range(PARTITIONS), 0
    )


def test_a_shadow_scores_beside_its_champion_without_changing_it(
    tmp_path: Path, stream: Stream, models: Models
) -> None:
    alone = stream.config(tmp_path, [("fraud", models.fraud, "serve")])
    shadowed = stream.config(
        tmp_path,
        [("fraud", models.fraud, "serve"), ("next", models.challenger, "shadow:fraud")],
        delivery={"mode": "exactly-once"},
    )
    limit = {"worker": {"max_messages": len(stream.items)}}
    for path in (alone, shadowed):
        run_worker(load_config(path, environ={}, overrides=limit))

    def fields(d: dict[str, Any]) -> tuple[Any, ...]:
        return d["prediction"], d["label"], d["model_version"]

    champion_alone = _outputs(stream.bootstrap, _topics(alone)["fraud"])
    champion = _outputs(stream.bootstrap, _topics(shadowed)["fraud"])
    assert len(champion) == len(stream.recs)
    assert {k: fields(v) for k, v in champion.items()} == {
        k: fields(v) for k, v in champion_alone.items()
    }
    shadow = _outputs(stream.bootstrap, _topics(shadowed)["next"])
    assert set(shadow) == set(champion)  # complete
    assert {d["model_version"] for d in shadow.values()} == {"fraud-2"}
    ids = sorted(shadow)
    by_id = {r["txn_id"]: r for r in stream.recs}
    expected = _expected(models.challenger, [by_id[i] for i in ids]).astype(np.float64)
    np.testing.assert_array_equal([shadow[i]["prediction"] for i in ids], expected)
    # the shadow wrote no dead letters: only the two undecodable records are there
    # (both runs wrote the two undecodable records' dead letters to the same topic)
    keys = sorted(m.key() for m in read_topic(stream.bootstrap, stream.dlq))
    assert keys == [b"bad-empty", b"bad-empty", b"bad-trunc", b"bad-trunc"]


def test_a_shadow_that_cannot_load_never_stops_its_champion(
    tmp_path: Path, stream: Stream, models: Models
) -> None:
    path = stream.config(
        tmp_path,
        [("fraud", models.fraud, "serve"), ("broken", models.broken, "shadow:fraud")],
    )
    cfg = load_config(path, environ={}, overrides={"worker": {"max_messages": len(stream.items)}})
    report = run_worker(cfg)
    assert report.consumed == len(stream.items)
    assert len(_outputs(stream.bootstrap, _topics(path)["fraud"])) == len(stream.recs)
    assert read_topic(stream.bootstrap, _topics(path)["broken"]) == []
    assert committed_lag(stream.bootstrap, cfg.input.group_id, stream.topic) == dict.fromkeys(
        range(PARTITIONS), 0
    )


def test_a_canary_on_one_entry_routes_by_key_while_another_scores_everything(
    tmp_path: Path, stream: Stream, models: Models
) -> None:
    store = ModelStore(tmp_path / "store", "fraud")
    v1, v2 = (store.publish(d) for d in (models.fraud, models.challenger))
    promote(store, v1)
    start_rollout(store, make("canary", v1, [(v2, 30)], "test"))
    path = stream.config(
        tmp_path,
        [("fraud", f"store:{store.model_dir}@champion", "serve"), ("spend", models.spend, "serve")],
        delivery={"mode": "exactly-once"},
    )
    cfg = load_config(path, environ={}, overrides={"worker": {"max_messages": len(stream.items)}})
    assert run_worker(cfg).consumed == len(stream.items)

    topics = _topics(path)
    by_id = {r["txn_id"]: r for r in stream.recs}
    ids = sorted(by_id)
    # the canary's entry: each key scored by the version its key routes to, and stamped with it
    fraud = _outputs(stream.bootstrap, topics["fraud"])
    assert set(fraud) == set(by_id)
    routes = split_keys([i.encode() for i in ids], [30])
    want = {i: v2 if r == 0 else v1 for i, r in zip(ids, routes, strict=True)}
    assert {i: d["model_version"] for i, d in fraud.items()} == want
    assert 0.15 < sum(v == v2 for v in want.values()) / len(want) < 0.45
    for version, directory in ((v1, models.fraud), (v2, models.challenger)):
        mine = [i for i in ids if want[i] == version]
        expected = _expected(directory, [by_id[i] for i in mine]).astype(np.float64)
        np.testing.assert_array_equal([fraud[i]["prediction"] for i in mine], expected)
    # the other entry: every record, by its one version
    spend = _outputs(stream.bootstrap, topics["spend"])
    assert set(spend) == set(by_id)
    assert {d["model_version"] for d in spend.values()} == {"spend-1"}
    expected = _expected(models.spend, [by_id[i] for i in ids]).astype(np.float64)
    np.testing.assert_array_equal([spend[i]["prediction"] for i in ids], expected)
    keys = sorted(m.key() for m in read_topic(stream.bootstrap, stream.dlq))
    assert keys == [b"bad-empty", b"bad-trunc"]  # one dead letter per undecodable record
