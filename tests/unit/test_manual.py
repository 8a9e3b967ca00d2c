"""The manual's generated reference pages (docs/manual/reference) are what the code makes now.

The configuration reference comes from the pydantic models, the metrics from the worker's
registry, the command line from the argparse parser, the headers from headers.py
(``stream_scorer.devtools.manual``). A page committed stale fails here, naming the command that
rewrites it; the checks below make sure each generator reads its source rather than a copy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from stream_scorer import headers as hdr
from stream_scorer.cli import build_parser
from stream_scorer.config import Config, config_schema
from stream_scorer.devtools import manual
from stream_scorer.worker.metrics import Metrics

ROOT = Path(__file__).parents[2]
PAGES = ROOT / manual.DEFAULT_DIR
NAV = ROOT / "docs" / "mkdocs.yml"


def test_the_committed_pages_are_the_generated_ones() -> None:
    stale = manual.stale_pages(PAGES)
    assert stale == [], f"stale: {', '.join(stale)}; run: {manual.COMMAND}"


def test_check_reports_a_stale_page_and_write_fixes_it(tmp_path: Path) -> None:
    for name in manual.PAGES:
        (tmp_path / name).write_text(manual.render(name), encoding="utf-8")
    (tmp_path / "metrics.md").write_text("edited by hand\n", encoding="utf-8")
    assert manual.stale_pages(tmp_path) == ["metrics.md"]
    assert manual.main([str(tmp_path), "--check"]) == 1
    assert manual.main([str(tmp_path)]) == 0
    assert manual.stale_pages(tmp_path) == []


def test_a_changed_default_makes_the_configuration_page_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = manual.render("configuration.md")
    assert "| `batch.max_records` | integer | `1000` | > 0 |" in before
    schema = config_schema()
    schema["$defs"]["BatchConfig"]["properties"]["max_records"]["default"] = 999
    monkeypatch.setattr("stream_scorer.config.config_schema", lambda: schema)
    assert "| `batch.max_records` | integer | `999` | > 0 |" in manual.render("configuration.md")


def test_every_configuration_key_is_on_its_page() -> None:
    page = manual.render("configuration.md")
    keys = [
        f"{section}.{info.alias or name}"
        for section, field in Config.model_fields.items()
        if isinstance(field.annotation, type)
        for name, info in field.annotation.model_fields.items()
    ]
    assert len(keys) > 50
    assert [k for k in keys if f"| `{k}`" not in page] == []
    assert '| `registry.password` **secret** | string | `""` |' in page
    assert "| `kafka.client` **secret** | table of string, number or boolean | `{}` |" in page
    assert "| `input.topic` | string | required | not empty |" in page
    mode = "`at-least-once`, `exactly-once`"
    assert f'| `delivery.mode` | string | `"at-least-once"` | {mode} |' in page


def test_every_metric_is_on_its_page_with_its_labels() -> None:
    page = manual.render("metrics.md")
    families = list(Metrics().prometheus.collect())
    assert len(families) > 20
    for family in families:
        suffix = "_total" if family.type == "counter" else ""
        assert f"| `{family.name}{suffix}` | {family.type}" in page, family.name
    assert "| `stream_scorer_dead_letters_total` | counter | `stage`, `reason` |" in page


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    out = [parser.prog]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += _commands(sub)
    return out


def test_every_command_and_option_is_on_the_cli_page() -> None:
    page = manual.render("cli.md")
    parser = build_parser()
    commands = _commands(parser)
    assert {"stream-scorer run", "stream-scorer dlq replay", "stream-scorer model pack"} <= set(
        commands
    )
    assert [c for c in commands if f"`{c}`\n" not in page] == []
    run = page.split("## `stream-scorer run`\n", 1)[1].split("\n## ", 1)[0]
    assert "| `--config` | `CONFIG` | required | YAML or TOML configuration |" in run
    assert "| `--workers` | `WORKERS` | `1` |" in run


def test_every_header_is_on_its_page_under_its_section() -> None:
    page = manual.render("headers.md")
    names = [
        v
        for k, v in vars(hdr).items()
        if k.isupper() and isinstance(v, str) and not k.endswith("PREFIX")
    ]
    assert len(names) >= 18
    assert [n for n in names if f"| `{n}` |" not in page] == []
    dead_letters = page.split("## On every dead letter\n", 1)[1].split("\n## ", 1)[0]
    assert f"| `{hdr.REASON}` | The dead-letter reason code" in dead_letters


def test_render_header_table_shortens_names_of_one_row() -> None:
    rows = [((hdr.CONNECT_TOPIC, hdr.CONNECT_PARTITION), "where | from")]
    assert manual.render_header_table(rows) == (
        "| header | meaning |\n|---|---|\n"
        "| `__connect.errors.topic`, `.partition` | where \\| from |"
    )


def test_a_header_without_its_comment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    source = '# --- on every prediction ---\nMODEL_VERSION = "stream_scorer.model.version"\n'
    monkeypatch.setattr("inspect.getsource", lambda _module: source)
    with pytest.raises(ValueError, match="MODEL_VERSION: needs a #: comment"):
        manual.header_sections()


def test_the_site_lists_every_generated_page() -> None:
    nav = NAV.read_text(encoding="utf-8")
    assert [n for n in manual.PAGES if f"reference/{n}" not in nav] == []
    assert "docs_dir: manual" in nav and "font: false" in nav
