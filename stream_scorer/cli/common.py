"""What the command modules share: the sub-parser type and the way a command is added."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

#: The ``add_subparsers()`` object a command group adds its commands to.
if TYPE_CHECKING:
    Commands = argparse._SubParsersAction[argparse.ArgumentParser]
else:  # not subscriptable at run time
    Commands = argparse._SubParsersAction

#: What starts each command's epilog (``stream-scorer X --help`` ends with one example).
EXAMPLE = "example: "


def command(sub: Commands, name: str, example: str, **kwargs: Any) -> argparse.ArgumentParser:
    """Add command ``name`` to ``sub``; its help ends with ``example: stream-scorer <example>``.

    ``kwargs`` go to ``add_parser`` (``help``, ``description``).
    """
    return sub.add_parser(name, epilog=f"{EXAMPLE}stream-scorer {example}", **kwargs)


def command_group(sub: Commands, name: str, example: str, **kwargs: Any) -> Commands:
    """Add command ``name`` (as ``command``) that has commands of its own; return their ``sub``.

    The chosen one lands in ``args.<name>_command``.
    """
    parser = command(sub, name, example, **kwargs)
    return parser.add_subparsers(dest=f"{name}_command", required=True)


def group_tool_options(parser: argparse.ArgumentParser) -> None:
    """Add what ``lag`` and ``rewind`` share: ``--json``, the connection and ``--timeout``."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--bootstrap-servers", help="brokers (or take them from --config)")
    parser.add_argument("--config", type=Path, help="a worker configuration (brokers, security)")
    parser.add_argument("--timeout", type=float, default=15.0, help="seconds per broker request")
