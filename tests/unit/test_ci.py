""".github/workflows/ci.yml, checked offline: actionlint, the workflow JSON schema, and its jobs.

actionlint (built by ``make tools``) checks expressions, job dependencies, action inputs and
runner labels; check-jsonschema's builtin ``vendor.github-workflows`` checks the file against
the schema of workflow files. A deliberately broken copy must fail both, so neither check can
pass by checking nothing. ``.ci/run`` stays the local entry point.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import tool

ROOT = Path(__file__).parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


def _actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    return _run(tool("actionlint"), "-no-color", path)


def _schema(path: Path) -> subprocess.CompletedProcess[str]:
    return _run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", path)


def _workflow() -> dict[Any, Any]:
    data = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _steps(job: str) -> list[dict[str, Any]]:
    return list(_workflow()["jobs"][job]["steps"])


def _runs(job: str) -> str:
    return "\n".join(str(s.get("run", "")) for s in _steps(job))


def _uses(job: str) -> dict[str, dict[str, Any]]:
    return {str(s["uses"]).split("@")[0]: s.get("with", {}) for s in _steps(job) if "uses" in s}


def _broken_copy(tmp_path: Path, old: str, new: str) -> Path:
    text = WORKFLOW.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / ".github" / "workflows" / "ci.yml"
    path.parent.mkdir(parents=True)
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_actionlint_passes() -> None:
    proc = _actionlint(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_workflow_matches_the_github_workflow_schema() -> None:
    proc = _schema(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_both_checks_reject_a_broken_copy(tmp_path: Path) -> None:
    broken = _broken_copy(tmp_path, "    runs-on: ubuntu-24.04\n", "    run-on: ubuntu-24.04\n")
    lint = _actionlint(broken)
    assert lint.returncode != 0 and "run-on" in lint.stdout, lint.stdout + lint.stderr
    schema = _schema(broken)
    assert schema.returncode != 0 and "run-on" in schema.stdout, schema.stdout + schema.stderr


@pytest.mark.parametrize(
    ("old", "new", "says"),
    [
        (
            "needs: [lint, unit, integration, installed, image]",
            "needs: [lint, unit, linting]",
            "linting",
        ),
        (
            "${{ steps.version.outputs.version }}\n",
            "${{ steps.versions.outputs.version }}\n",
            "versions",
        ),
        (
            "uses: actions/checkout@v4",
            "uses: actions/checkout@v4\n        with: {fetch-dept: 0}",
            "fetch-dept",
        ),
    ],
)
def test_actionlint_rejects_what_the_schema_cannot_see(
    tmp_path: Path, old: str, new: str, says: str
) -> None:
    broken = _broken_copy(tmp_path, old, new)
    proc = _actionlint(broken)
    assert proc.returncode != 0 and says in proc.stdout, proc.stdout + proc.stderr


def test_ci_runs_every_tier_of_make_test_on_python_3_11() -> None:
    wf = _workflow()
    triggers = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as True
    assert "v*" in triggers["push"]["tags"] and "pull_request" in triggers
    assert wf["env"]["PYTHON_VERSION"] == "3.11"
    for job in wf["jobs"]:
        python = _uses(job).get("actions/setup-python")
        assert python is None or python["python-version"] == "${{ env.PYTHON_VERSION }}", job
    assert "make lint" in _runs("lint") and "make docs" in _runs("lint")
    assert "make tools" in _runs("unit") and "make unit" in _runs("unit")
    assert "make boundscheck" in _runs("unit")
    integration = _runs("integration")
    assert '-m "integration and not faults"' in integration and "make faults" in integration
    assert "tests/integration/test_installed.py" in _runs("installed")


def test_integration_jobs_have_java_maven_and_the_cache_outside_the_checkout() -> None:
    for job in ("integration", "installed"):
        uses = _uses(job)
        java = uses["actions/setup-java"]
        versions = [int(v) for v in str(java["java-version"]).split()]
        # Kafka's Java (17, the last: JAVA_HOME) and Apicurio Registry's (21+), the one the
        # registry runs with named to it
        assert versions[-1] >= 17 and max(versions) >= 21 and java["cache"] == "maven", job
        steps = _workflow()["jobs"][job]["steps"]
        setup = next(s for s in steps if "make setup" in s.get("run", ""))
        assert setup["env"]["STREAM_SCORER_REGISTRY_JAVA"].startswith("${{ env.JAVA_HOME_21"), job
        assert java["cache-dependency-path"] == "stream_scorer/devtools/local-kafka-pom.xml"
        assert uses["actions/cache"]["path"] == "~/.cache/stream-scorer", job
        assert "actions/setup-go" in uses, job  # make setup builds actionlint
        assert "make setup" in _runs(job)
    # the MLflow server of the model-registry tests (CI=true: they fail without it)
    assert "mlflow-tools" in _runs("integration")


def test_build_makes_the_wheel_and_the_versioned_image_and_publishes_only_on_a_tag() -> None:
    wf = _workflow()
    build = wf["jobs"]["build"]
    assert set(build["needs"]) == {"lint", "unit", "integration", "installed", "image"}
    assert "tests/integration/test_image.py" in _runs("image")
    assert "pip wheel --no-deps --wheel-dir dist ." in _runs("build")
    image = _uses("build")["docker/build-push-action"]
    assert image["file"] == "deploy/Dockerfile"
    assert image["build-args"] == "VERSION=${{ steps.version.outputs.version }}"
    assert image["push"] == "${{ startsWith(github.ref, 'refs/tags/v') }}"
    assert "ghcr.io/${{ github.repository }}:${{ steps.version.outputs.version }}" in image["tags"]
    assert build["permissions"]["packages"] == "write"
    release = wf["jobs"]["release"]
    assert release["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert release["permissions"] == {"contents": "write"}
    assert "gh release create" in _runs("release") and "stream_scorer-*.whl" in _runs("release")
    assert ".ci/release_notes.py" in _runs("release")
    assert wf["permissions"] == {"contents": "read"}


def test_ci_run_stays_the_local_entry_point() -> None:
    lines = (ROOT / ".ci" / "run").read_text().split("\n")
    assert [ln for ln in lines if ln and not ln.startswith("#")][-1] == "make test"
