#!/usr/bin/env python3
"""Show, and on request write, how golden dumps change: the review step before a golden commit.

    python tools/update_golden.py                  # every case: which dumps differ, with a diff
    python tools/update_golden.py fold-affine cle  # only these passes (or PASS/CASE ids)
    python tools/update_golden.py --write          # rewrite the expected.txt files that differ
    python tools/update_golden.py --new PASS/CASE  # scaffold golden/PASS/CASE (pipeline.txt = PASS)

Without --write nothing is written and the exit code says whether every selected dump is current
(0) or not (1), so the same command checks a tree. A new case (no expected.txt yet) counts as
differing. ``pytest tests/test_golden.py --update-golden`` rewrites too, but also runs the float
and idempotence checks; this tool shows the diffs you commit and say why about.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.golden_cases import GOLDEN_ROOT, GoldenCase, discover, run_case  # noqa: E402
from compiler.ir import QccError  # noqa: E402

INPUT_TEMPLATE = """# TODO: one line saying what this case checks (the rewrite, or why the pass declines).
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
  y = Relu(x)
}
"""


def select(cases: list[GoldenCase], wanted: list[str]) -> list[GoldenCase]:
    if not wanted:
        return cases
    chosen = [c for c in cases if c.id in wanted or c.path.parent.name in wanted]
    unknown = [w for w in wanted if not any(c.id == w or c.path.parent.name == w for c in cases)]
    if unknown:
        raise QccError(f"no golden case or pass named {', '.join(unknown)} (cases live in golden/PASS/CASE)")
    return chosen


def scaffold(case_id: str) -> Path:
    parts = case_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise QccError(f"--new wants PASS/CASE, got '{case_id}'")
    folder = GOLDEN_ROOT / parts[0] / parts[1]
    if folder.exists():
        raise QccError(f"{folder.relative_to(REPO)} already exists")
    folder.mkdir(parents=True)
    (folder / "pipeline.txt").write_text(parts[0] + "\n")
    (folder / "input.onnxtxt").write_text(INPUT_TEMPLATE)
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="passes or PASS/CASE ids (default: all)")
    parser.add_argument("--write", action="store_true", help="rewrite the expected.txt files that differ")
    parser.add_argument("--new", metavar="PASS/CASE", help="create golden/PASS/CASE with a template input")
    args = parser.parse_args(argv)
    try:
        if args.new:
            folder = scaffold(args.new)
            print(f"created {folder.relative_to(REPO)}: edit input.onnxtxt, then run this tool with --write")
            return 0
        stale = 0
        for case in select(discover(), args.cases):
            dump = run_case(case)[2]
            old = case.expected_path.read_text() if case.expected_path.exists() else ""
            if dump == old:
                continue
            stale += 1
            where = case.expected_path.relative_to(REPO)
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), dump.splitlines(True),
                                                       f"{where} (committed)", f"{where} (now)"))
            if args.write:
                case.expected_path.write_text(dump)
        verb = "rewritten" if args.write else "differ"
        print(f"{stale} golden dump(s) {verb}" if stale else "every selected golden dump is current", file=sys.stderr)
        return 1 if stale and not args.write else 0
    except QccError as exc:
        print(f"update_golden: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
