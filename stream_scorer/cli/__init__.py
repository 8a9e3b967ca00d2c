"""The ``stream-scorer`` command line: one module per group of commands.

``stream-scorer --help`` lists the commands by group, each module building its own sub-parsers
and importing what a command runs only when it runs:

- Run (``run``: a worker, or ``--workers N`` of them; ``configuration``: ``config check`` and
  ``config schema``, a configuration validated offline and its JSON Schema);
- Models (``models``: ``model publish|promote|rollback|pack|check``);
- Operate (``operate``: ``topics create``, ``acl grant``, ``lag``, ``rewind``, ``dlq replay``);
- Models, too (``watch``: ``evaluate``, predictions joined with their outcomes: live metrics per
  model version, canary decisions);
- Develop (``develop``: ``local-kafka``, ``local-registry``, ``local-mlflow``, ``bench``
  and its ``--soak``, ``demo``, and the shipped example's ``example init``, ``train`` and
  ``produce``).

Every command's ``--help`` ends with an example.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Any

from stream_scorer import logs
from stream_scorer.cli import configuration, develop, models, operate, run, watch
from stream_scorer.errors import EXIT_INTERRUPTED, ConfigError, StreamScorerError, exit_code

log = logging.getLogger("stream_scorer")

#: The command modules, in the order ``--help`` lists them (each has TITLE, ROWS, add_commands).
GROUPS = (run, configuration, models, watch, operate, develop)

_DESCRIPTION = "Score Avro events from Kafka with an XGBoost model, one prediction per event."
_USAGE = "%(prog)s [-h] [--log-level LEVEL] [--version] COMMAND ..."
_EPILOG = "stream-scorer COMMAND --help: the command's options and an example."
_NAMES_WIDTH = 24  # the column of the group rows' names


def version_text() -> str:
    """What ``--version`` prints: the package and what it runs with, one per line.

    The package version (pyproject.toml, through the installed metadata), XGBoost, librdkafka
    (and its Python binding), and the Apache Kafka broker jars the development tools run
    (``local-kafka``, the tests, the demo).
    """
    import platform
    from importlib import metadata

    import confluent_kafka
    import xgboost

    from stream_scorer import __version__
    from stream_scorer.devtools.localkafka import KAFKA_VERSION

    return "\n".join(
        [
            f"stream-scorer {__version__}",
            f"xgboost {xgboost.__version__}",
            f"librdkafka {confluent_kafka.libversion()[0]} "
            f"(confluent-kafka {metadata.version('confluent-kafka')})",
            f"kafka broker jars (local-kafka, tests) {KAFKA_VERSION}",
            f"python {platform.python_version()}",
        ]
    )


class _VersionAction(argparse.Action):
    """``--version``: print ``version_text()`` and exit 0 (its imports only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any, **_kwargs: Any) -> None:
        print(version_text(), flush=True)
        parser.exit()


class _GroupedParser(argparse.ArgumentParser):
    """The top-level parser: its help lists the commands under their groups, on one screen."""

    def format_help(self) -> str:
        """Usage, description, the groups' rows, the global options and the epilog."""
        rows: dict[str, list[str]] = {}
        for group in GROUPS:
            for names, summary in group.ROWS:
                shown = ", ".join(names)
                rows.setdefault(group.TITLE, []).append(
                    f"  {shown:<{_NAMES_WIDTH}}  {summary}".rstrip()
                )
        listing = "\n".join(f"{title}:\n" + "\n".join(lines) for title, lines in rows.items())
        formatter = argparse.HelpFormatter(self.prog, width=80)  # one screen, whatever COLUMNS
        formatter.start_section("options")
        # -h is in the usage line: who reads this knows it
        formatter.add_arguments([a for a in self._optionals._group_actions if a.dest != "help"])
        formatter.end_section()
        options = formatter.format_help().strip("\n")
        usage = self.format_usage().rstrip("\n")
        return f"{usage}\n\n{self.description}\n\n{listing}\n\n{options}\n{self.epilog}\n"


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every command (each group module adds its own)."""
    parser = _GroupedParser(prog="stream-scorer", description=_DESCRIPTION, epilog=_EPILOG)
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR (default: logging.level or INFO)",
    )
    parser.add_argument(
        "--version",
        action=_VersionAction,
        help="print the version, with those of xgboost, librdkafka and the Kafka broker jars",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    parser.usage = _USAGE  # after add_subparsers: the commands' prog is "stream-scorer X"
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code (docs/manual/commands.md, "Exit codes").

    0 a clean stop; 2 the deployment must be fixed (configuration, model, schema: no restart
    helps); 3 stopped idle with records left in partitions no live member consumes; 1 any
    other failure; 130 interrupted.
    """
    args = build_parser().parse_args(argv)
    logs.setup("auto", args.log_level or "INFO")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        log.error("%s", exc)
        return exit_code(exc)
    except StreamScorerError as exc:
        where = {k: getattr(exc, k, None) for k in ("topic", "partition", "offset")}
        extra = {k: v for k, v in where.items() if v is not None}
        log.error("%s: %s", type(exc).__name__, exc, extra={**extra, "error": type(exc).__name__})
        return exit_code(exc)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
