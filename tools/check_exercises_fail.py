"""Proves that every exercise test fails on the untouched stubs (a test that passes on a stub tests nothing).

    python tools/check_exercises_fail.py [extra pytest args]

Runs `pytest -m exercise --impl=exercises` and fails if any exercise test passed or was skipped,
or if none ran. CI runs it on a clean clone, where exercises/ holds the generated stubs.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "exercise",
            "--impl=exercises",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={report}",
            *sys.argv[1:],
        ]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 1:  # 1: tests ran and some failed; anything else: collection error, usage error...
            print(run.stdout[-3000:], run.stderr[-3000:], f"pytest exited with {run.returncode}, expected 1", sep="\n")
            return 1
        cases = ET.parse(report).getroot().iter("testcase")
        outcome = {}
        for case in cases:
            name = f"{case.get('classname')}::{case.get('name')}"
            kinds = {child.tag for child in case}
            outcome[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    if not outcome:
        print("no exercise tests ran")
        return 1
    wrong = {n: o for n, o in outcome.items() if o != "failed"}
    for name, result in wrong.items():
        print(f"{result} on the stubs (must fail): {name}")
    print(f"{len(outcome) - len(wrong)} of {len(outcome)} exercise tests fail on the untouched stubs")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
