"""README.md is the front door (short, the two commands) and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
MANUAL = ROOT / "docs" / "manual"
#: README and every page of the manual (its generated references too).
DOCUMENTS = [README, *sorted(MANUAL.rglob("*.md"))]
#: The most lines README may have: a front door; the manual is docs/manual/.
MAX_README_LINES = 200

_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (no links there)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """A heading's anchor, as GitHub and the site (``pymdownx.slugs.slugify``) make it."""
    text = heading.strip().replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    return {slug(m[1]) for m in re.finditer(r"^#{1,6} (.+)$", text, re.MULTILINE)}


def relative_links(path: Path) -> list[str]:
    """The targets of the Markdown links in ``path`` that are not URLs."""
    found = _LINK.findall(_prose(path.read_text(encoding="utf-8")))
    return [t for t in found if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(path: Path) -> list[str]:
    """The relative links of ``path`` whose file, or heading anchor, does not exist."""
    broken = []
    for target in relative_links(path):
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        missing_anchor = bool(anchor) and resolved.suffix == ".md"
        if not resolved.exists() or (missing_anchor and anchor not in anchors(resolved)):
            broken.append(target)
    return broken


def test_readme_is_a_front_door() -> None:
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    # the two commands come first (.ci/run runs `make test`)
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [
        ["make", "demo"],
        ["make", "test"],
    ]


def test_readme_links_every_page_of_the_manual() -> None:
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(README)}
    pages = {p.resolve() for p in MANUAL.rglob("*.md")}
    assert len(pages) > 15
    assert pages - linked == set()


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path: Path) -> None:
    assert broken_links(path) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "page.md").write_text("# Page\n\n## CI/CD and `tests`\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "[a](page.md) [b](page.md#cicd-and-tests) [c](https://x.org/none.md) `[d](none.md)`\n"
        "[e](missing.md) [f](page.md#nowhere) [g](#here)\n\n## Here\n",
        encoding="utf-8",
    )
    assert relative_links(doc) == [
        "page.md",
        "page.md#cicd-and-tests",
        "missing.md",
        "page.md#nowhere",
        "#here",
    ]
    assert broken_links(doc) == ["missing.md", "page.md#nowhere"]
