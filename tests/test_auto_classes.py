"""Auto classes resolve to our classes for our checkpoints and to the built-in ones for stock checkpoints."""

from __future__ import annotations

import pytest
import transformers
from tiny import TINY_RANDOM, config_dict, randomise_, tiny_checkpoint_parts
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoModelForVisualQuestionAnswering,
    AutoProcessor,
    AutoTokenizer,
)

import modeling_blip2


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ours")
    model, processor = tiny_checkpoint_parts()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stock")
    stock = randomise_(transformers.Blip2ForConditionalGeneration(transformers.Blip2Config(**config_dict())))
    stock.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_RANDOM)
    image_processor = transformers.BlipImageProcessorPil(size={"height": 28, "width": 28})
    transformers.Blip2Processor(image_processor, tokenizer, num_query_tokens=4).save_pretrained(folder)
    return folder


def test_our_checkpoint_resolves_to_our_classes(our_checkpoint) -> None:
    assert type(AutoConfig.from_pretrained(our_checkpoint)) is modeling_blip2.Blip2Config
    assert type(AutoModelForImageTextToText.from_pretrained(our_checkpoint)) is (
        modeling_blip2.Blip2ForConditionalGeneration
    )
    assert type(AutoModelForVisualQuestionAnswering.from_pretrained(our_checkpoint)) is (
        modeling_blip2.Blip2ForConditionalGeneration
    )
    assert type(AutoModel.from_pretrained(our_checkpoint)) is modeling_blip2.Blip2Model
    assert type(AutoProcessor.from_pretrained(our_checkpoint)) is modeling_blip2.Blip2ImageTextProcessor


def test_stock_checkpoint_still_resolves_to_builtin_classes_in_the_same_process(stock_checkpoint) -> None:
    assert type(AutoConfig.from_pretrained(stock_checkpoint)) is transformers.Blip2Config
    assert type(AutoModelForImageTextToText.from_pretrained(stock_checkpoint)) is (
        transformers.Blip2ForConditionalGeneration
    )
    assert type(AutoModel.from_pretrained(stock_checkpoint)) is transformers.Blip2Model
    assert type(AutoProcessor.from_pretrained(stock_checkpoint)) is transformers.Blip2Processor
    # ... and our class still reads the stock checkpoint when asked to.
    assert type(modeling_blip2.Blip2ForConditionalGeneration.from_pretrained(stock_checkpoint)) is (
        modeling_blip2.Blip2ForConditionalGeneration
    )


def test_sub_models_and_repeated_registration() -> None:
    modeling_blip2.register_auto_classes()  # safe to repeat
    vision_config = modeling_blip2.Blip2VisionConfig(**config_dict()["vision_config"])
    assert type(AutoModel.from_config(vision_config)) is modeling_blip2.Blip2VisionModel
    qformer_config = modeling_blip2.Blip2QFormerConfig(**config_dict()["qformer_config"])
    assert type(AutoModel.from_config(qformer_config)) is modeling_blip2.Blip2QFormerModel
    assert type(AutoConfig.for_model("modeling_blip2")) is modeling_blip2.Blip2Config
