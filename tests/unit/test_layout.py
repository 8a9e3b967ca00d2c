"""The manual's layout page lists exactly the package's modules and folders."""

from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "stream_scorer"


def _documented() -> set[str]:
    section = (ROOT / "docs" / "manual" / "layout.md").read_text()
    block = section[section.index("```\n") + 4 : section.index("\n```", section.index("```\n"))]
    paths: set[str] = set()
    folder = ""
    for line in block.splitlines()[1:]:  # below "stream_scorer/"
        indent = len(line) - len(line.lstrip())
        name = line.split()[0]
        if indent == 2:
            folder = name if name.endswith("/") else ""
            paths.add(name)
        else:
            paths.add(folder + name)
    return paths


def _tree() -> set[str]:
    out = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.name in {"__init__.py", "__main__.py"}:
            if len(rel.parts) == 2:
                out.add(rel.parts[0] + "/")
            continue
        out.add(str(rel))
    return out


def test_manual_layout_lists_every_module_and_folder() -> None:
    documented = _documented()
    assert len(documented) > 40
    assert documented == _tree() | {"contracts/"}
