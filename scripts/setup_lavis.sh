#!/usr/bin/env bash
# .venv-lavis: Salesforce LAVIS 1.0.2 exactly as PyPI ships it, for `examples/benchmark_training.py --against-lavis`
# (LAVIS's own Blip2Qformer timed against ours, in a worker process). LAVIS needs transformers < 4.27 and this project
# transformers 5, hence an environment of its own; nothing of it goes into .venv. Idempotent: rerunning it only checks.
#
# Importing any LAVIS module runs lavis/__init__.py, which imports every dataset builder, model, processor and task, so
# `import lavis.models.blip2_models.blip2_qformer` needs more than the BLIP-2 code uses. The packages below are exactly
# the ones that import needs (found by installing until it succeeded), all real packages from PyPI; nothing is shimmed:
#   omegaconf, iopath, pandas, einops, webdataset, decord, opencv-python-headless, fairscale 0.4.4 (LAVIS's pin),
#   spacy, pycocoevalcap, requests, pillow, transformers 4.26.1 (with tokenizers 0.13.3, which has a Python 3.11 wheel),
#   timm 0.4.12 (LAVIS's pin) and torchvision.
# torchvision: PyPI's Linux wheels are CUDA builds. From 0.17 on, `import torchvision` registers fake kernels for its
# C++ operators and fails beside a CPU torch ("operator torchvision::nms does not exist"); 0.16.2 is the newest whose
# import survives the missing extension (only its compiled operators, e.g. nms, are unavailable, and BLIP-2 uses none).
# It, timm (which would pull a matching torchvision and so a CUDA torch) and LAVIS itself (whose list pins an
# opencv without a numpy-2 build and pulls streamlit, plotly, ipython, pre-commit, ...) install with --no-deps.
# torch 2.13.0 is pinned in the resolving command, so nothing there pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK="import lavis.models.blip2_models.blip2_qformer"
if [ -x .venv-lavis/bin/python ] && .venv-lavis/bin/python -W ignore -c "$CHECK" 2>/dev/null; then
  echo ".venv-lavis is ready"
  exit 0
fi
[ -x .venv-lavis/bin/python ] || python3 -m venv .venv-lavis
PIP=(.venv-lavis/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0 transformers==4.26.1 omegaconf iopath pandas einops webdataset decord \
  opencv-python-headless fairscale==0.4.4 spacy pycocoevalcap requests pillow
"${PIP[@]}" --no-deps salesforce-lavis==1.0.2 timm==0.4.12 torchvision==0.16.2
.venv-lavis/bin/python -W ignore -c "$CHECK"
echo ".venv-lavis is ready: $(.venv-lavis/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null)"
