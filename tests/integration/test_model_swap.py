"""Hot swap on a real broker: promote, kill -9 during the rollout, roll back, refuse a broken one.

3 exactly-once worker processes follow the alias ``champion`` of a model store (and of a real
MLflow Model Registry) with ``model.refresh_s`` = 0.5 while events stream in phases:

1. v1 scores; v2 is promoted (``stream-scorer model promote``) and a worker is killed -9 at
   once, while the others load v2 and events keep coming; every worker then runs v2 (their
   logs say so);
2. ``model rollback``: every worker back on v1 (kept loaded: a pointer move);
3. a broken v3 (its model file does not match its manifest's sha256) is promoted: every worker
   refuses it and keeps scoring with v1.

An independent ``read_committed`` reader then checks: every input exactly one output (the
fault harness's exactly-once checks), no output stamped v3, and each output's stamp matches the
alias history around it: v2 only from the promotion on and at the latest until the last
worker swapped back, v1 never between the moment the last worker ran v2 and the rollback; the
outputs of one batch (one ``scored_at`` per source partition) all carry one version.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from faults import PARTITIONS, FaultRun, tail, when_committed
from mlflow_server import mlflow_server
from support import free_ports, parse_record_schema, read_record, read_topic, unavailable

from stream_scorer import headers as hdr
from stream_scorer.contracts.manifest import read_manifest
from stream_scorer.errors import LocalMlflowError
from stream_scorer.example.train import train
from stream_scorer.model.mlflow import MlflowRegistry
from stream_scorer.model.store import ModelStore

ROOT = Path(__file__).parents[2]
EVENTS = int(os.environ.get("SWAP_EVENTS", "16000"))
RATE = float(os.environ.get("SWAP_RATE", "1000"))
REFRESH_S = 0.5
PHASES = 4
EOS = "exactly-once"
#: The worker's log lines that say which model it runs from then on.
STARTED = re.compile(r"^model (\S+) from ")
SWAPPED = re.compile(r"^model swapped: \S+ -> (\S+) ")
REFUSED = re.compile(r"^model version \S+ of \S+ refused")


def _ms(ts: str) -> int:
    return round(datetime.fromisoformat(ts).timestamp() * 1000)


def _events(log: Path) -> list[tuple[int, str, str]]:
    """``(ms, kind, version)`` of a worker log's model lines: runs, refused."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = str(entry.get("msg", ""))
        for kind, pattern in (("runs", STARTED), ("runs", SWAPPED), ("refused", REFUSED)):
            found = pattern.match(msg)
            if found:
                version = found.group(1) if found.groups() else ""
                out.append((_ms(entry["ts"]), kind, version))
    return out


def _all_run(run: FaultRun, version: str) -> int | None:
    """When the last live worker started running ``version`` (ms), or None if one does not yet.

    A worker counts once its latest model line (start-up or swap) names ``version``.
    """
    latest = 0
    for worker in run.workers.values():
        if worker.proc.poll() is not None:
            continue
        runs = [(ms, v) for ms, kind, v in _events(worker.log) if kind == "runs"]
        if not runs or runs[-1][1] != version:
            return None
        latest = max(latest, runs[-1][0])
    return latest


def _all_joined(run: FaultRun) -> int | None:
    """When the last worker joined the group (its first ``assigned`` line, ms), or None."""
    latest = 0
    for worker in run.workers.values():
        joined = [
            _ms(entry["ts"])
            for line in worker.log.read_text(errors="replace").splitlines()
            if line.startswith("{") and '"assigned ' in line
            for entry in [json.loads(line)]
        ]
        if not joined:
            return None
        latest = max(latest, joined[0])
    return latest


def _all_refused(run: FaultRun, since_ms: int) -> int | None:
    """When the last live worker logged a refusal since ``since_ms``, or None."""
    latest = 0
    for worker in run.workers.values():
        refused = [
            ms for ms, kind, _ in _events(worker.log) if kind == "refused" and ms >= since_ms
        ]
        if worker.proc.poll() is None and not refused:
            return None
        latest = max([latest, *refused])
    return latest


def _cli(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stream_scorer", *args], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def _now_ms() -> int:
    return int(time.time() * 1000)


class Models:
    """v1, v2 and a broken v3 in a store (model store or MLflow) the CLI can promote in."""

    def __init__(self, spec: str, versions: dict[str, str], cli: tuple[str, ...]) -> None:
        self.spec = spec  # store:<root>/<name> or models:/<name>
        self.versions = versions  # v1/v2/v3 -> the store's version name
        self.cli = cli  # extra CLI arguments (the MLflow server)
        self.stamps: dict[str, str] = {}  # v1/v2/v3 -> manifest version (the outputs' stamp)

    def promote(self, which: str) -> int:
        before = _now_ms()
        _cli("model", "promote", self.spec, self.versions[which], *self.cli)
        return before

    def rollback(self) -> int:
        before = _now_ms()
        _cli("model", "rollback", self.spec, *self.cli)
        return before


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 and v2 (two trainings), and v3: v2's files under another version, its file corrupt."""
    root = tmp_path_factory.mktemp("swap-models")
    dirs = {}
    for name, seed in (("v1", 3), ("v2", 4)):
        dirs[name] = root / name
        train(dirs[name], rows=3000, seed=seed, n_estimators=30)
    broken = root / "v3"
    broken.mkdir()
    manifest = json.loads((dirs["v2"] / "manifest.json").read_text())
    manifest["model_version"] = manifest["model_version"] + "-broken"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    data = bytearray((dirs["v2"] / manifest["model_file"]).read_bytes())
    data[-10] ^= 0xFF  # one byte flipped: the sha256 check refuses it
    (broken / manifest["model_file"]).write_bytes(bytes(data))
    dirs["v3"] = broken
    return dirs


def _in_store(root: Path, dirs: dict[str, Path]) -> Models:
    store = ModelStore(root, "rides")
    versions = {which: store.publish(path) for which, path in dirs.items()}
    models = Models(f"store:{store.model_dir}", versions, ())
    models.stamps = dict(versions)
    return models


def _in_mlflow(uri: str, dirs: dict[str, Path]) -> Models:
    model = MlflowRegistry(uri).model(f"rides-{os.getpid()}-{_now_ms() % 10**6}")
    versions = {which: model.publish(path) for which, path in dirs.items()}
    models = Models(f"models:/{model.name}", versions, ("--tracking-uri", uri))
    models.stamps = {which: read_manifest(path).model_version for which, path in dirs.items()}
    return models


def _check_stamps(
    run: FaultRun, models: Models, t: dict[str, int], schema: dict[str, Any]
) -> dict[str, int]:
    """Every output's version against the alias history; returns outputs per version."""
    v1, v2, v3 = (models.stamps[k] for k in ("v1", "v2", "v3"))
    counts: dict[str, int] = {}
    batches: dict[tuple[Any, int], set[str]] = {}
    bad: list[tuple[str, int, str]] = []
    for topic in (run.out, run.dlq):
        for msg in read_topic(run.bootstrap, topic):
            headers = dict(msg.headers() or [])
            version = headers[hdr.MODEL_VERSION].decode()
            counts[version] = counts.get(version, 0) + 1
            at = msg.timestamp()[1]
            if version == v2:
                ok = t["promote"] <= at <= t["all_v1"]
            elif version == v1:
                ok = at <= t["all_v2"] or at >= t["rollback"]
            else:
                ok = False  # v3 never scores
            if not ok:
                bad.append((topic, at, version))
            if at > t["refused"]:
                counts["after_refused"] = counts.get("after_refused", 0) + 1
            if topic == run.out:
                record = read_record(schema, msg.value())
                key = (record["scored_at"], int(headers[hdr.SOURCE_PARTITION]))
                batches.setdefault(key, set()).add(version)
    assert not bad, (bad[:10], len(bad), t)
    mixed = {k: v for k, v in batches.items() if len(v) > 1}
    assert not mixed, list(mixed.items())[:5]
    assert v3 not in counts
    return counts


def _rollout(run: FaultRun, models: Models, schema: dict[str, Any]) -> None:
    """The whole scenario (module doc) on ``run``; asserts as it goes.

    Events stream without a pause through the promotion and the kill (so the kill hits a worker
    that is scoring) and again through the rollback; the second quarter is produced once every
    worker runs v2 (a loaded machine can take longer to restart the killed worker than the
    first quarter takes to stream: v2 would find nothing left to score), and the last quarter
    once every worker has refused v3, so that v1 is seen scoring after the refusals.
    """
    quarter = len(run.items) // PHASES // PARTITIONS * PARTITIONS
    last = quarter * (PHASES - 1)
    t: dict[str, int] = {}
    models.promote("v1")
    run.start_all()
    # the events are produced on a clock: started before the workers can consume (their
    # start-up takes seconds on a busy machine), the first quarter was all produced and scored
    # by v1 before v2 was even promoted
    run.until(lambda: _all_joined(run), "every worker joined the group")
    run.produce_in_background(0, quarter)
    when_committed(run, 0.5 / PHASES)
    # 1. promote v2, kill -9 a worker at once (while the others load v2), restart it
    t["promote"] = models.promote("v2")
    run.kill9("w0")
    t["killed"] = _now_ms()  # w0 scored nothing after this, with any version
    t["all_v2"] = max(
        run.until(lambda: _all_run(run, models.stamps["v2"]), "every worker runs v2"),
        t["killed"],
    )
    run.wait_produced()
    run.produce_in_background(quarter, last)  # scored by v2 until the rollback
    when_committed(run, 1.5 / PHASES)
    # 2. roll back: every worker back on v1
    t["rollback"] = models.rollback()
    t["all_v1"] = run.until(lambda: _all_run(run, models.stamps["v1"]), "all back on v1")
    when_committed(run, 2.2 / PHASES)
    # 3. a broken v3: refused by every worker, v1 keeps scoring
    t["promote_v3"] = models.promote("v3")
    t["refused"] = run.until(lambda: _all_refused(run, t["promote_v3"]), "all refused v3")
    run.wait_produced()
    run.produce_in_background(last)
    run.wait_produced()
    run.wait_committed(timeout=180)
    codes = run.stop_all()
    assert all(c == 0 for c in codes.values()), {w: tail(run.workers[w].log) for w in codes}
    outcome = run.verify()
    print(outcome.line(), t)
    assert outcome.lost == 0 and outcome.duplicated == 0, outcome.line()
    assert outcome.dead_letter_mismatches == 0
    assert outcome.dead_letters_found == outcome.dead_letters_expected
    assert not outcome.unexpected_exits, outcome.unexpected_exits
    counts = _check_stamps(run, models, t, schema)
    assert counts.get(models.stamps["v2"], 0) > 0, counts
    # the last quarter, produced after every worker refused v3, was scored by v1
    assert counts.get("after_refused", 0) > 0, counts


MakeRun = Callable[[str, dict[str, Any]], FaultRun]


@pytest.fixture
def make_run(kafka_bootstrap: str, tmp_path: Path) -> Iterator[MakeRun]:
    runs: list[FaultRun] = []

    def make(name: str, model: dict[str, Any]) -> FaultRun:
        run = FaultRun(
            kafka_bootstrap,
            tmp_path,
            tmp_path,
            mode=EOS,
            name=name,
            events=EVENTS,
            rate=RATE,
            model=model,
        )
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.kill_all()


@pytest.fixture(scope="module")
def prediction_schema() -> dict[str, Any]:
    return parse_record_schema(json.loads((ROOT / "schemas" / "prediction.v1.avsc").read_text()))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.faults
def test_model_store_rollout_with_kill_9_rollback_and_a_refused_version(
    make_run: MakeRun,
    model_dirs: dict[str, Path],
    tmp_path: Path,
    prediction_schema: dict[str, Any],
) -> None:
    models = _in_store(tmp_path / "store", model_dirs)
    run = make_run("swap-store", {"source": f"{models.spec}@champion", "refresh_s": REFRESH_S})
    _rollout(run, models, prediction_schema)


@pytest.mark.slow  # the MLflow variant of the fault suite's model-store rollout
@pytest.mark.integration
def test_mlflow_registry_rollout_with_kill_9_rollback_and_a_refused_version(
    make_run: MakeRun,
    model_dirs: dict[str, Path],
    mlflow_uri: str,
    prediction_schema: dict[str, Any],
) -> None:
    models = _in_mlflow(mlflow_uri, model_dirs)
    run = make_run(
        "swap-mlflow",
        {
            "source": f"{models.spec}@champion",
            "refresh_s": REFRESH_S,
            "mlflow_tracking_uri": mlflow_uri,
        },
    )
    _rollout(run, models, prediction_schema)


@pytest.fixture(scope="module")
def mlflow_auth_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow server with its basic-auth app (user ``admin``, ``ADMIN_PASSWORD``)."""
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    try:
        with mlflow_server(workdir, free_ports(1)[0], admin_password=ADMIN_PASSWORD) as uri:
            yield uri
    except LocalMlflowError as exc:
        unavailable(f"no MLflow server ({exc}); `make mlflow-tools` installs one")


ADMIN_PASSWORD = "stream-scorer-admin-1"


@pytest.mark.integration
def test_mlflow_registry_with_basic_auth(
    mlflow_auth_uri: str, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stream_scorer.errors import EXIT_DEPLOYMENT, RefusedError, exit_code
    from stream_scorer.model.mlflow import MlflowSource
    from stream_scorer.model.store import open_store, promote, rollback

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    store = open_store("models:/rides-auth", tracking_uri=mlflow_auth_uri)
    model = MlflowRegistry.from_environment(mlflow_auth_uri).model("rides-auth")
    v1, v2 = model.publish(model_dirs["v1"]), model.publish(model_dirs["v2"])
    promote(store, v1)
    promote(store, v2)
    source = MlflowSource("rides-auth", "champion", None, tracking_uri=mlflow_auth_uri)
    try:
        assert source.wanted() == v2
        fetched = source.fetch(v2)
        assert read_manifest(fetched) == read_manifest(model_dirs["v2"])
        assert rollback(store).after == v1
        assert source.wanted() == v1
    finally:
        source.close()
    assert not fetched.exists()  # close() removes the downloads
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-pw-7")
    with pytest.raises(RefusedError) as err:  # a configuration error (exit 2), not an outage
        MlflowSource("rides-auth", "champion", None, tracking_uri=mlflow_auth_uri).wanted()
    assert exit_code(err.value) == EXIT_DEPLOYMENT and err.value.status == 401
    assert f"MLflow server {mlflow_auth_uri} refused the credentials of user 'admin'" in str(
        err.value
    )
    assert "wrong-pw-7" not in str(err.value)
