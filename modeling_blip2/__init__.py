"""modeling-blip2: BLIP-2 as Hugging Face-native models, weight-compatible with the official checkpoints."""

from .configuration import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from .modeling import (
    Blip2ConditionalGenerationOutput,
    Blip2ForConditionalGeneration,
    Blip2ImageEncodingOutput,
    Blip2Model,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)
from .qformer import ATTENTION_TYPES, Blip2TextEmbeddings, build_qformer_attention_mask

__version__ = "0.1.0"

__all__ = [
    "ATTENTION_TYPES",
    "Blip2Config",
    "Blip2ConditionalGenerationOutput",
    "Blip2ForConditionalGeneration",
    "Blip2ImageEncodingOutput",
    "Blip2Model",
    "Blip2PreTrainedModel",
    "Blip2QFormerConfig",
    "Blip2QFormerModel",
    "Blip2TextEmbeddings",
    "Blip2VisionConfig",
    "Blip2VisionModel",
    "build_qformer_attention_mask",
]
