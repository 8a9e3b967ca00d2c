"""The header names in stream_scorer/headers.py are the ones README documents."""

import re
from pathlib import Path

from stream_scorer import headers as hdr

README = (Path(__file__).parents[2] / "README.md").read_text()


def _documented() -> set[str]:
    """Backticked header names in README; ``.x`` continues the previous full name's prefix."""
    names: set[str] = set()
    base = ""
    for token in re.findall(r"`([^`\s]+)`", README):
        if token.startswith(("stream_scorer.", "__connect.errors.", "__value_schema_id")):
            names.add(token)
            base = token.rsplit(".", 1)[0] + "."
        elif token.startswith(".") and base:
            names.add(base + token[1:])
    return names


def test_every_header_name_is_documented() -> None:
    names = {
        value
        for key, value in vars(hdr).items()
        if key.isupper() and isinstance(value, str) and not key.endswith("PREFIX")
    }
    assert len(names) >= 18
    assert names - _documented() == set()
