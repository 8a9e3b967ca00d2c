"""The deployment files, checked offline: no Docker engine, no cluster, no Prometheus server.

Each file goes through the checker its ecosystem uses (the Compose specification's schema,
kubernetes-validate, hadolint, promtool) and through assertions that tie the files together:
topics, consumer group, ports, grace periods, credentials and metric names must agree with the
worker's configuration and metrics. The tools are installed by ``make setup``; a missing tool
fails the test (it never skips).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import exported_metric_names
from support import tool as _tool

from stream_scorer.cli import build_parser
from stream_scorer.config import Config, client_settings, load_config
from stream_scorer.fast.cache import SEED_ENV

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboard.json"
EXAMPLE_CONFIG = DEPLOY / "config" / "rides.yaml"

# Manifests with a schema in kubernetes-validate (KEDA's custom resources are checked below).
CORE_MANIFESTS = (
    "configmap.yaml",
    "deployment.yaml",
    "networkpolicy.yaml",
    "pdb.yaml",
    "secret.template.yaml",
)

# The Kafka scaler's trigger metadata and authentication parameters (KEDA 2.x documentation).
KEDA_KAFKA_METADATA = {
    "bootstrapServers",
    "consumerGroup",
    "topic",
    "lagThreshold",
    "activationLagThreshold",
    "offsetResetPolicy",
    "allowIdleConsumers",
    "excludePersistentLag",
    "scaleToZeroOnInvalidOffset",
    "limitToPartitionsWithLag",
    "partitionLimitation",
    "version",
    "sasl",
    "tls",
    "unsafeSsl",
}
KEDA_KAFKA_AUTH = {"sasl", "username", "password", "tls", "ca", "cert", "key", "keyPassword"}
# Metrics queried that a worker does not export: Prometheus' own scrape health.
NOT_FROM_WORKERS = {"up"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _k8s(kind: str) -> dict[str, Any]:
    found = [d for f in sorted(K8S.glob("*.yaml")) for d in _docs(f) if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _compose() -> dict[str, Any]:
    data = _yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def _container() -> dict[str, Any]:
    containers = _k8s("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one worker process per pod: one container"
    return dict(containers[0])


def _configmap_config(tmp_path: Path, environ: dict[str, str] | None = None) -> Config:
    """Load the ConfigMap's config, its /app paths mapped to this checkout and a model dir."""
    text = _k8s("ConfigMap")["data"]["config.yaml"]
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    text = text.replace("/app/models/rides", str(model)).replace("/app/", f"{ROOT}/")
    (mount,) = [m for m in _container()["volumeMounts"] if m["name"] == "kafka-secret"]
    secret = tmp_path / "kafka-secret"  # the Secret's files, as the pod mounts them
    secret.mkdir(exist_ok=True)
    for key in _k8s("Secret")["stringData"]:
        (secret / key).write_text(f"from-secret-{key}\n")
    text = text.replace(mount["mountPath"], str(secret))
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def _example_config(tmp_path: Path, environ: dict[str, str] | None = None) -> Config:
    """The image's config (deploy/config/rides.yaml) with a model directory that exists."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    env = {"STREAM_SCORER_MODEL__PATH": str(model), **(environ or {})}
    return load_config(EXAMPLE_CONFIG, environ=env)


def _topic_partitions() -> dict[str, int]:
    """Topics the compose file's one-shot service creates, with their partition counts."""
    script = "\n".join(_compose()["services"]["topics"]["command"])
    found = re.findall(r"--topic\s+(\S+)\s+--partitions\s+(\d+)", script)
    return {topic: int(n) for topic, n in found}


# --- docker-compose.yml -------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    proc = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_schema_check_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  worker:\n    image: x\n    replicas: 3\n")  # not under deploy:
    proc = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(bad))
    assert proc.returncode != 0
    assert "replicas" in proc.stdout + proc.stderr


def test_compose_services_form_the_whole_stack(tmp_path: Path) -> None:
    services = _compose()["services"]
    assert {"kafka", "topics", "worker", "producer", "prometheus", "grafana"} <= set(services)
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert set(kafka["environment"]["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("worker", "producer"):
        assert services[name]["depends_on"]["topics"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_compose_topics_are_the_configured_ones(tmp_path: Path) -> None:
    cfg = _example_config(tmp_path)
    partitions = _topic_partitions()
    assert set(partitions) == {cfg.input.topic, cfg.first.output.topic, cfg.dead_letter.topic}
    assert partitions[cfg.input.topic] >= 4


def test_compose_worker_and_producer_commands_parse(tmp_path: Path) -> None:
    services = _compose()["services"]
    parser = build_parser()
    worker_args = parser.parse_args(services["worker"]["command"])
    assert worker_args.command == "run"
    assert str(worker_args.config) == "/app/deploy/config/rides.yaml"
    produce = parser.parse_args([str(a) for a in services["producer"]["command"]])
    assert produce.command == "produce"
    cfg = _example_config(tmp_path, services["worker"]["environment"])
    assert produce.topic == cfg.input.topic
    assert produce.bootstrap_servers == cfg.kafka.bootstrap_servers == "kafka:9092"
    assert 0 < produce.malformed_fraction < 0.1
    # the workers and the producer use the compose file's registry, in the Confluent format
    assert produce.format == cfg.input.format == cfg.first.output.format == "confluent"
    assert produce.registry_url == cfg.registry.url
    registry = services["registry"]
    assert registry["image"].startswith("apicurio/apicurio-registry:")
    assert cfg.registry.url.startswith(f"http://registry:{registry['ports'][0].split(':')[1]}/")
    for name in ("worker", "producer"):
        assert services[name]["depends_on"]["registry"]["condition"] == "service_healthy"


def test_compose_stop_grace_period_outlasts_the_drain(tmp_path: Path) -> None:
    grace = _compose()["services"]["worker"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, grace
    assert int(match[1]) > _example_config(tmp_path).worker.shutdown_timeout_s


def test_compose_bind_mounts_exist() -> None:
    mounts = [
        str(v).split(":")[0]
        for s in _compose()["services"].values()
        for v in s.get("volumes", [])
        if str(v).startswith("./")
    ]
    assert "./deploy/prometheus/alerts.yml" in mounts
    assert "./deploy/grafana/dashboard.json" in mounts
    missing = [m for m in mounts if not (ROOT / m).exists()]
    assert missing == []


def test_prometheus_scrapes_the_worker_service_on_the_metrics_port(tmp_path: Path) -> None:
    config = _yaml(PROM / "prometheus.yml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "stream-scorer"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["worker"]
    assert sd["port"] == _example_config(tmp_path).metrics.port
    assert config["rule_files"] == ["alerts.yml"]


# --- deploy/Dockerfile and its lock -------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split()[0].upper(), ln.split(maxsplit=1)[1]) for ln in lines]


def test_dockerfile_passes_hadolint() -> None:
    proc = _run(_tool("hadolint"), str(DOCKERFILE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_flags_an_unpinned_install(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim\nRUN pip install --no-cache-dir requests\n")
    proc = _run(_tool("hadolint"), str(bad))
    assert proc.returncode != 0
    assert "DL3013" in proc.stdout


def test_the_example_config_finds_the_model_where_the_image_trains_it() -> None:
    # the image keeps the repository's layout under /app and trains the model there
    # (tests/integration/test_image.py runs it: scoring, its user, its HEALTHCHECK command)
    model = (EXAMPLE_CONFIG.parent / _yaml(EXAMPLE_CONFIG)["model"]["path"]).resolve()
    assert model == ROOT / "models" / "rides"


def test_dockerfile_user_is_the_pods_user() -> None:
    user = [arg for op, arg in _instructions() if op == "USER"][-1]
    uid, gid = (int(x) for x in user.split(":"))
    pod = _k8s("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)
    assert pod["runAsNonRoot"] is True


def _env(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The variables the ``ENV`` instructions of ``steps`` set (``KEY=value`` forms)."""
    return dict(kv.split("=", 1) for op, arg in steps if op == "ENV" for kv in shlex.split(arg))


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    return steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]


def test_dockerfile_warms_the_numba_cache_of_the_installed_package() -> None:
    steps = _instructions()
    build = steps[: max(i for i, (op, _) in enumerate(steps) if op == "FROM")]
    workdirs = [i for i, (op, _) in enumerate(build) if op == "WORKDIR"]
    (warm,) = [i for i, (op, arg) in enumerate(build) if op == "RUN" and "build_pipeline" in arg]
    install = max(i for i, (op, arg) in enumerate(build) if op == "RUN" and "pip install" in arg)
    # python -c puts its working folder first on sys.path: the sources in /src would shadow
    # the installed package, and numba keys its cache on the path of the kernel it compiled
    workdir = build[max(i for i in workdirs if i < warm)][1]
    assert install < max(i for i in workdirs if i < warm) and workdir != "/src"
    assert "/opt/venv/" in build[warm][1] and "CACHED" in build[warm][1]
    # the baked cache seeds the worker's: a folder of the final stage's user, not the baked one
    baked = _env(build)["NUMBA_CACHE_DIR"]
    final = _env(_final_stage())
    assert final[SEED_ENV] == baked
    assert final["NUMBA_CACHE_DIR"] != baked
    (chown,) = [arg for op, arg in _final_stage() if op == "RUN" and "chown" in arg]
    assert "10001:10001" in chown and str(Path(final["NUMBA_CACHE_DIR"]).parent) in chown


def test_k8s_numba_cache_is_a_writable_volume_the_baked_cache_is_not_under() -> None:
    final = _env(_final_stage())
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    mounts = _container()["volumeMounts"]
    covering = [m for m in mounts if Path(final["NUMBA_CACHE_DIR"]).is_relative_to(m["mountPath"])]
    assert covering, "under readOnlyRootFilesystem numba can neither read nor write its cache"
    (mount,) = covering
    assert not mount.get("readOnly")
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    for m in mounts:  # a volume over the baked cache would hide it
        assert not Path(final[SEED_ENV]).is_relative_to(m["mountPath"]), m


def test_docker_build_context_holds_what_the_dockerfile_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert "*" in ignore, "the context starts empty"
    sources = [
        src
        for op, arg in _instructions()
        if op == "COPY" and not arg.startswith("--from")
        for src in shlex.split(arg)[:-1]
    ]
    assert sources
    for src in sources:
        assert src.rstrip("/") in included, src
        assert (ROOT / src).exists(), src


def _lock() -> dict[str, Requirement]:
    lines = (DEPLOY / "requirements.lock").read_text().splitlines()
    reqs = [Requirement(ln) for ln in lines if ln.strip() and not ln.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def test_lock_pins_every_runtime_dependency_within_pyproject_ranges() -> None:
    lock = _lock()
    for req in lock.values():
        (spec,) = req.specifier
        assert spec.operator == "==", f"{req} is not pinned"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for line in project["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in lock, f"{wanted.name} is missing from deploy/requirements.lock"
        (pin,) = lock[name].specifier
        assert wanted.specifier.contains(pin.version), f"{pin} outside {wanted.specifier}"


def test_lock_holds_the_installed_closure_of_the_runtime_dependencies() -> None:
    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    assert spec is not None and spec.loader is not None
    lock_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_script)
    closure = lock_script.runtime_closure()
    assert set(closure) == set(_lock()), "regenerate it: .venv/bin/python deploy/lock.py"


# --- deploy/k8s ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CORE_MANIFESTS)
def test_k8s_manifest_is_valid(name: str) -> None:
    proc = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(K8S / name))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_kubernetes_validate_rejects_a_port_given_as_text(tmp_path: Path) -> None:
    bad = tmp_path / "deployment.yaml"
    text = (K8S / "deployment.yaml").read_text()
    assert "containerPort: 9400" in text
    bad.write_text(text.replace("containerPort: 9400", 'containerPort: "9400"'))
    proc = _run(_tool("kubernetes-validate"), "--strict", "--quiet", str(bad))
    assert proc.returncode != 0
    assert "containerPort" in proc.stdout + proc.stderr


def test_k8s_configmap_and_deployment_environment_load_as_a_config(tmp_path: Path) -> None:
    environ: dict[str, str] = {}
    for var in _container()["env"]:
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            environ[var["name"]] = f"from-secret-{source['secretKeyRef']['key']}"
        elif "fieldRef" in source:
            environ[var["name"]] = "stream-scorer-abc12"
        else:
            environ[var["name"]] = var["value"]
    cfg = _configmap_config(tmp_path, environ)
    client = client_settings(cfg)
    assert client["sasl.username"] == "from-secret-username"
    assert client["sasl.password"] == "from-secret-password"
    assert client["security.protocol"] == "SASL_SSL"
    assert Path(client["ssl.ca.location"]).read_text() == "from-secret-ca.crt\n"
    assert not any("SASL" in name for name in environ), "credentials come as files, not env"
    assert (cfg.registry.username, cfg.registry.password) == (
        "from-secret-registry-username",
        "from-secret-registry-password",
    )
    assert cfg.input.format == cfg.first.output.format == "confluent" and cfg.registry.url
    assert cfg.worker.id == "stream-scorer-abc12"
    example = _example_config(tmp_path)
    assert (cfg.input.topic, cfg.first.output.topic, cfg.dead_letter.topic) == (
        example.input.topic,
        example.first.output.topic,
        example.dead_letter.topic,
    )


def test_k8s_deployment_probes_ports_and_grace_period(tmp_path: Path) -> None:
    cfg = _configmap_config(tmp_path)
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    container = _container()
    (port,) = container["ports"]
    assert port["containerPort"] == cfg.metrics.port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    assert pod["terminationGracePeriodSeconds"] > cfg.worker.shutdown_timeout_s
    args = build_parser().parse_args(container["args"])
    assert args.command == "run"
    assert "--workers" not in container["args"], "one worker process per pod"
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == _k8s("ConfigMap")["metadata"]["name"]
    assert args.config == Path(mount["mountPath"]) / "config.yaml"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])


def test_k8s_secret_references_match_the_template() -> None:
    template = _k8s("Secret")
    keys = set(template["stringData"])
    assert template["stringData"]["password"] == "", "the template carries no real password"
    env = _container()["env"]
    refs = [v["valueFrom"]["secretKeyRef"] for v in env if "secretKeyRef" in v.get("valueFrom", {})]
    refs += _k8s("TriggerAuthentication")["spec"]["secretTargetRef"]
    assert len(refs) >= 4
    for ref in refs:
        assert ref["name"] == template["metadata"]["name"]
        assert ref["key"] in keys


def test_k8s_secret_is_mounted_as_files_the_configuration_reads() -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kafka-secret"]
    assert volume["secret"]["secretName"] == _k8s("Secret")["metadata"]["name"]
    assert {i["key"] for i in volume["secret"]["items"]} <= set(_k8s("Secret")["stringData"])
    assert volume["secret"]["defaultMode"] == 0o440
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    (mount,) = [m for m in _container()["volumeMounts"] if m["name"] == "kafka-secret"]
    assert mount["readOnly"] is True
    config = yaml.safe_load(_k8s("ConfigMap")["data"]["config.yaml"])["kafka"]
    paths = [*config["secret_files"].values(), config["client"]["ssl.ca.location"]]
    items = {f"{mount['mountPath']}/{i['path']}" for i in volume["secret"]["items"]}
    assert set(paths) == items


def test_k8s_pod_is_hardened() -> None:
    pod = _k8s("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = _container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    # what must be writable is an emptyDir
    (tmp,) = [m for m in _container()["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume


def test_k8s_network_policy_allows_brokers_registry_dns_and_the_scraper_only(
    tmp_path: Path,
) -> None:
    policy = _k8s("NetworkPolicy")["spec"]
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["ingress"]
    (port,) = _container()["ports"]
    assert [p["port"] for p in ingress["ports"]] == [port["name"]]
    assert all("podSelector" in peer for peer in ingress["from"])
    egress = {(p["protocol"], p["port"]) for rule in policy["egress"] for p in rule["ports"]}
    brokers = _configmap_config(tmp_path).kafka.bootstrap_servers.split(",")
    assert {("TCP", int(b.rsplit(":", 1)[1])) for b in brokers} <= egress
    assert {("UDP", 53), ("TCP", 53), ("TCP", 8081)} <= egress
    assert len(egress) == 4, egress
    assert all(rule.get("to") for rule in policy["egress"]), "every rule names its peers"


def test_k8s_pod_disruption_budget_selects_the_workers() -> None:
    pdb = _k8s("PodDisruptionBudget")["spec"]
    labels = _k8s("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_new_worker_versions_roll_one_pod_at_a_time() -> None:
    """The choice in docs/manual/deployment.md: the rolling update (not a second group) moves
    partitions pod by pod, a new pod that never gets ready halting it with the old ones scoring."""
    deployment = _k8s("Deployment")["spec"]
    strategy = deployment["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert _k8s("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "readinessProbe" in _container()
    manual = (ROOT / "docs" / "manual" / "deployment.md").read_text()
    assert "### New worker versions: rolling update, not a second group" in manual


def test_keda_scaled_object(tmp_path: Path) -> None:
    so = _k8s("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    deployment = _k8s("Deployment")
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    input_partitions = _topic_partitions()[_configmap_config(tmp_path).input.topic]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= input_partitions
    for key in ("pollingInterval", "cooldownPeriod"):
        assert isinstance(spec[key], int) and spec[key] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert set(meta) <= KEDA_KAFKA_METADATA, set(meta) - KEDA_KAFKA_METADATA
    # metadata is a map of strings in the CRD: a YAML number or boolean is rejected by the API
    assert all(isinstance(v, str) for v in meta.values()), meta
    cfg = _configmap_config(tmp_path)
    assert meta["consumerGroup"] == cfg.input.group_id
    assert meta["topic"] == cfg.input.topic
    assert meta["bootstrapServers"] == cfg.kafka.bootstrap_servers
    assert int(meta["lagThreshold"]) > 0
    assert meta["offsetResetPolicy"] == "earliest"  # the workers' auto.offset.reset
    assert meta["allowIdleConsumers"] == "false"
    auth = _k8s("TriggerAuthentication")
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    params = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert {"sasl", "username", "password"} <= params <= KEDA_KAFKA_AUTH


def test_share_mode_scaled_object_scales_on_cpu_past_the_partition_count() -> None:
    """deploy/k8s/share: the ScaledObject for input.group_type: share (KEDA's kafka scaler
    reads consumer-group offsets, which a share group has none of)."""
    (so,) = _docs(K8S / "share" / "scaledobject.yaml")
    consumer = _k8s("ScaledObject")
    assert so["kind"] == "ScaledObject" and so["apiVersion"] == consumer["apiVersion"]
    assert so["metadata"]["name"] == consumer["metadata"]["name"]  # replaces it
    spec = so["spec"]
    assert spec["scaleTargetRef"] == consumer["spec"]["scaleTargetRef"]
    input_partitions = max(_topic_partitions().values())
    assert spec["minReplicaCount"] >= 1 and spec["maxReplicaCount"] > input_partitions
    (trigger,) = spec["triggers"]
    assert (trigger["type"], trigger["metricType"]) == ("cpu", "Utilization")
    assert set(trigger["metadata"]) == {"value"}
    assert (
        isinstance(trigger["metadata"]["value"], str)
        and 0 < int(trigger["metadata"]["value"]) < 100
    )
    # KEDA's cpu trigger computes utilisation against the container's CPU request
    assert _container()["resources"]["requests"]["cpu"]


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = _yaml(K8S / "kustomization.yaml")
    resources = set(kustomization["resources"])
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == manifests - {"secret.template.yaml"}
    image = _container()["image"].split(":")[0]
    assert [i["name"] for i in kustomization["images"]] == [image]


# --- deploy/prometheus --------------------------------------------------------------------------


def test_promtool_checks_the_rules_and_the_config() -> None:
    promtool = _tool("promtool")
    rules = _run(promtool, "check", "rules", str(PROM / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in rules.stdout
    config = _run(promtool, "check", "config", str(PROM / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    proc = _run(_tool("promtool"), "test", "rules", str(PROM / "alerts_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("StreamScorerLagAboveObjective", "> 60", "> 600"),
        ("StreamScorerDeadLetterRate", "> 0.01", "> 0.05"),
        ("StreamScorerPartitionStalled", "for: 2m", "for: 20m"),
        ("StreamScorerNoPredictions", "and on ()", "or on ()"),
        ("StreamScorerWorkersDown", "== 0", "< 0"),
        ("StreamScorerEvaluatorDroppingJoinState", "for: 10m", "for: 30m"),
        ("StreamScorerChampionWorsening", ">= 50", ">= 0"),  # the canary is not the champion
        ("StreamScorerChampionWorsening", "> 1.2 * label_replace", "> 1.6 * label_replace"),
    ],
)
def test_alert_unit_tests_catch_a_changed_rule(
    tmp_path: Path, alert: str, old: str, new: str
) -> None:
    groups = _yaml(PROM / "alerts.yml")
    (rule,) = [r for g in groups["groups"] for r in g["rules"] if r.get("alert") == alert]
    if old.startswith("for: "):
        rule["for"] = new.removeprefix("for: ")
    else:
        assert old in rule["expr"]
        rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(groups))
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    proc = _run(_tool("promtool"), "test", "rules", str(tmp_path / "alerts_test.yml"))
    assert proc.returncode != 0
    assert f"alertname: {alert}," in proc.stdout + proc.stderr


def _alerts() -> list[dict[str, Any]]:
    groups = _yaml(PROM / "alerts.yml")["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    cases = [
        case
        for test in _yaml(PROM / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    names = [a["alert"] for a in _alerts()]
    assert {
        "StreamScorerLagAboveObjective",
        "StreamScorerDeadLetterRate",
        "StreamScorerPartitionStalled",
        "StreamScorerNoPredictions",
    } <= set(names)
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no case where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no case where it stays quiet"


# --- metric names: dashboard and alerts against the worker's registry ---------------------------


def _dashboard_exprs() -> Iterator[str]:
    def walk(panels: list[dict[str, Any]]) -> Iterator[str]:
        for panel in panels:
            for target in panel.get("targets", []):
                yield target["expr"]
            yield from walk(panel.get("panels", []))

    dashboard = json.loads(DASHBOARD.read_text())
    yield from walk(dashboard["panels"])
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and query:
            yield query


def _queried_names(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        names.update(re.findall(r"\bstream_scorer_[a-zA-Z0-9_]+", expr))
        # any other selector with labels, e.g. up{job=...}
        names.update(n for n in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))
    return names


QUERIES = {
    "dashboard": lambda: list(_dashboard_exprs()),
    "alerts": lambda: [str(a["expr"]) for a in _alerts()],
}


@pytest.mark.parametrize("source", sorted(QUERIES))
def test_queried_metric_names_are_exported_by_the_worker(source: str) -> None:
    names = _queried_names(QUERIES[source]())
    assert len(names) >= 4, names
    unknown = sorted(names - exported_metric_names() - NOT_FROM_WORKERS)
    assert unknown == [], f"{source} queries metrics no worker exports: {unknown}"


def test_exported_names_follow_the_exposition_suffixes() -> None:
    names = exported_metric_names()
    assert "stream_scorer_records_consumed_total" in names
    assert "stream_scorer_records_consumed" not in names
    assert "stream_scorer_batch_size_records_bucket" in names
    assert "stream_scorer_assigned_partitions" in names


def test_dashboard_shows_what_operators_need() -> None:
    exprs = list(_dashboard_exprs())
    names = _queried_names(exprs)
    assert {
        "stream_scorer_records_consumed_total",
        "stream_scorer_predictions_produced_total",
        "stream_scorer_consumer_lag_seconds",
        "stream_scorer_consumer_lag_records",
        "stream_scorer_end_to_end_latency_seconds_bucket",
        "stream_scorer_dead_letters_total",
        "stream_scorer_batch_size_records_bucket",
        "stream_scorer_stage_duration_seconds_bucket",
    } <= names
    latency = [e for e in exprs if "end_to_end_latency_seconds_bucket" in e]
    assert {q for e in latency for q in re.findall(r"histogram_quantile\((0\.\d+)", e)} >= {
        "0.5",
        "0.99",
    }
    assert any("by (stage, reason)" in e and "dead_letters_total" in e for e in exprs)
    assert any("by (topic, partition)" in e and "lag_seconds" in e for e in exprs)


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    datasource = _yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasource["datasources"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 7
    for panel in graphs:
        assert panel["datasource"]["uid"] == ds["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
    provider = _yaml(DEPLOY / "grafana/provisioning/dashboards/stream-scorer.yml")
    (prov,) = provider["providers"]
    grafana = _compose()["services"]["grafana"]
    mounted = [v.split(":")[1] for v in grafana["volumes"] if "dashboard.json" in v]
    assert mounted and Path(mounted[0]).parent == Path(prov["options"]["path"])
