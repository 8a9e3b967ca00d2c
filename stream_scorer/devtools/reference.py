"""README's generated references: blocks rewritten from the code that is their one home.

A block sits between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` in
README.md; ``python -m stream_scorer.devtools.reference README.md`` rewrites every block from
its generator, and a unit test fails while README differs from what they generate. The blocks:
``prediction headers`` and ``dead-letter headers`` (``stream_scorer/headers.py``).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from stream_scorer import headers as hdr


def _names(names: Sequence[str]) -> str:
    """``first``, then each later name as ``.rest`` when it shares the first's prefix."""
    prefix = names[0].rsplit(".", 1)[0] + "."
    shown = [names[0]] + [
        "." + n.removeprefix(prefix) if n.startswith(prefix) else n for n in names[1:]
    ]
    return ", ".join(f"`{n}`" for n in shown)


def header_table(rows: Sequence[hdr.HeaderRow]) -> str:
    """A Markdown table of header rows (``headers.PREDICTION_ROWS``, ``DEAD_LETTER_ROWS``)."""
    lines = ["| header | value |", "|---|---|"]
    lines += [f"| {_names(names)} | {value} |" for names, value in rows]
    return "\n".join(lines)


#: Every generated block: its name in README's markers and what generates it.
BLOCKS: dict[str, Callable[[], str]] = {
    "prediction headers": lambda: header_table(hdr.PREDICTION_ROWS),
    "dead-letter headers": lambda: header_table(hdr.DEAD_LETTER_ROWS),
}


def _block(name: str) -> re.Pattern[str]:
    name = re.escape(name)
    return re.compile(
        rf"(<!-- generated: {name} -->\n)(.*?)(<!-- end generated: {name} -->)", re.DOTALL
    )


def rewrite(text: str) -> str:
    """``text`` with every generated block replaced by what its generator makes now.

    Raises:
        ValueError: a block's markers are missing (each appears exactly once).
    """
    for name, generate in BLOCKS.items():
        found = list(_block(name).finditer(text))
        if len(found) != 1:
            raise ValueError(f"README must hold the generated block {name!r} exactly once")
        text = text[: found[0].start(2)] + generate() + "\n" + text[found[0].end(2) :]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the generated blocks of the file named (README.md); print whether it changed."""
    (path,) = [Path(a) for a in (sys.argv[1:] if argv is None else argv)] or [Path("README.md")]
    before = path.read_text(encoding="utf-8")
    after = rewrite(before)
    if after != before:
        path.write_text(after, encoding="utf-8")
    print(f"{path}: {'rewritten' if after != before else 'up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
