""".github/workflows/ci.yml, checked offline: actionlint, the workflow JSON schema, and its jobs.

actionlint (built by ``make tools``) checks expressions, job dependencies, action inputs and
runner labels; check-jsonschema's builtin ``vendor.github-workflows`` checks the file against
the schema of workflow files. A deliberately broken copy must fail both, so neither check can
pass by checking nothing. ``.ci/run`` stays the local entry point.
"""

from __future__ import annotations

import inspect
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from _pytest.mark.expression import Expression
from support import release_notes, tool

from stream_scorer.devtools.localkafka import find_pom

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


#: Collects the whole suite and prints, as JSON, each test's file and markers (after the
#: conftest's own marking).
_COLLECT = """
import json, sys
import pytest

class Record:
    tests = {}

    def pytest_collection_finish(self, session):
        for item in session.items:
            self.tests[item.nodeid] = [
                str(item.path.relative_to(session.config.rootpath)),
                sorted({m.name for m in item.iter_markers()}),
            ]

record = Record()
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[record])
print(json.dumps(record.tests)) if code == 0 else sys.exit(code)
"""


@pytest.fixture(scope="module")
def suite() -> dict[str, tuple[str, set[str]]]:
    """Every test of the suite: node id to (file, markers)."""
    done = subprocess.run(
        [sys.executable, "-c", _COLLECT], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {node: (path, set(marks)) for node, (path, marks) in raw.items()}


def _pytest_runs(lines: list[str]) -> list[list[str]]:
    """The pytest command lines (from the pytest program on) that shell ``lines`` run, the
    ``make`` targets among them expanded with ``make -n``."""
    runs: list[list[str]] = []
    for line in lines:
        words = shlex.split(line)
        if words and words[0] == "make":
            targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
            done = _run("make", "-n", "-C", ROOT, *targets)
            assert done.returncode == 0, done.stderr
            runs += _pytest_runs([ln for ln in done.stdout.splitlines() if "pytest" in ln])
            continue
        at = [i for i, w in enumerate(words) if w == "pytest" or w.endswith("/pytest")]
        if at:
            runs.append(words[at[0] :])
    return runs


def _marked(marks: set[str]) -> Callable[..., bool]:
    def matches(name: str, /, **_: str | int | bool | None) -> bool:
        return name in marks

    return matches


def _selects(run: list[str], suite: dict[str, tuple[str, set[str]]]) -> set[str]:
    """The tests a pytest command line selects: its paths, --ignore and -m (no other option)."""
    paths: list[str] = []
    ignored: list[str] = []
    expression = ""
    words = iter(run[1:])
    for word in words:
        if word == "-m":
            expression = next(words)
        elif word == "--ignore":
            ignored.append(next(words))
        elif word in ("-n", "--dist"):
            next(words)
        else:
            assert word.startswith("-") or (ROOT / word).exists(), f"{word} in {run}"
            if not word.startswith("-"):
                paths.append(word.rstrip("/"))
    selects = Expression.compile(expression) if expression else None
    return {
        node
        for node, (path, marks) in suite.items()
        if (not paths or any(path == p or path.startswith(p + "/") for p in paths))
        and not any(path == p or path.startswith(p + "/") for p in ignored)
        and (selects is None or selects.evaluate(_marked(marks)))
    }


def _make_runs(target: str) -> list[list[str]]:
    return _pytest_runs([f"make {target}"])


def test_make_test_all_runs_every_test_once_the_faults_alone_and_no_run_is_empty(
    suite: dict[str, tuple[str, set[str]]],
) -> None:
    runs = _make_runs("test-all")
    selected = [_selects(run, suite) for run in runs]
    # an empty run would end pytest with exit 5 (no tests), which fails the target
    assert all(selected), runs
    assert sum(map(len, selected)) == len(set().union(*selected)) == len(suite)
    # the fault tests measure recovery times: runs of their own, on one process
    faults = {node for node, (_, marks) in suite.items() if "faults" in marks}
    with_faults = [
        (run, tests) for run, tests in zip(runs, selected, strict=True) if tests & faults
    ]
    assert set().union(*(tests for _, tests in with_faults)) == faults
    for run, tests in with_faults:
        assert tests <= faults and "-n" not in run, run


def test_make_test_runs_all_but_the_slow_tier_and_make_test_slow_the_rest(
    suite: dict[str, tuple[str, set[str]]],
) -> None:
    fast = set().union(*(_selects(run, suite) for run in _make_runs("test")))
    slow = set().union(*(_selects(run, suite) for run in _make_runs("test-slow")))
    later = {n for n, (_, marks) in suite.items() if marks & {"slow", "boundscheck"}}
    assert later and fast == set(suite) - later and slow == later
    # the slow tier stays a tier: most of the suite runs in `make test`, the faults too
    assert len(later) < len(suite) // 20
    assert any("faults" in suite[node][1] for node in fast)


def test_the_workflow_runs_every_test(
    suite: dict[str, tuple[str, set[str]]],
) -> None:
    lines = [
        line
        for step in (s for job in _workflow()["jobs"] for s in _steps(job))
        for line in str(step.get("run", "")).replace("\\\n", " ").splitlines()
    ]
    in_ci = set().union(*(_selects(run, suite) for run in _pytest_runs(lines)))
    assert sorted(set(suite) - in_ci) == []


def test_ci_runs_on_python_3_11() -> None:
    wf = _workflow()
    triggers = wf[True] if True in wf else wf["on"]  # YAML 1.1 reads the key `on` as True
    assert "v*" in triggers["push"]["tags"] and "pull_request" in triggers
    assert wf["env"]["PYTHON_VERSION"] == "3.11"
    for job in wf["jobs"]:
        python = _uses(job).get("actions/setup-python")
        assert python is None or python["python-version"] == "${{ env.PYTHON_VERSION }}", job


def _make_targets_of(step: dict[str, Any]) -> set[str]:
    """The ``make`` targets a step runs (each command line parsed, not searched)."""
    targets: set[str] = set()
    for line in str(step.get("run", "")).replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words[:1] == ["make"]:
            targets |= {w for w in words[1:] if not w.startswith("-") and "=" not in w}
    return targets


def _make_targets(job: str) -> set[str]:
    return set().union(*(_make_targets_of(s) for s in _steps(job)))


def test_integration_jobs_have_java_maven_and_make_setup() -> None:
    for job in ("integration", "installed"):
        uses = _uses(job)
        java = uses["actions/setup-java"]
        versions = [int(v) for v in str(java["java-version"]).split()]
        # Kafka's Java (17, the last: JAVA_HOME) and Apicurio Registry's (21+), the one the
        # registry runs with named to it
        assert versions[-1] >= 17 and max(versions) >= 21 and java["cache"] == "maven", job
        setup = next(s for s in _steps(job) if "setup" in _make_targets_of(s))
        assert setup["env"]["STREAM_SCORER_REGISTRY_JAVA"].startswith("${{ env.JAVA_HOME_21"), job
        assert (ROOT / java["cache-dependency-path"]).resolve() == find_pom().resolve(), job
        assert "actions/setup-go" in uses, job  # make setup builds actionlint
        assert "setup" in _make_targets(job), job
    # the MLflow server of the model-registry tests (CI=true: they fail without it)
    assert "mlflow-tools" in _make_targets("integration")
    for target in ("setup", "mlflow-tools"):  # targets the Makefile has
        assert _run("make", "-n", "-C", ROOT, target).returncode == 0, target


def _hashed(key: str) -> set[Path]:
    """The files a cache key's ``hashFiles(...)`` patterns match in the checkout."""
    import re

    files: set[Path] = set()
    for call in re.findall(r"hashFiles\(([^)]*)\)", key):
        for pattern in re.findall(r"'([^']+)'", call):
            matched = set(ROOT.glob(pattern))
            assert matched, f"{pattern} in {key} matches no file"  # a renamed pin hashes nothing
            files |= matched
    return files


def test_the_cache_of_the_tools_is_keyed_on_every_pin_of_what_it_holds() -> None:
    """~/.cache/stream-scorer holds the broker jars (the pom), Apicurio Registry (its pinned
    release in localregistry.py), the MLflow server (pinned in localmlflow.py) and actionlint
    (deploy/tools): a change to any pin must change the key, or CI restores stale tools."""
    from stream_scorer.devtools.localkafka import find_pom
    from stream_scorer.devtools.localmlflow import fetch_mlflow
    from stream_scorer.devtools.localregistry import fetch_registry

    pins = {
        "~/.cache/stream-scorer": {
            find_pom(),
            Path(inspect.getfile(fetch_registry)),
            Path(inspect.getfile(fetch_mlflow)),
            ROOT / "deploy" / "tools" / "install-actionlint.sh",
        },
        "~/.cache/stream-scorer/bin": {ROOT / "deploy" / "tools" / "install-actionlint.sh"},
    }
    seen = 0
    for job in _workflow()["jobs"]:
        cache = _uses(job).get("actions/cache")
        if cache is None:
            continue
        seen += 1
        hashed = {p.resolve() for p in _hashed(str(cache["key"]))}
        missing = {p.resolve() for p in pins[cache["path"]]} - hashed
        assert not missing, f"{job}: the key of {cache['path']} misses {sorted(missing)}"
    assert seen >= 2


def test_the_image_job_runs_the_image_tests(suite: dict[str, tuple[str, set[str]]]) -> None:
    lines = [
        ln for s in _steps("image") for ln in str(s.get("run", "")).splitlines() if "pytest" in ln
    ]
    selected = set().union(*(_selects(run, suite) for run in _pytest_runs(lines)))
    image = {node for node, (path, _) in suite.items() if path.endswith("test_image.py")}
    assert image and selected == image


def test_build_makes_the_wheel_and_the_versioned_image_and_publishes_only_on_a_tag() -> None:
    wf = _workflow()
    build = wf["jobs"]["build"]
    assert set(build["needs"]) == {"lint", "unit", "integration", "installed", "image"}
    # the wheel lands where the artifact is uploaded from
    (wheel,) = [
        shlex.split(str(s["run"]))
        for s in _steps("build")
        if "wheel" in shlex.split(str(s.get("run", "")))
    ]
    wheel_dir = wheel[wheel.index("--wheel-dir") + 1]
    upload = _uses("build")["actions/upload-artifact"]
    assert Path(upload["path"]).parent == Path(wheel_dir) and upload["if-no-files-found"] == "error"
    image = _uses("build")["docker/build-push-action"]
    assert (ROOT / image["file"]).is_file()
    assert image["build-args"] == "VERSION=${{ steps.version.outputs.version }}"
    assert image["push"] == "${{ startsWith(github.ref, 'refs/tags/v') }}"
    assert "ghcr.io/${{ github.repository }}:${{ steps.version.outputs.version }}" in image["tags"]
    assert build["permissions"]["packages"] == "write"
    release = wf["jobs"]["release"]
    assert release["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert release["permissions"] == {"contents": "write"}
    assert wf["permissions"] == {"contents": "read"}


def test_the_release_step_publishes_the_wheel_with_the_changelog_section(tmp_path: Path) -> None:
    """The release job's script, run with a stand-in ``gh``: the tag's release, the wheel and
    the CHANGELOG.md section as its notes."""
    notes = release_notes()
    version = notes.package_version()
    (step,) = [s for s in _steps("release") if "run" in s]
    (tmp_path / ".ci").symlink_to(ROOT / ".ci")
    (tmp_path / "dist").mkdir()
    wheel = f"stream_scorer-{version}-py3-none-any.whl"
    (tmp_path / "dist" / wheel).write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "gh"  # records its arguments, one a line, and the notes it was given
    fake.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "called"}\ncp notes.md {tmp_path / "seen"}\n'
    )
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "GITHUB_REF_NAME": f"v{version}",
        "VERSION": version,
        "GH_TOKEN": "unused",
    }
    done = subprocess.run(
        ["bash", "-e", "-c", str(step["run"])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "called").read_text().splitlines() == [
        "release", "create", f"v{version}", f"dist/{wheel}",
        "--title", f"stream-scorer {version}", "--notes-file", "notes.md", "--verify-tag",
    ]  # fmt: skip
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert (tmp_path / "seen").read_text().strip() == notes.section(changelog, version).strip()
    # a tag that is not the package's version publishes nothing
    (tmp_path / "called").unlink()
    wrong = subprocess.run(
        ["bash", "-e", "-c", str(step["run"])],
        cwd=tmp_path, env={**env, "GITHUB_REF_NAME": "v9.9.9"}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert wrong.returncode != 0 and not (tmp_path / "called").exists()


def test_ci_run_runs_make_test_from_the_checkout(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "make"  # records where and with what .ci/run calls make
    fake.write_text(f'#!/bin/sh\necho "$(pwd) $*" > {tmp_path / "called"}\n')
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run")],
        cwd=tmp_path,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "called").read_text().split() == [str(ROOT), "test"]
