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


def test_readme_header_tables_are_the_generated_ones() -> None:
    from stream_scorer.devtools.reference import rewrite

    # `python -m stream_scorer.devtools.reference README.md` rewrites them from headers.py
    assert rewrite(README) == README
    assert f"| `{hdr.MODEL_VERSION}` | the model in use |" in README


def test_readme_names_no_header_that_headers_py_lacks() -> None:
    """A backticked ``stream_scorer.x...`` that is no module of the package is a header name."""
    import importlib.util

    names = {v for k, v in vars(hdr).items() if k.isupper() and isinstance(v, str)}
    not_headers = {"stream_scorer.alias_history.<alias>"}  # an MLflow tag (README, "Models")
    checked = 0
    for token in re.findall(r"`(stream_scorer\.[^`\s(]+)`", README):
        if importlib.util.find_spec(".".join(token.split(".")[:2])) is not None:
            continue  # a module path (stream_scorer.errors.EXIT_*, stream_scorer.model.version)
        checked += 1
        assert token in names | not_headers, f"README names header {token!r}: not in headers.py"
    assert checked >= 10
