"""The header names in stream_scorer/headers.py are the ones README and the manual document."""

import importlib.util
import re
from pathlib import Path

from stream_scorer import headers as hdr
from stream_scorer.devtools import manual

ROOT = Path(__file__).parents[2]
#: README and every page of the manual, generated references included.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "manual").rglob("*.md"))]
TEXT = "\n".join(p.read_text(encoding="utf-8") for p in DOCS)
HEADERS_PAGE = (ROOT / manual.DEFAULT_DIR / "headers.md").read_text(encoding="utf-8")


def _names() -> set[str]:
    return {
        value
        for key, value in vars(hdr).items()
        if key.isupper() and isinstance(value, str) and not key.endswith("PREFIX")
    }


def _documented(text: str) -> set[str]:
    """Backticked header names in ``text``; ``.x`` continues the previous full name's prefix."""
    names: set[str] = set()
    base = ""
    for token in re.findall(r"`([^`\s]+)`", text):
        if token.startswith(("stream_scorer.", "__connect.errors.", "__value_schema_id")):
            names.add(token)
            base = token.rsplit(".", 1)[0] + "."
        elif token.startswith(".") and base:
            names.add(base + token[1:])
    return names


def test_every_header_name_is_on_the_generated_headers_page() -> None:
    names = _names()
    assert len(names) >= 18
    assert names - _documented(HEADERS_PAGE) == set()
    # one row per name, its meaning the #: comment above it in headers.py
    assert f"| `{hdr.MODEL_VERSION}` | The model version that scored the record" in HEADERS_PAGE


def test_the_docs_name_no_header_that_headers_py_lacks() -> None:
    """A backticked ``stream_scorer.x...`` that is no module of the package is a header name."""
    names = {v for k, v in vars(hdr).items() if k.isupper() and isinstance(v, str)}
    # MLflow tags (models.md, rollouts.md)
    not_headers = {"stream_scorer.alias_history.<alias>", "stream_scorer.rollout.<alias>"}
    checked = 0
    for token in re.findall(r"`(stream_scorer\.[^`\s(]+)`", TEXT):
        if importlib.util.find_spec(".".join(token.split(".")[:2])) is not None:
            continue  # a module path (stream_scorer.errors.EXIT_*, stream_scorer.model.version)
        checked += 1
        assert token in names | not_headers, f"the docs name header {token!r}: not in headers.py"
    assert checked >= 10
