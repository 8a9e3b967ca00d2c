import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]
PACKAGE = ROOT / "stream_scorer"


def test_no_core_module_names_the_example_fields() -> None:
    schema = json.loads((ROOT / "schemas" / "ride_request.v1.avsc").read_text())
    fields = [f["name"] for f in schema["fields"]]
    # everything but the example
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] != "example"]
    assert len(core) > 30
    offenders = [
        (str(p.relative_to(PACKAGE)), name)
        for p in core
        for name in fields
        if re.search(rf"\b{re.escape(name)}\b", p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
