#!/usr/bin/env bash
# The README's main command: creates .venv on first use (CPU torch pinned) and runs the main job.
# Until the end-to-end training recipe lands, the main job captions an image with a randomly initialised tiny
# model (hub_configs/tiny-random): it shows the whole path runs, not that anything was learned.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e '.[dev]'
export HF_HUB_OFFLINE=1
.venv/bin/python examples/caption.py --model hub_configs/tiny-random --random_init --prompt "a photo of" "$@"
