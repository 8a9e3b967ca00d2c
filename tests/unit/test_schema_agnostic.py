import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_no_core_module_names_the_example_fields() -> None:
    schema = json.loads((ROOT / "schemas" / "ride_request.v1.avsc").read_text())
    fields = [f["name"] for f in schema["fields"]]
    core = list((ROOT / "stream_scorer").glob("*.py"))  # example/ is a subpackage, not globbed
    assert len(core) > 10
    offenders = [
        (p.name, name)
        for p in core
        for name in fields
        if re.search(rf"\b{re.escape(name)}\b", p.read_text(encoding="utf-8"))
    ]
    assert offenders == []
