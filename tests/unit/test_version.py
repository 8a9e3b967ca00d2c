"""One version, pyproject.toml's, wherever it shows: command line, image, manifests, changelog."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import confluent_kafka
import pytest
import xgboost
import yaml
from support import release_notes

import stream_scorer
from stream_scorer.cli import main
from stream_scorer.devtools.localkafka import KAFKA_VERSION

ROOT = Path(__file__).parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_package_version_is_pyprojects() -> None:
    assert stream_scorer.__version__ == VERSION
    init = (ROOT / "stream_scorer" / "__init__.py").read_text()
    assert VERSION not in init, "no second copy of the version"


def test_version_flag_prints_the_versions_it_runs_with(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"stream-scorer {VERSION}"
    assert f"xgboost {xgboost.__version__}" in lines
    assert any(ln.startswith(f"librdkafka {confluent_kafka.libversion()[0]} ") for ln in lines)
    assert f"kafka broker jars (local-kafka, tests) {KAFKA_VERSION}" in lines


def test_version_flag_works_as_a_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"stream-scorer {VERSION}"


def test_the_changelog_has_a_section_for_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    notes = release_notes()
    assert notes.section(text, VERSION).strip()
    headings = re.findall(r"^## \[([^\]]+)\]", text, flags=re.MULTILINE)
    assert headings[0] == "Unreleased" and VERSION in headings
    assert notes.main([f"v{VERSION}"]) == 0


def test_release_notes_refuse_a_tag_that_is_not_the_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    notes = release_notes()
    assert notes.main(["v999.0.0"]) == 1
    assert f"is not v{VERSION}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"no section '## \[9.9.9\]"):
        notes.section("# Changelog\n\n## [Unreleased]\n\n## [1.0.0] - 2026-01-01\n", "9.9.9")


def test_the_image_is_labelled_with_the_build_argument_version() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"^ARG VERSION$", final, flags=re.MULTILINE)
    assert 'org.opencontainers.image.version="${VERSION}"' in final
    build = text[: text.rindex("\nFROM ")]
    assert "stream_scorer.__version__" in build and "${VERSION}" in build  # checked at build


def test_the_kubernetes_image_tags_are_the_version() -> None:
    kustomization = yaml.safe_load((ROOT / "deploy" / "k8s" / "kustomization.yaml").read_text())
    assert [i["newTag"] for i in kustomization["images"]] == [VERSION]
    deployment = (ROOT / "deploy" / "k8s" / "deployment.yaml").read_text()
    assert re.findall(r"image: stream-scorer:(\S+)", deployment) == [VERSION]
