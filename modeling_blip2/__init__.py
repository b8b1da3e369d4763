"""modeling-blip2: BLIP-2 as Hugging Face-native models, weight-compatible with the official checkpoints.

Importing the package registers its classes with the transformers Auto classes (safe to repeat).
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForTextEncoding,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .capfilt import (
    Blip2ItgCaptioner,
    Blip2LanguageModelCaptioner,
    CapFiltReport,
    CapFiltResult,
    ImageTextScorer,
    SamplingOptions,
    capfilt_images,
    load_captioner,
    load_captioner_and_scorer,
    load_scorer,
    run_capfilt,
)
from .caption_metrics import CaptionMetrics
from .configuration import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig
from .embedding_models import (
    Blip2TextModelOutput,
    Blip2TextModelWithProjection,
    Blip2VisionModelOutput,
    Blip2VisionModelWithProjection,
)
from .handoff import HandoffReport, build_stage2_from_stage1, load_stage1_into, stage2_state_dict_from_stage1
from .initialization import InitReport, init_qformer_from_bert, qformer_config_from_bert
from .modeling import (
    Blip2ConditionalGenerationOutput,
    Blip2ForConditionalGeneration,
    Blip2ImageEncodingOutput,
    Blip2ImageFeaturesOutput,
    Blip2Model,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    Blip2VisionModel,
)
from .pipelines import Blip2ImageToTextPipeline, Blip2VisualQuestionAnsweringPipeline
from .pretraining import Blip2ForImageTextRetrieval, Blip2ForPretraining
from .processing import (
    Blip2ImageTextProcessor,
    blip2_image_processor,
    fixed_resolution_image_processor,
    load_qformer_tokenizer,
    to_rgb_image,
)
from .qformer import ATTENTION_TYPES, Blip2QFormerKeyValues, Blip2TextEmbeddings, build_qformer_attention_mask
from .remote_code import add_remote_code, save_with_remote_code
from .retrieval import RetrievalResult, evaluate_retrieval, recall_at_k, zero_shot_classify, zero_shot_classify_texts
from .vqa import Blip2VqaCollator, VqaMetrics, normalize_vqa_answer, predict_answers, vqa_accuracy

__version__ = "0.1.0"

# Training classes import transformers' Trainer (and accelerate): loaded on first use, not with the package.
_LAZY_TRAINING_NAMES = (
    "Blip2CaptionCollator",
    "Blip2ImageTextCollator",
    "Blip2Trainer",
    "Blip2TrainingArguments",
    "FrozenFeatureDataset",
    "RandomResizedCropFlip",
)


def __getattr__(name: str) -> object:
    if name in _LAZY_TRAINING_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    # The text half of the contrastive space is a text encoder. transformers has no Auto class for image embedding
    # models (nor registers its own Blip2VisionModelWithProjection): load that one by its class.
    AutoModelForTextEncoding.register(Blip2Config, Blip2TextModelWithProjection, exist_ok=True)
    AutoProcessor.register(Blip2Config, Blip2ImageTextProcessor, exist_ok=True)


register_auto_classes()

__all__ = [
    "ATTENTION_TYPES",
    "Blip2CaptionCollator",
    "Blip2ConditionalGenerationOutput",
    "Blip2Config",
    "Blip2ForConditionalGeneration",
    "Blip2ForImageTextRetrieval",
    "Blip2ForPretraining",
    "Blip2ImageEncodingOutput",
    "Blip2ImageFeaturesOutput",
    "Blip2ImageTextCollator",
    "Blip2ImageTextProcessor",
    "Blip2ImageToTextPipeline",
    "Blip2ItgCaptioner",
    "Blip2LanguageModelCaptioner",
    "Blip2Model",
    "Blip2PreTrainedModel",
    "Blip2QFormerConfig",
    "Blip2QFormerKeyValues",
    "Blip2QFormerModel",
    "Blip2TextEmbeddings",
    "Blip2TextModelOutput",
    "Blip2TextModelWithProjection",
    "Blip2Trainer",
    "Blip2TrainingArguments",
    "Blip2VisionConfig",
    "Blip2VisionModel",
    "Blip2VisionModelOutput",
    "Blip2VisionModelWithProjection",
    "Blip2VisualQuestionAnsweringPipeline",
    "Blip2VqaCollator",
    "CapFiltReport",
    "CapFiltResult",
    "CaptionMetrics",
    "FrozenFeatureDataset",
    "HandoffReport",
    "ImageTextScorer",
    "InitReport",
    "RandomResizedCropFlip",
    "RetrievalResult",
    "SamplingOptions",
    "VqaMetrics",
    "add_remote_code",
    "blip2_image_processor",
    "build_qformer_attention_mask",
    "build_stage2_from_stage1",
    "capfilt_images",
    "evaluate_retrieval",
    "fixed_resolution_image_processor",
    "init_qformer_from_bert",
    "load_captioner",
    "load_captioner_and_scorer",
    "load_qformer_tokenizer",
    "load_scorer",
    "load_stage1_into",
    "normalize_vqa_answer",
    "predict_answers",
    "qformer_config_from_bert",
    "recall_at_k",
    "register_auto_classes",
    "run_capfilt",
    "save_with_remote_code",
    "stage2_state_dict_from_stage1",
    "to_rgb_image",
    "vqa_accuracy",
    "zero_shot_classify",
    "zero_shot_classify_texts",
]
