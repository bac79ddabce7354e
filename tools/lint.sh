#!/usr/bin/env bash
# Lint, formatting and types (CI runs it after the tests, .ci/run). Rules and settings: pyproject.toml
# ([tool.ruff], [tool.mypy]); ruff and mypy come with the test extra (pip install -e ".[test]").
# To fix what can be fixed mechanically: python -m ruff check --fix . && python -m ruff format .
set -euo pipefail
cd "$(dirname "$0")/.."
python -m ruff check .           # lint: the whole tree (package, tests, benchmarks, tools)
python -m ruff format --check .  # formatting (ruff format), line length 120
python -m mypy                   # types: the package (files = larvseg)
echo "lint: ruff check, ruff format --check and mypy: clean"
