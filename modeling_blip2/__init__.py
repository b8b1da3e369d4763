"""modeling-blip2: BLIP-2 as Hugging Face-native models, weight-compatible with the official checkpoints.

Importing the package registers its classes with the transformers Auto classes (safe to repeat).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

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
from .pipelines import Blip2ImageToTextPipeline, Blip2VisualQuestionAnsweringPipeline
from .pretraining import Blip2ForImageTextRetrieval, Blip2ForPretraining
from .processing import Blip2ImageTextProcessor, blip2_image_processor, load_qformer_tokenizer, to_rgb_image
from .qformer import ATTENTION_TYPES, Blip2TextEmbeddings, build_qformer_attention_mask
from .remote_code import add_remote_code, save_with_remote_code

__version__ = "0.1.0"


def register_auto_classes() -> None:
    """Maps our model types to our classes in the Auto classes; built-in BLIP-2 checkpoints keep the built-in ones.

    Auto model mappings are keyed by config class; ours shares the *name* `Blip2Config` with the built-in one, hence
    `exist_ok=True` (it adds our class object as a key and leaves the built-in entry alone).
    """
    for config_class in (Blip2Config, Blip2VisionConfig, Blip2QFormerConfig):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(Blip2Config, Blip2Model, exist_ok=True)
    AutoModel.register(Blip2VisionConfig, Blip2VisionModel, exist_ok=True)
    AutoModel.register(Blip2QFormerConfig, Blip2QFormerModel, exist_ok=True)
    AutoModelForImageTextToText.register(Blip2Config, Blip2ForConditionalGeneration, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(Blip2Config, Blip2ForConditionalGeneration, exist_ok=True)
    AutoModelForPreTraining.register(Blip2Config, Blip2ForPretraining, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(Blip2Config, Blip2ForImageTextRetrieval, exist_ok=True)
    AutoProcessor.register(Blip2Config, Blip2ImageTextProcessor, exist_ok=True)


register_auto_classes()

__all__ = [
    "ATTENTION_TYPES",
    "add_remote_code",
    "Blip2Config",
    "Blip2ConditionalGenerationOutput",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2ForPretraining",
    "Blip2ImageEncodingOutput",
    "Blip2ImageTextProcessor",
    "Blip2ImageToTextPipeline",
    "Blip2Model",
    "Blip2PreTrainedModel",
    "Blip2QFormerConfig",
    "Blip2QFormerModel",
    "Blip2TextEmbeddings",
    "Blip2VisionConfig",
    "Blip2VisionModel",
    "Blip2VisualQuestionAnsweringPipeline",
    "blip2_image_processor",
    "build_qformer_attention_mask",
    "load_qformer_tokenizer",
    "register_auto_classes",
    "save_with_remote_code",
    "to_rgb_image",
]
