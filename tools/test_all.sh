#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, generated files in sync, tests, notebooks, exercise stubs, book.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1

echo "== lint and format"
ruff check .
ruff format --check .
echo "== generated exercise stubs are in sync with the reference"
python tools/make_exercises.py --check
echo "== tests (reference code, the book build in strict mode, the perf ratios)"
python -m pytest -p no:cacheprovider
echo "== notebooks run top to bottom"
python -m pytest -p no:cacheprovider --nbval --nbval-current-env notebooks/
echo "== every exercise test fails on the untouched stubs"
python tools/check_exercises_fail.py
echo "== all green"
