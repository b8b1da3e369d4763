"""Test set-up: offline Hub, a private HF_HOME, deterministic CPU threads."""

import os
import tempfile

# Before anything imports huggingface_hub: no network calls (each would burn ~23 s in DNS retries here).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="modeling-blip2-hf-home-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is faster than two fighting over a shared 2-core machine, and deterministic.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
