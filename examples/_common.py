"""Loading shared by the command-line examples (model + processor from a folder or Hub id, or random weights)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor

from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration


def load_model_and_processor(model_id: str, random_init: bool = False, seed: int = 0) -> tuple[Any, Any]:
    """A BLIP-2 checkpoint (ours or the official transformers layout) and its processor, in eval mode."""
    torch.manual_seed(seed)
    if random_init:
        model = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(model_id))
        print("NOTE: randomly initialised model: the output below is noise, not a trained model's.")
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(model_id)
    return model.eval(), AutoProcessor.from_pretrained(model_id)
