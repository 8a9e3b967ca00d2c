"""docs/manual/runbook.md against what exists: alert rules, metrics, commands, log lines, errors.

Generic on purpose: an alert rule added to deploy/prometheus/alerts.yml later fails here until
it has a ``runbook_url`` and an entry; a metric, a ``stream-scorer`` command or flag, a log line
or an error class renamed in the code fails here until the runbook follows.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import exported_metric_names

from stream_scorer import errors
from stream_scorer.cli import build_parser

ROOT = Path(__file__).parents[2]
RUNBOOK = ROOT / "docs" / "manual" / "runbook.md"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PACKAGE = ROOT / "stream_scorer"
#: The parts of every entry, in this order.
PARTS = ("**Meaning.**", "**Check.**", "**Causes and fixes.**", "**Escalate.**")
#: Shell tokens that end a ``stream-scorer`` command inside a longer line.
SHELL_ENDS = {"|", "||", "&&", ";", ">", ">>", "2>&1", "2>/dev/null"}
#: Tokens after which ``stream-scorer`` is the program run (not, say, a namespace after ``-n``).
STARTS = {"--", "|", "||", "&&", ";", "exec", "sudo", "time"}


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def sections(text: str) -> dict[str, tuple[str, str]]:
    """Each ``## `` heading's anchor to its title and body."""
    out: dict[str, tuple[str, str]] = {}
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        title, _, body = chunk.partition("\n")
        out[slug(title)] = (title.strip(), body)
    return out


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    """Every alerting rule of every group."""
    groups = yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def alert_problems(rules: list[dict[str, Any]], text: str) -> list[str]:
    """What is wrong between the rules' ``runbook_url`` annotations and the runbook's entries."""
    found = sections(text)
    problems = []
    bases = set()
    for rule in rules:
        name = rule["alert"]
        url = str(rule.get("annotations", {}).get("runbook_url", ""))
        base, _, anchor = url.partition("#")
        bases.add(base)
        if not url:
            problems.append(f"{name}: no runbook_url annotation")
            continue
        if not base.endswith("docs/manual/runbook.md"):
            problems.append(f"{name}: runbook_url {url!r} does not point at docs/manual/runbook.md")
        if anchor != slug(name):
            problems.append(f"{name}: runbook_url anchor {anchor!r}, expected {slug(name)!r}")
        if anchor not in found:
            problems.append(f"{name}: docs/manual/runbook.md has no entry '## {name}' (#{anchor})")
            continue
        _title, body = found[anchor]
        positions = [body.find(part) for part in PARTS]
        if -1 in positions or positions != sorted(positions):
            problems.append(f"{name}: the entry needs {', '.join(PARTS)} in this order")
    if len(bases) > 1:
        problems.append(f"the runbook_urls point at different documents: {sorted(bases)}")
    return problems


def link_problems(text: str) -> list[str]:
    """Links to anchors of the runbook itself that no heading has."""
    anchors = set(sections(text))
    links = re.findall(r"\]\(#([^)]+)\)", text)
    return [f"link to #{a}: no such heading" for a in links if a not in anchors]


def metric_problems(text: str) -> list[str]:
    """Metric names the runbook uses that no worker exports."""
    used = set(re.findall(r"\bstream_scorer_[a-z0-9_]+\b", text))
    return [
        f"metric {m} is not exported by a worker" for m in sorted(used - exported_metric_names())
    ]


def commands(text: str) -> list[str]:
    """Every code span and every line of a code block (continuation lines joined)."""
    found = []
    for block in re.findall(r"^ *```[a-z]*\n(.*?)^ *```", text, flags=re.MULTILINE | re.DOTALL):
        found += [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.MULTILINE | re.DOTALL)
    found += re.findall(r"`([^`\n]+)`", prose)
    return found


def stream_scorer_argv(line: str) -> list[list[str]]:
    """The arguments of each ``stream-scorer`` call in a shell line."""
    if line.lstrip().startswith("#") or not re.search(r"(^|\s)stream-scorer(\s|$)", line):
        return []
    tokens = shlex.split(line, comments=True)
    calls = []
    for i, token in enumerate(tokens):
        if token == "stream-scorer" and (i == 0 or tokens[i - 1] in STARTS):
            argv = []
            for arg in tokens[i + 1 :]:
                if arg in SHELL_ENDS or arg.startswith(">"):
                    break
                argv.append(arg)
            calls.append(argv)
    return calls


def command_problems(text: str) -> list[str]:
    """``stream-scorer`` calls that the command line refuses (a subcommand or flag missing)."""
    problems = []
    for line in commands(text):
        try:
            calls = stream_scorer_argv(line)
        except ValueError as exc:
            problems.append(f"{line!r}: {exc}")
            continue
        for argv in calls:
            if not argv:
                continue  # the program's name alone, in prose
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    build_parser().parse_args(argv)
            except SystemExit as exc:
                if exc.code != 0:
                    problems.append(f"stream-scorer {shlex.join(argv)}: {err.getvalue().strip()}")
    return problems


def _source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py")))


def log_problems(text: str, source: str) -> list[str]:
    """Quoted log messages (``"msg": "…``) no log call starts with; unknown ``"error"`` classes."""
    problems = []
    for msg in sorted(set(re.findall(r"\"msg\": \"([^\"`']+)", text))):
        if f'"{msg}' not in source:
            problems.append(f'no log message starts with "{msg}"')
    for name in sorted(set(re.findall(r'"error": "(\w+)"', text))):
        cls = getattr(errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, errors.StreamScorerError)):
            problems.append(f'"error": "{name}" is no exception class of stream_scorer.errors')
    return problems


# --- the real files -----------------------------------------------------------------------------


def test_every_alert_rule_has_a_runbook_entry_and_its_url_points_at_it() -> None:
    rules = alert_rules()
    assert len(rules) >= 5
    assert alert_problems(rules, RUNBOOK.read_text(encoding="utf-8")) == []


def test_runbook_links_point_at_its_headings() -> None:
    assert link_problems(RUNBOOK.read_text(encoding="utf-8")) == []


def test_runbook_names_only_exported_metrics() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    assert len(set(re.findall(r"\bstream_scorer_[a-z0-9_]+\b", text))) >= 10
    assert metric_problems(text) == []


def test_runbook_commands_parse_with_the_real_command_line() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    used = {argv[0] for line in commands(text) for argv in stream_scorer_argv(line) if argv}
    assert {"lag", "rewind", "dlq", "topics", "config", "--version"} <= used
    assert command_problems(text) == []


def test_runbook_log_lines_and_errors_exist_in_the_code() -> None:
    text = RUNBOOK.read_text(encoding="utf-8")
    assert len(re.findall(r'"msg": "', text)) >= 4
    assert log_problems(text, _source_text()) == []


def test_runbook_covers_the_situations_without_an_alert() -> None:
    titles = [title for title, _ in sections(RUNBOOK.read_text(encoding="utf-8")).values()]
    for words in (
        "Poison storm",
        "Fenced worker",
        "Stalled partition",
        "Schema registry unreachable",
        "Model registry unreachable",
        "roll back and re-score",
    ):
        assert any(words in t for t in titles), words


# --- the checks catch what they should ----------------------------------------------------------

GOOD_ENTRY = (
    "## {name}\n\n**Meaning.** m\n\n**Check.** c\n\n**Causes and fixes.** f\n\n**Escalate.** e\n"
)


def _rule(name: str, url: str | None) -> dict[str, Any]:
    annotations = {} if url is None else {"runbook_url": url}
    return {"alert": name, "expr": "vector(1)", "annotations": annotations}


URL = "https://git.example/stream-scorer/blob/main/docs/manual/runbook.md#"


@pytest.mark.parametrize(
    ("rule", "text", "problem"),
    [
        (_rule("NewAlert", None), GOOD_ENTRY.format(name="NewAlert"), "no runbook_url"),
        (_rule("NewAlert", URL + "newalert"), "", "has no entry '## NewAlert'"),
        (_rule("NewAlert", URL + "other"), GOOD_ENTRY.format(name="Other"), "anchor 'other'"),
        (
            _rule("NewAlert", "https://x/README.md#newalert"),
            GOOD_ENTRY.format(name="NewAlert"),
            "does not point at docs/manual/runbook.md",
        ),
        (
            _rule("NewAlert", URL + "newalert"),
            "## NewAlert\n\n**Meaning.** m\n\n**Check.** c\n",
            "needs **Meaning.**",
        ),
    ],
)
def test_alert_check_reports(rule: dict[str, Any], text: str, problem: str) -> None:
    assert problem in str(alert_problems([rule], text))
    good = _rule("NewAlert", URL + "newalert")
    assert alert_problems([good], GOOD_ENTRY.format(name="NewAlert")) == []


def test_command_check_reports_unknown_subcommands_and_flags() -> None:
    text = (
        "`stream-scorer lag --group g --no-such-flag`\n\n"
        "```sh\nkubectl exec p -- stream-scorer rewnd --group g --by 1h | jq .\n"
        "stream-scorer rewind --group g \\\n  --by 1h --dry-run\n```\n"
        "`stream-scorer rewind --group g` needs a time\n"
    )
    problems = command_problems(text)
    assert len(problems) == 3, problems
    assert any("--no-such-flag" in p for p in problems)
    assert "rewnd" in str(problems)
    assert "--to" in str(problems)


def test_metric_log_and_link_checks_report() -> None:
    assert metric_problems("`stream_scorer_records_consumed_total` and `stream_scorer_nope`") == [
        "metric stream_scorer_nope is not exported by a worker"
    ]
    source = 'log.warning("partition stalled: lag %d", n)'
    text = '`"msg": "partition stalled` `"msg": "partition melted` `"error": "NoSuchError"`'
    assert log_problems(text, source) == [
        'no log message starts with "partition melted"',
        '"error": "NoSuchError" is no exception class of stream_scorer.errors',
    ]
    assert link_problems("## A b\n[x](#a-b) [y](#c)") == ["link to #c: no such heading"]
