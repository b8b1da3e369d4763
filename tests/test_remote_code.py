"""Checkpoints load in a process that cannot import the package, through trust_remote_code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch
from PIL import Image
from tiny import tiny_checkpoint_parts

from modeling_blip2 import save_with_remote_code

CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_blip2"] = None  # the package is installed here: make sure nothing can import it
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    folder = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    inputs = processor(images=[image, image], text=["a photo of", "a"], return_tensors="pt")
    ids = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    captioner = pipeline("image-to-text", model=folder, trust_remote_code=True)
    caption = captioner(image, max_new_tokens=3)
    print(json.dumps({
        "model_module": type(model).__module__,
        "processor_class": type(processor).__name__,
        "ids": ids.tolist(),
        "caption": caption[0]["generated_text"],
    }))
    """
)


def test_remote_code_checkpoint_loads_without_the_package(tmp_path) -> None:
    model, processor = tiny_checkpoint_parts()
    folder = save_with_remote_code(model, tmp_path / "checkpoint", processor)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling.Blip2ForConditionalGeneration"
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"]["AutoProcessor"] == (
        "processing.Blip2ImageTextProcessor"
    )
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    inputs = processor(images=[image, image], text=["a photo of", "a"], return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5).tolist()

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model_module"].startswith("transformers_modules.")
    assert report["processor_class"] == "Blip2ImageTextProcessor"
    assert report["ids"] == expected
    assert isinstance(report["caption"], str)


def test_child_really_cannot_import_the_package(tmp_path) -> None:
    probe = 'import sys; sys.modules["modeling_blip2"] = None\ntry:\n import modeling_blip2\nexcept ImportError:\n'
    probe += ' print("blocked")'
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "blocked"
    assert torch.__version__  # the child shares this interpreter and its site-packages
