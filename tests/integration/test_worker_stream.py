"""The worker against a real broker, with a second schema (not the example) and a classifier."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import xgboost as xgb
import yaml
from support import (
    PAYMENT_SCHEMA,
    avro,
    committed_lag,
    committed_offsets,
    free_ports,
    payment_matrix,
    payments,
    produce_raw,
    read_record,
    read_topic,
    train_payment_classifier,
    wait_for,
    write_schema,
)

from stream_scorer import headers as hdr
from stream_scorer.config import load_config
from stream_scorer.stages.decode import load_schema
from stream_scorer.worker.loop import run_worker
from stream_scorer.worker.supervisor import run_command

pytestmark = pytest.mark.integration
ROOT = Path(__file__).parents[2]
PARTITIONS = 3


@dataclass
class Env:
    bootstrap: str
    config: Path
    topic: str
    out: str
    dlq: str
    group: str
    model_dir: Path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fraud-model")
    train_payment_classifier(path, threshold=0.3)
    return path


@pytest.fixture
def env(
    tmp_path: Path,
    kafka_bootstrap: str,
    unique: Callable[[str], str],
    make_topics: Callable[[dict[str, int]], None],
    model_dir: Path,
) -> Env:
    topic, out, dlq, group = unique("payments"), unique("scores"), unique("dlq"), unique("grp")
    make_topics({topic: PARTITIONS, out: PARTITIONS, dlq: 1})
    raw = {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "statistics_interval_ms": 1000},
        "input": {
            "topic": topic,
            "group_id": group,
            "schema": str(write_schema(tmp_path / "payment.avsc", PAYMENT_SCHEMA)),
            "id_field": "txn_id",
            "event_time_field": "at",
        },
        "output": {"topic": out, "schema": str(ROOT / "schemas" / "prediction.v1.avsc")},
        "dead_letter": {"topic": dlq},
        "model": {"path": str(model_dir)},
        "batch": {"max_records": 200, "max_wait_ms": 20},
        "metrics": {"port": 0},
    }
    config = tmp_path / "worker.yaml"
    config.write_text(yaml.safe_dump(raw))
    return Env(kafka_bootstrap, config, topic, out, dlq, group, model_dir)


def _headers(msg: Any) -> dict[str, bytes]:
    return dict(msg.headers() or [])


def _decode_predictions(msgs: list[Any]) -> list[dict[str, Any]]:
    schema = load_schema(ROOT / "schemas" / "prediction.v1.avsc")
    return [read_record(schema, m.value()) for m in msgs]


def test_classifier_on_a_second_schema_scores_everything_and_dead_letters_the_rest(
    env: Env,
) -> None:
    recs = payments(600, seed=21)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    bad = {
        600: (b"bad-empty", b""),
        601: (b"bad-trunc", avro(PAYMENT_SCHEMA, recs[0])[:5]),
        602: (b"bad-trailing", avro(PAYMENT_SCHEMA, recs[1]) + b"\x02"),
        603: (b"bad-inf", avro(PAYMENT_SCHEMA, dict(recs[2], amount=math.inf))),
        604: (None, b"\x00\x01\x02"),
    }
    items.extend(bad.values())
    produce_raw(env.bootstrap, env.topic, items, PARTITIONS)

    cfg = load_config(env.config, environ={}, overrides={"worker": {"max_messages": len(items)}})
    report = run_worker(cfg)

    assert report.consumed == len(items)
    assert report.predictions == 600
    assert sum(report.dead_letters.values()) == 5
    preds = read_topic(env.bootstrap, env.out)
    dead = read_topic(env.bootstrap, env.dlq)
    assert len(preds) == 600
    assert len(dead) == 5

    # values: the model's own prediction for the same rows, keyed and labelled
    by_id = {r["txn_id"]: r for r in recs}
    decoded = _decode_predictions(preds)
    ids = [d["input_id"] for d in decoded]
    assert sorted(ids) == sorted(by_id)
    assert [m.key().decode() for m in preds] == ids  # the input's key
    booster = xgb.Booster(model_file=str(env.model_dir / "model.ubj"))
    expected = booster.inplace_predict(payment_matrix([by_id[i] for i in ids]))
    np.testing.assert_allclose([d["prediction"] for d in decoded], expected, rtol=1e-6)
    assert [d["label"] for d in decoded] == [int(p >= 0.3) for p in expected]
    assert {d["model_version"] for d in decoded} == {"test-model-1"}
    assert [int(d["event_time"].timestamp() * 1000) for d in decoded] == [
        by_id[i]["at"] for i in ids
    ]

    # headers: model version and the source record's partition and offset (item i went to
    # partition i % 3 at offset i // 3 of a fresh topic)
    for msg, d in zip(preds, decoded, strict=True):
        h = _headers(msg)
        assert h[hdr.MODEL_VERSION] == b"test-model-1"
        assert h[hdr.SOURCE_TOPIC] == env.topic.encode()
        index = int(h[hdr.SOURCE_OFFSET]) * PARTITIONS + int(h[hdr.SOURCE_PARTITION])
        assert recs[index]["txn_id"] == d["input_id"]

    # dead letters: original bytes, reasons, source coordinates
    got = {m.key(): m for m in dead}
    reasons = {k: _headers(m)[hdr.REASON].decode() for k, m in got.items()}
    assert reasons == {
        b"bad-empty": "empty",
        b"bad-trunc": "truncated",
        b"bad-trailing": "trailing_bytes",
        b"bad-inf": "non_finite",
        None: "truncated",
    }
    for index, (key, value) in bad.items():
        msg = got[key]
        assert msg.value() == value
        h = _headers(msg)
        assert h["origin"] == b"test"  # original headers kept
        assert h[hdr.CONNECT_TOPIC] == env.topic.encode()
        assert h[hdr.CONNECT_STAGE] in (b"decode", b"features")
        assert h[hdr.CONSUMER_GROUP] == env.group.encode()
        assert h[hdr.CONNECT_PARTITION] == str(index % PARTITIONS).encode()
        assert h[hdr.CONNECT_OFFSET] == str(index // PARTITIONS).encode()

    assert committed_lag(env.bootstrap, env.group, env.topic) == dict.fromkeys(range(PARTITIONS), 0)


def _worker(
    env: Env, *extra: str, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        run_command(env.config, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error", **(extra_env or {})},
    )


def _read_lines(stream: IO[str] | None, into: list[str]) -> None:
    """Append each line of ``stream`` to ``into`` until it closes."""
    assert stream is not None
    for line in stream:
        into.append(line)  # one by one: the test reads the list while the worker runs


def _messages(lines: list[str]) -> list[str]:
    """The messages of the JSON log lines among ``lines``."""
    return [json.loads(line)["msg"] for line in list(lines) if line.startswith("{")]


def test_worker_stopped_mid_stream_hands_over_to_another_with_nothing_lost(env: Env) -> None:
    recs = payments(20_000, seed=5)
    items = [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs]
    first = _worker(env, "--worker-id", "first")
    # events keep arriving (over ~12 s) while the first worker runs and is stopped
    producing = threading.Thread(
        target=produce_raw,
        args=(env.bootstrap, env.topic, items, PARTITIONS),
        kwargs={"per_second": 1600},
    )
    producing.start()
    try:
        wait_for(
            lambda: max(committed_offsets(env.bootstrap, env.group, env.topic).values()) > 0,
            60,
            "first worker committed nothing",
        )
        first.send_signal(signal.SIGTERM)
    finally:
        producing.join()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    report_1 = json.loads(out.strip().splitlines()[-1])
    assert report_1["stopped_by"] == "SIGTERM"
    assert 0 < report_1["consumed"] < len(recs)  # really stopped mid-stream

    second = _worker(env, "--worker-id", "second", "--idle-timeout", "3")
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    report_2 = json.loads(out.strip().splitlines()[-1])

    ids = Counter(d["input_id"] for d in _decode_predictions(read_topic(env.bootstrap, env.out)))
    assert set(ids) == {r["txn_id"] for r in recs}  # nothing lost
    assert max(ids.values()) == 1  # a clean stop commits what it delivered: no duplicates
    assert report_1["predictions"] + report_2["predictions"] == len(recs)
    assert committed_lag(env.bootstrap, env.group, env.topic) == dict.fromkeys(range(PARTITIONS), 0)


def _scrape(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def test_metrics_endpoint_reports_counts_stages_and_lag(env: Env) -> None:
    recs = payments(1000, seed=8)
    for r in recs[::125]:
        r["country"] = "XX"  # none of the model's categories: scored as missing, and counted
    items = [(r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs] + [(b"bad", b"")]
    produce_raw(env.bootstrap, env.topic, items, PARTITIONS)
    port = free_ports(1)[0]
    progress = {"STREAM_SCORER_LOGGING__PROGRESS_INTERVAL_S": "0.2"}
    worker = _worker(env, "--metrics-port", str(port), extra_env=progress)
    stderr: list[str] = []  # the worker's log lines as they come (read meanwhile)
    readers = [
        threading.Thread(target=_read_lines, args=(worker.stderr, stderr), daemon=True),
        threading.Thread(target=_read_lines, args=(worker.stdout, []), daemon=True),
    ]
    for reader in readers:
        reader.start()

    def progress_lines() -> list[str]:
        return [s for s in _messages(stderr) if s.startswith("progress: ")]

    try:

        def settled() -> bool:
            try:
                m = _scrape(port)
            except OSError:
                return False
            lags = [v for k, v in m.items() if k.startswith("stream_scorer_consumer_lag_records{")]
            return (
                m.get("stream_scorer_predictions_produced_total") == 1000
                and len(lags) == PARTITIONS
                and sum(lags) == 0
            )

        wait_for(settled, 60, "metrics never showed 1000 predictions and zero lag")
        m = _scrape(port)
        # the lag is 0 from now on, so the progress lines (one per 0.2 s) must come to say so
        before = len(progress_lines())

        def says_lag_0() -> bool:
            return any(", lag 0 records," in s for s in progress_lines()[before:])

        wait_for(says_lag_0, 30, "no progress line said lag 0 after the metrics did")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=30)
        worker.__exit__(None, None, None)  # closes its pipes
    assert m["stream_scorer_records_consumed_total"] == 1001
    # the progress lines add up to what was consumed (and one said lag 0: waited for above)
    said = _messages(stderr)
    lines = progress_lines()
    assert sum(int(s.split()[1]) for s in lines) == 1001, lines
    assert sum(int(s.split("dead letters ")[1].split()[0].rstrip(",")) for s in lines) == 1
    assert all(s.endswith(", model test-model-1") for s in lines)
    unseen = [s for s in said if "none of its categories" in s]
    assert len(unseen) == 1 and unseen[0].startswith("feature 'country' met"), unseen
    assert m["stream_scorer_dead_letters_total{reason=empty,stage=decode}"] == 1
    assert m["stream_scorer_unseen_categories_total{feature=country}"] == 8
    assert m["stream_scorer_unseen_categories_total{feature=channel}"] == 0  # there from the start
    assert m["stream_scorer_batch_size_records_sum"] == 1001
    for stage in ("decode", "features", "predict", "encode", "produce"):
        assert m[f"stream_scorer_stage_duration_seconds_count{{stage={stage}}}"] >= 1
    assert m["stream_scorer_model_info{model_version=test-model-1}"] == 1
    assert m["stream_scorer_assigned_partitions"] == PARTITIONS
    assert m["stream_scorer_in_flight_records"] == 0
    assert m["stream_scorer_delivery_errors_total"] == 0


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_unreachable_broker_fails_loudly_instead_of_idling(env: Env, mode: str) -> None:
    port = free_ports(1)[0]  # nothing listens there: every connection is refused
    worker = _worker(
        env,
        "--bootstrap-servers",
        f"127.0.0.1:{port}",
        extra_env={
            "STREAM_SCORER_KAFKA__UNREACHABLE_TIMEOUT_S": "3",
            "STREAM_SCORER_DELIVERY__MODE": mode,
            # exactly-once used to wait for this, then say only "_TIMED_OUT"
            "STREAM_SCORER_DELIVERY__TRANSACTION_TIMEOUT_S": "20",
        },
    )
    _out, err = worker.communicate(timeout=120)
    assert worker.returncode == 1
    last = json.loads(err.strip().splitlines()[-1])
    assert last["msg"].startswith(f"BrokerError: no broker reachable at 127.0.0.1:{port} for ")
    assert "kafka.unreachable_timeout_s = 3" in last["msg"]
    # a handful of lines, not one per connection attempt of every client (hundreds)
    assert len(err.splitlines()) < 20, err


def _group_never_joined(bootstrap: str, group: str) -> bool:
    """No member ever joined ``group`` (a group that was joined and left is EMPTY, not DEAD)."""
    from confluent_kafka import ConsumerGroupState, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    answer: list[bool] = []

    def asked() -> bool:
        try:
            desc = admin.describe_consumer_groups([group], request_timeout=10)[group].result()
        except KafkaException as exc:
            if "GROUP_ID_NOT_FOUND" not in str(exc):
                return False  # the coordinator is still loading: ask again
            answer.append(True)  # newer brokers: no such group at all
            return True
        answer.append(desc.state == ConsumerGroupState.DEAD and not desc.members)
        return True

    wait_for(asked, 30, f"no answer about group {group}")
    return answer[0]


@pytest.mark.parametrize(
    ("mode", "missing"),
    [
        ("at-least-once", "output"),
        ("at-least-once", "dead_letter"),
        ("exactly-once", "dead_letter"),
        ("exactly-once", "input"),
    ],
)
def test_a_missing_topic_stops_start_up_naming_its_key_before_anything_is_consumed(
    env: Env, unique: Callable[[str], str], mode: str, missing: str
) -> None:
    from stream_scorer.errors import ConfigError, exit_code

    absent = unique("absent")
    produce_raw(env.bootstrap, env.topic, [(b"k", avro(PAYMENT_SCHEMA, payments(1)[0]))], 1)
    cfg = load_config(
        env.config,
        environ={},
        overrides={
            missing: {"topic": absent},
            "delivery": {"mode": mode},
            "worker": {"id": f"missing-{missing}-{mode}", "idle_timeout_s": 20},
        },
    )
    with pytest.raises(ConfigError) as info:
        run_worker(cfg)
    assert info.value.field == f"{missing}.topic"
    assert f"topic {absent!r} does not exist at {env.bootstrap}" in str(info.value)
    assert exit_code(info.value) == 2
    assert _group_never_joined(env.bootstrap, env.group)  # nothing consumed, no member


@pytest.mark.parametrize("mode", ["at-least-once", "exactly-once"])
def test_a_refused_dead_letter_stops_the_worker_and_its_offset_stays_uncommitted(
    env: Env, unique: Callable[[str], str], mode: str
) -> None:
    from stream_scorer.errors import BrokerError
    from stream_scorer.kafka.topics import ensure_topics

    # a dead-letter topic that refuses anything but tiny records: the dead letter cannot land
    tiny_dlq = unique("tiny-dlq")
    ensure_topics(env.bootstrap, {tiny_dlq: 1}, config={"max.message.bytes": "200"})
    recs = payments(300, seed=13)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    items.insert(150, (b"poison", b"\x00" * 400))  # partition 0 (round robin), offset 50
    produce_raw(env.bootstrap, env.topic, items, PARTITIONS)
    cfg = load_config(
        env.config,
        environ={},
        overrides={
            "dead_letter": {"topic": tiny_dlq},
            "delivery": {"mode": mode},
            "worker": {"id": f"refused-{mode}", "idle_timeout_s": 20},
        },
    )
    with pytest.raises(BrokerError) as info:
        run_worker(cfg)
    assert "MSG_SIZE_TOO_LARGE" in str(info.value) or "too large" in str(info.value).lower()
    assert repr(tiny_dlq) in str(info.value) or f"for {tiny_dlq} [0]" in str(info.value)
    committed = committed_offsets(env.bootstrap, env.group, env.topic)
    assert committed[0] <= 50  # the poison (partition 0, offset 50) was not committed
    assert read_topic(env.bootstrap, tiny_dlq) == []


def test_poison_past_the_tolerance_stops_the_worker_loudly_with_the_batch_uncommitted(
    env: Env,
) -> None:
    from stream_scorer.errors import PoisonLimitError

    recs = payments(30, seed=17)
    items: list[tuple[bytes | None, bytes | None]] = [
        (r["txn_id"].encode(), avro(PAYMENT_SCHEMA, r)) for r in recs
    ]
    items[12:12] = [(f"bad-{i}".encode(), b"\x00\x01") for i in range(6)]  # six in a row
    produce_raw(env.bootstrap, env.topic, items, 1)  # one partition: consume order = this order
    cfg = load_config(
        env.config,
        environ={},
        overrides={
            "dead_letter": {"max_consecutive": 5},
            "worker": {"idle_timeout_s": 20},
            "batch": {"max_records": 1000},
        },
    )
    with pytest.raises(PoisonLimitError, match="5 dead letters in a row"):
        run_worker(cfg)
    # the batch holding the run of poison was neither published nor committed (an earlier,
    # clean batch may have been, if the first fetch returned fewer records)
    assert committed_offsets(env.bootstrap, env.group, env.topic)[0] <= 12
    assert len(read_topic(env.bootstrap, env.out)) <= 12
    assert read_topic(env.bootstrap, env.dlq) == []


def test_json_and_framed_values_on_schemaless_input_are_dead_lettered_with_a_hint(
    env: Env,
) -> None:
    rec = payments(1, seed=5)[0]
    items: list[tuple[bytes | None, bytes | None]] = [
        (b"json", json.dumps({"txn_id": "t-1", "amount": 12.5}).encode()),
        (b"framed", b"\x00\x00\x00\x00\x2a" + avro(PAYMENT_SCHEMA, rec)),
        (b"good", avro(PAYMENT_SCHEMA, rec)),
    ]
    produce_raw(env.bootstrap, env.topic, items, PARTITIONS)
    cfg = load_config(env.config, environ={}, overrides={"worker": {"max_messages": len(items)}})
    report = run_worker(cfg)
    assert report.predictions == 1
    dead = {m.key(): _headers(m) for m in read_topic(env.bootstrap, env.dlq)}
    assert set(dead) == {b"json", b"framed"}
    said = {k: h[hdr.CONNECT_EXCEPTION_MESSAGE].decode() for k, h in dead.items()}
    hint = "the value does not look like Avro of schema test.payments.Payment"
    assert f"{hint}: it starts like JSON; is the producer writing JSON" in said[b"json"]
    assert "Confluent frame (magic byte 0, schema id 42)" in said[b"framed"]
    assert all(h[hdr.REASON] != b"" for h in dead.values())
