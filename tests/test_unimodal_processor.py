"""Issue 12, processor side: `Blip2ImageTextProcessor.from_unimodal_pretrained` over a foreign vision checkpoint's
image processor and an LLM's tokenizer, save/load of that processor, and chat templates with an image placeholder."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny import QFORMER_WORDS, TINY_RANDOM, VISION
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, BertTokenizerFast, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import AddedToken

import modeling_blip2  # noqa: F401  (registers the processor with AutoProcessor)
from modeling_blip2 import Blip2ImageTextProcessor, Blip2VisionConfig, blip2_image_processor
from modeling_blip2.processing import IMAGE_TOKEN, QFORMER_START_TOKEN, fixed_resolution_image_processor

QUERIES = 3
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}

# One tiny vision checkpoint per family: the model's config.json and the image processor it was trained with, in
# their PIL implementations (what transformers loads when torchvision is absent). Sizes and statistics differ from
# the BLIP-2 transform, so an image processor mixed up with ours would show.
VISION_FAMILIES = {
    "clip": lambda: (
        transformers.CLIPVisionConfig(**TINY_VISION, image_size=28, patch_size=7),
        transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28}),
    ),
    "siglip": lambda: (
        transformers.SiglipVisionConfig(**TINY_VISION, image_size=28, patch_size=7),
        transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28}),
    ),
    "siglip2": lambda: (
        transformers.Siglip2VisionConfig(**TINY_VISION, patch_size=7, num_patches=16),
        transformers.Siglip2ImageProcessorPil(patch_size=7, max_num_patches=16),
    ),
    "dinov2": lambda: (
        transformers.Dinov2Config(**TINY_VISION, image_size=28, patch_size=7),
        transformers.BitImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 28, "width": 28},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
    ),
    "vit": lambda: (
        transformers.ViTConfig(**TINY_VISION, image_size=28, patch_size=7),
        transformers.ViTImageProcessorPil(size={"height": 28, "width": 28}),
    ),
    "convnext": lambda: (
        transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=28),
        transformers.ConvNextImageProcessorPil(size={"shortest_edge": 28}),
    ),
    "blip2": lambda: (Blip2VisionConfig(**VISION), blip2_image_processor(28)),
}

QWEN_LIKE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_LIKE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_chat_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (a few merges) with the special tokens and chat template of Qwen2 or Llama 3.

    The Llama-3-like one adds its BOS to every text, as Llama 3's does, while its template writes BOS itself."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if kind == "qwen" else LLAMA3_SPECIALS
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        ["a photo of a cat on the left", "what is in the image? a red square", "user assistant system"], trainer
    )
    if kind == "qwen":
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        tokenizer.chat_template = QWEN_LIKE
    else:
        bos_id = backend.token_to_id("<|begin_of_text|>")
        backend.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos_id)]
        )
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
        )
        tokenizer.chat_template = LLAMA3_LIKE
    return tokenizer


@pytest.fixture(scope="module")
def vision_folders(tmp_path_factory) -> dict:
    folders = {}
    for family, build in VISION_FAMILIES.items():
        folder = tmp_path_factory.mktemp(f"vision-{family}")
        config, image_processor = build()
        config.save_pretrained(folder)
        image_processor.save_pretrained(folder)
        folders[family] = folder
    return folders


@pytest.fixture(scope="module")
def llm_folders(tmp_path_factory) -> dict:
    folders = {}
    for kind in ("qwen", "llama3"):
        folder = tmp_path_factory.mktemp(f"llm-{kind}")
        tiny_chat_tokenizer(kind).save_pretrained(folder)
        folders[kind] = folder
    return folders


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    BertTokenizerFast(vocab={word: i for i, word in enumerate(QFORMER_WORDS)}).save_pretrained(folder)
    return folder


def _images(count: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (23 + 6 * i, 37, 3), dtype=np.uint8)) for i in range(count)]


def _assert_same_features(first, second) -> None:
    assert set(first) == set(second)
    for key in first:
        assert torch.equal(first[key], second[key]), key


# -- from_unimodal_pretrained ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_images_go_through_the_vision_models_own_image_processor(family, vision_folders, llm_folders, tmp_path):
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(
        vision_folders[family], llm_folders["qwen"], num_query_tokens=QUERIES
    )
    # SigLIP2's NaFlex processor as the same transform at its fixed resolution: the model takes images, not patches.
    stand_alone = fixed_resolution_image_processor(AutoImageProcessor.from_pretrained(vision_folders[family]))
    assert type(processor.image_processor) is type(stand_alone)
    assert processor.image_processor.to_dict() == stand_alone.to_dict()
    if importlib.util.find_spec("torchvision") is None:
        assert type(processor.image_processor).__name__.endswith("Pil")
    images = _images()
    encoded = processor(images=images, text=["a photo of", "what is in the image?"])
    expected = stand_alone(images, return_tensors="pt")
    for key, value in expected.items():
        assert torch.equal(encoded[key], value), key
    assert set(expected) <= set(processor.model_input_names)
    assert [int((row == processor.image_token_id).sum()) for row in encoded.input_ids] == [QUERIES, QUERIES]

    # Saved and loaded back, by our class and by AutoProcessor: the same image processor, the same outputs.
    processor.save_pretrained(tmp_path / "processor")
    saved = json.loads((tmp_path / "processor" / "processor_config.json").read_text())
    source = json.loads((vision_folders[family] / "preprocessor_config.json").read_text())
    expected_type = "SiglipImageProcessor" if family == "siglip2" else source["image_processor_type"]
    assert saved["image_processor"]["image_processor_type"] == expected_type
    assert saved["num_query_tokens"] == QUERIES
    for loader in (Blip2ImageTextProcessor, AutoProcessor):
        reloaded = loader.from_pretrained(tmp_path / "processor")
        assert type(reloaded) is Blip2ImageTextProcessor
        assert type(reloaded.image_processor) is type(stand_alone)
        assert reloaded.image_processor.to_dict() == stand_alone.to_dict()
        assert reloaded.image_token_id == processor.image_token_id
        _assert_same_features(reloaded(images=images, text=["a photo of", "what is in the image?"]), encoded)


@pytest.mark.parametrize("kind", ["qwen", "llama3"])
def test_image_token_id_is_what_adding_it_to_a_fresh_tokenizer_gives(kind, vision_folders, llm_folders) -> None:
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(
        vision_folders["vit"], llm_folders[kind], num_query_tokens=QUERIES
    )
    fresh = AutoTokenizer.from_pretrained(llm_folders[kind])
    assert IMAGE_TOKEN not in fresh.get_vocab()
    fresh.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    assert processor.image_token_id == fresh.convert_tokens_to_ids(IMAGE_TOKEN) == len(fresh) - 1
    assert len(processor.tokenizer) == len(fresh)  # the LLM's embeddings resize to this


def test_a_tokenizer_that_has_the_image_token_keeps_its_id(vision_folders) -> None:
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(vision_folders["clip"], TINY_RANDOM)
    tokenizer = AutoTokenizer.from_pretrained(TINY_RANDOM)
    assert processor.image_token_id == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert len(processor.tokenizer) == len(tokenizer)
    assert processor.num_query_tokens == 32  # the paper's default
    assert processor.qformer_tokenizer is None


def test_qformer_tokenizer_from_a_bert_folder(vision_folders, llm_folders, bert_folder, tmp_path) -> None:
    assert QFORMER_START_TOKEN not in AutoTokenizer.from_pretrained(bert_folder).get_vocab()
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(
        vision_folders["dinov2"], llm_folders["qwen"], bert_folder, num_query_tokens=QUERIES
    )
    assert processor.qformer_tokenizer.bos_token == QFORMER_START_TOKEN
    encoded = processor(images=_images(1), text="what is in the image?", qformer_text="what is this ?")
    assert encoded.qformer_input_ids.shape[0] == 1
    processor.save_pretrained(tmp_path)
    reloaded = Blip2ImageTextProcessor.from_pretrained(tmp_path)
    assert reloaded.qformer_tokenizer.bos_token == QFORMER_START_TOKEN
    _assert_same_features(
        reloaded(images=_images(1), text="what is in the image?", qformer_text="what is this ?"), encoded
    )


def test_image_processor_kwargs_reach_the_image_processor(vision_folders, llm_folders) -> None:
    processor = Blip2ImageTextProcessor.from_unimodal_pretrained(
        vision_folders["siglip"],
        llm_folders["qwen"],
        num_query_tokens=QUERIES,
        image_processor_kwargs={"backend": "pil", "size": {"height": 14, "width": 14}},
    )
    assert type(processor.image_processor) is transformers.SiglipImageProcessorPil
    assert processor(images=_images(1)).pixel_values.shape == (1, 3, 14, 14)


def test_a_vision_folder_without_image_processor_is_a_clear_error(tmp_path, llm_folders) -> None:
    transformers.ViTConfig(**TINY_VISION, image_size=28, patch_size=7).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"image processor.*has no preprocessor_config\.json"):
        Blip2ImageTextProcessor.from_unimodal_pretrained(tmp_path, llm_folders["qwen"])


# -- chat templates -------------------------------------------------------------------------------------------------
def _chat_processor(llm_folder, vision_folder) -> Blip2ImageTextProcessor:
    return Blip2ImageTextProcessor.from_unimodal_pretrained(vision_folder, llm_folder, num_query_tokens=QUERIES)


def _conversation(image=None) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [
        {"role": "system", "content": "You describe images."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "what is in"}, image_part, {"type": "text", "text": " the image?"}],
        },
    ]


def _image_block(row: torch.Tensor, image_id: int) -> list[int]:
    return torch.nonzero(row == image_id).flatten().tolist()


def test_chat_template_expands_the_image_where_the_message_put_it(llm_folders, vision_folders) -> None:
    processor = _chat_processor(llm_folders["qwen"], vision_folders["clip"])
    image = _images(1)[0]
    text = processor.apply_chat_template(_conversation(), add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou describe images.<|im_end|>\n"
        "<|im_start|>user\nwhat is in<image> the image?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor.apply_chat_template(
        _conversation(image), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert set(inputs) == {"pixel_values", "input_ids", "attention_mask"}
    assert torch.equal(inputs.pixel_values, processor(images=image).pixel_values)
    ids = inputs.input_ids[0]
    image_id = processor.image_token_id
    before, after = text.split(IMAGE_TOKEN)
    tokenizer = processor.tokenizer
    before_ids = tokenizer(before, add_special_tokens=False).input_ids
    after_ids = tokenizer(after, add_special_tokens=False).input_ids
    # Exactly num_query_tokens image tokens, in one block where the image was, and the template's tokens around them.
    assert _image_block(ids, image_id) == list(range(len(before_ids), len(before_ids) + QUERIES))
    assert ids.tolist() == before_ids + [image_id] * QUERIES + after_ids
    assert bool(inputs.attention_mask.all())
    # The ids, with the block collapsed to its placeholder, are the tokenizer's own chat-template ids.
    collapsed = before_ids + [image_id] + after_ids
    flat = [dict(message) for message in _conversation()]
    flat[1]["content"] = "what is in<image> the image?"
    assert tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=False) == (
        collapsed
    )
    assert torch.equal(
        processor.apply_chat_template(_conversation(image), add_generation_prompt=True, tokenize=True),
        inputs.input_ids,
    )


def test_chat_template_writing_bos_gets_no_second_one(llm_folders, vision_folders) -> None:
    processor = _chat_processor(llm_folders["llama3"], vision_folders["siglip"])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is in the image?"}]}
    ]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>what is")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, images=_images(1)[0]
    )
    ids = inputs.input_ids[0].tolist()
    bos = processor.tokenizer.bos_token_id
    assert ids.count(bos) == 1 and ids[0] == bos
    header = processor.tokenizer("<|start_header_id|>user<|end_header_id|>\n\n", add_special_tokens=False).input_ids
    assert _image_block(inputs.input_ids[0], processor.image_token_id) == list(
        range(1 + len(header), 1 + len(header) + QUERIES)
    )
    generation_header = processor.tokenizer(
        "<|start_header_id|>assistant<|end_header_id|>\n\n", add_special_tokens=False
    ).input_ids
    assert ids[-len(generation_header) :] == generation_header
    # The plain call adds this tokenizer's BOS; the chat path leaves it to the template.
    assert processor(text="a cat").input_ids[0, 0] == bos


def test_chat_batch_is_left_padded_with_one_image_each(llm_folders, vision_folders, tmp_path) -> None:
    processor = _chat_processor(llm_folders["qwen"], vision_folders["dinov2"])
    first, second = _images(2)
    path = tmp_path / "second.png"
    second.save(path)
    conversations = [
        _conversation(first),
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "path": str(path)}]}],
    ]
    inputs = processor.apply_chat_template(conversations, tokenize=True, return_dict=True)
    assert torch.equal(inputs.pixel_values, processor(images=[first, second]).pixel_values)
    assert [len(_image_block(row, processor.image_token_id)) for row in inputs.input_ids] == [QUERIES, QUERIES]
    assert inputs.attention_mask[1, 0] == 0 and inputs.attention_mask[1, -1] == 1  # left padding for generation
    assert processor.apply_chat_template(conversations) == [
        processor.apply_chat_template(conversations[0]),
        processor.apply_chat_template(conversations[1]),
    ]
    # Images may come as images= instead, one per conversation.
    bare = [_conversation(), [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}]}]]
    _assert_same_features(
        processor.apply_chat_template(bare, tokenize=True, return_dict=True, images=[first, second]), inputs
    )


def test_chat_template_round_trips_with_the_processor(llm_folders, vision_folders, tmp_path) -> None:
    processor = _chat_processor(llm_folders["llama3"], vision_folders["convnext"])
    image = _images(1)[0]
    expected = processor.apply_chat_template(
        _conversation(image), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    _assert_same_features(
        reloaded.apply_chat_template(
            _conversation(image), add_generation_prompt=True, tokenize=True, return_dict=True
        ),
        expected,
    )


def test_chat_errors_are_clear(llm_folders, vision_folders) -> None:
    without_template = Blip2ImageTextProcessor.from_unimodal_pretrained(vision_folders["vit"], TINY_RANDOM)
    with pytest.raises(ValueError, match=r"has no chat template and none was given: pass chat_template="):
        without_template.apply_chat_template(_conversation())
    # ... and one given as an argument renders.
    assert "what is in<image> the image?" in without_template.apply_chat_template(_conversation(), QWEN_LIKE)

    processor = _chat_processor(llm_folders["qwen"], vision_folders["vit"])
    two_images = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}]}]
    with pytest.raises(ValueError, match="conversation 0 holds 2 images"):
        processor.apply_chat_template(two_images)
    with pytest.raises(ValueError, match=r"conversation 0, message 0, part 0: expected \{'type': 'text'"):
        processor.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}])
    image = _images(1)[0]
    with pytest.raises(ValueError, match="conversation 1 carries no image while others do"):
        processor.apply_chat_template([_conversation(image), _conversation()], tokenize=True)
    with pytest.raises(ValueError, match="both inside the messages and as images="):
        processor.apply_chat_template(_conversation(image), tokenize=True, images=image)
    with pytest.raises(ValueError, match="non-empty list of messages"):
        processor.apply_chat_template("what is in the image?")
    with pytest.raises(ValueError, match="return_assistant_tokens_mask is not supported"):
        processor.apply_chat_template(_conversation(), tokenize=True, return_assistant_tokens_mask=True)
