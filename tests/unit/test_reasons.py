"""Dead-letter reason codes have one home, ``records.Reason``: the code and the manual follow it."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import stream_scorer
from stream_scorer.fast import kernel
from stream_scorer.fast import path as fast_path
from stream_scorer.stages import avro_guard, decode, features
from stream_scorer.stages.records import DECODE_REASONS, FEATURE_REASONS, Reason, Stage

PACKAGE = Path(stream_scorer.__file__).parent
DEAD_LETTERS_PAGE = PACKAGE.parent / "docs" / "manual" / "dead-letters.md"
SOURCES = sorted(PACKAGE.rglob("*.py"))

#: Calls that carry a reason code, and where: (positional index, keyword).
REASON_ARGUMENTS = {
    "DeadLetter": (2, "reason"),
    "_dead": (1, "reason"),
    "RejectedRow": (2, "reason"),
    "FeatureError": (0, "reason"),
    "_Invalid": (0, "reason"),
    "Violation": (0, "reason"),
}


def _callee(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _reason_arguments(tree: ast.AST) -> list[ast.expr]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) in REASON_ARGUMENTS:
            index, keyword = REASON_ARGUMENTS[_callee(node)]
            if len(node.args) > index:
                out.append(node.args[index])
            out.extend(k.value for k in node.keywords if k.arg == keyword)
    return out


def test_every_reason_the_code_emits_is_a_member() -> None:
    emitters = 0
    for source in SOURCES:
        text = source.read_text(encoding="utf-8")
        # every Reason.X, also in the Avro guard's generated code, names a member
        for name in re.findall(r"\bReason\.([A-Za-z_]\w*)", text):
            assert name in Reason.__members__, f"{source.name}: Reason.{name} is no member"
        for arg in _reason_arguments(ast.parse(text)):
            emitters += 1
            where = f"{source.relative_to(PACKAGE)}:{arg.lineno}"
            assert not isinstance(arg, ast.Constant), f"{where}: a reason written as a literal"
            if isinstance(arg, ast.Attribute) and getattr(arg.value, "id", "") == "Reason":
                assert arg.attr in Reason.__members__, where
    assert emitters > 30  # the scan finds the emitters (the guard alone has more)
    # the reasons that come from tables: the kernel's statuses and the fast path's verdicts
    assert kernel.REASONS[1:] == DECODE_REASONS
    assert set(fast_path.STATE_REASONS.values()) <= set(FEATURE_REASONS)
    assert set(fast_path.DECODE_EXPLAIN) == set(DECODE_REASONS)


def test_each_stage_has_its_reasons_and_the_modules_share_one_list() -> None:
    assert {r.stage for r in Reason} == set(Stage)
    assert all(r.stage is Stage.DECODE for r in DECODE_REASONS)
    assert all(r.stage is Stage.FEATURES for r in FEATURE_REASONS)
    assert avro_guard.DECODE_REASONS is decode.DECODE_REASONS is DECODE_REASONS
    assert features.FEATURE_REASONS is FEATURE_REASONS
    # values are unique: a member repeating a value would be an alias, listed in __members__
    # but not when iterating
    assert len(Reason.__members__) == len(Reason) == len({r.value for r in Reason})
    assert Reason.TRUNCATED == Reason.TRUNCATED.value == "truncated"
    assert f"{Reason.TRUNCATED}" == "truncated"


def _manual_reason_table() -> list[tuple[str, str]]:
    """The (stage, reason) rows of the manual's "Dead letters" table, in order."""
    section = DEAD_LETTERS_PAGE.read_text(encoding="utf-8")
    section = section.split("\n## Replaying dead letters\n", 1)[0]
    lines = section.splitlines()
    start = lines.index("| stage | reason | meaning |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 3, line
        rows.append((cells[0], cells[1].strip("`")))
    return rows


def test_manual_reason_table_lists_exactly_the_members_in_order() -> None:
    assert _manual_reason_table() == [(r.stage.value, r.value) for r in Reason]


def test_manual_names_where_the_reasons_live() -> None:
    text = DEAD_LETTERS_PAGE.read_text(encoding="utf-8")
    assert "`Reason` in `stream_scorer/stages/records.py`" in text


def test_kernel_recompiles_when_the_constants_it_was_cached_with_change(tmp_path: Path) -> None:
    # numba keys its cache on kernel.py and the bytecode, not on the constants the kernel takes
    # from other modules (Reason's order, fast.plan's numbers): the kernel checks them itself.
    script = (
        "import sys\n"
        "from stream_scorer.fast import plan\n"
        "plan.MAX_OPS += int(sys.argv[1])\n"
        "from stream_scorer.fast import kernel\n"
        "assert kernel._compiled_fingerprint() == kernel._FINGERPRINT\n"
        "print(sum(kernel._compiled_fingerprint.stats.cache_hits.values()))\n"
    )
    search = os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "PYTHONPATH": search}

    def run(change: int) -> str:
        done = subprocess.run(
            [sys.executable, "-c", script, str(change)],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert run(0) == "0"  # compiled, into the cache
    assert run(0) == "1"  # loaded from the cache
    assert run(1) == "1"  # loaded, found stale, compiled again
    assert run(1) == "1"  # the fresh code is what the cache holds now
