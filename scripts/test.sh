#!/usr/bin/env bash
# Set up, lint, and run the test suite. Extra arguments go to pytest (e.g. `-m slow` for the slow tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/python -m pytest -q "$@"
