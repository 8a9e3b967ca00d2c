"""Print CHANGELOG.md's section for a version; fail when the version is not the package's.

Used by .github/workflows/ci.yml (``python .ci/release_notes.py v1.2.3``; ``--version`` prints
the version alone, read without installing anything) and by tests/unit/test_version.py. Exit 1, with the reason, when the tag's version differs from
``version`` in pyproject.toml or CHANGELOG.md has no ``## [<version>] - <date>`` section.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_version(root: Path = ROOT) -> str:
    """``version`` in pyproject.toml: the one source of the version."""
    with (root / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def section(changelog: str, version: str) -> str:
    """The body of ``## [version] - YYYY-MM-DD``; ValueError when there is none."""
    head = re.compile(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d{{2}}-\d{{2}}\s*$", re.M)
    found = head.search(changelog)
    if found is None:
        raise ValueError(f"CHANGELOG.md has no section '## [{version}] - YYYY-MM-DD'")
    rest = changelog[found.end() :]
    end = re.search(r"^## |^\[[^\]]+\]: ", rest, re.M)
    return rest[: end.start() if end else len(rest)].strip()


def main(argv: list[str]) -> int:
    """``release_notes.py [vVERSION | --version]``: print the section, or the version alone.

    Without an argument, the section of the package's version.
    """
    version = package_version()
    if argv == ["--version"]:
        print(version)
        return 0
    tag = argv[0].removeprefix("refs/tags/") if argv else f"v{version}"
    if tag != f"v{version}":
        print(f"tag {tag} is not v{version}, the version in pyproject.toml", file=sys.stderr)
        return 1
    try:
        print(section((ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), version))
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
