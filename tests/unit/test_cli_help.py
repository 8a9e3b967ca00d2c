"""The command line's shape: grouped help on one screen, an example per command, lazy imports."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest

from stream_scorer.cli import build_parser
from stream_scorer.cli.common import EXAMPLE

GROUPS = ("Run", "Models", "Operate", "Develop")


def _top_help() -> str:
    # the installed entry point's way in, in a terminal wider than 80 columns
    result = subprocess.run(
        [sys.executable, "-m", "stream_scorer", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    )
    return result.stdout


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every command and sub-command parser below ``parser``, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _commands(sub)


def _top_commands() -> set[str]:
    actions = build_parser()._subparsers._group_actions  # type: ignore[union-attr]
    (sub,) = actions
    assert isinstance(sub, argparse._SubParsersAction)
    return set(sub.choices)


def test_the_top_help_fits_a_24x80_screen() -> None:
    lines = _top_help().splitlines()
    assert len(lines) <= 24, f"{len(lines)} lines"
    assert max(len(line) for line in lines) <= 80


def test_the_top_help_lists_every_command_under_one_of_four_groups() -> None:
    text = _top_help()
    headings = re.findall(r"^(\w+):$", text, flags=re.MULTILINE)
    assert headings == [*GROUPS, "options"]
    listed: list[str] = []
    for group in GROUPS:
        block = text.split(f"\n{group}:\n", 1)[1].split("\n\n", 1)[0]
        for row in block.splitlines():
            if re.match(r"\w+:$", row):
                break  # the next group
            names = re.split(r"\s{2,}", row.strip())[0]
            listed += names.split(", ")
    assert sorted(listed) == sorted(_top_commands()), "each command once, in a group"


@pytest.mark.parametrize("parser", list(_commands(build_parser())), ids=lambda p: p.prog)
def test_every_commands_help_ends_with_an_example_that_parses(
    parser: argparse.ArgumentParser,
) -> None:
    assert parser.epilog is not None and parser.epilog.startswith(EXAMPLE), parser.prog
    assert parser.format_help().rstrip().endswith(parser.epilog)
    words = shlex.split(parser.epilog.removeprefix(EXAMPLE).split(" > ")[0])
    assert words[0] == "stream-scorer"
    assert " ".join(words).startswith(parser.prog), "the example runs this command"
    build_parser().parse_args(words[1:])  # exits 2 (SystemExit) if the example is stale


def test_importing_the_cli_and_building_its_parser_imports_no_implementation() -> None:
    code = (
        "import json, sys\n"
        "from stream_scorer.cli import build_parser\n"
        "build_parser().format_help()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(result.stdout)
    heavy = ["stream_scorer.devtools", "stream_scorer.example", "stream_scorer.ops"]
    heavy += ["stream_scorer.worker", "xgboost", "numba"]
    assert [m for m in loaded if any(m == h or m.startswith(f"{h}.") for h in heavy)] == []
    assert "stream_scorer.cli.develop" in loaded  # the check sees the command modules load
