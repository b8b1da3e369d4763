#!/usr/bin/env bash
# The README's test command: set-up (scripts/setup.sh), lint/format checks, and the default (offline, CPU) test
# suite. Extra arguments go to pytest, e.g. `scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
