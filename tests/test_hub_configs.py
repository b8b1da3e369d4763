"""The configs in `hub_configs/`: they load, match their generator, and build models of the published sizes.

Big models are built on the meta device, so counting their parameters costs neither memory nor time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, BlipImageProcessor, GenerationConfig

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2TextEmbeddings,
    Blip2VisionModel,
)

HUB_CONFIGS = Path(__file__).resolve().parents[1] / "hub_configs"
TINY = HUB_CONFIGS / "tiny-random"

PRETRAIN = ["blip2-pretrain-vit-g", "blip2-pretrain-vit-l"]
ITM = ["blip2-itm-vit-g"]
ZERO_SHOT = ["blip2-opt-2.7b", "blip2-opt-6.7b", "blip2-flan-t5-xl", "blip2-flan-t5-xxl"]
COCO = ["blip2-opt-2.7b-coco", "blip2-opt-6.7b-coco", "blip2-flan-t5-xl-coco"]
GENERATIVE = ZERO_SHOT + COCO
PUBLISHED = PRETRAIN + ITM + GENERATIVE


def load(folder: str) -> Blip2Config:
    return Blip2Config.from_pretrained(HUB_CONFIGS / folder)


def count(*modules: torch.nn.Module) -> int:
    """Distinct parameters of the modules (tied weights count once)."""
    seen = {id(p): p.numel() for module in modules for p in module.parameters()}
    return sum(seen.values())


def load_generator():
    spec = importlib.util.spec_from_file_location("make_hub_configs", HUB_CONFIGS / "make_hub_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- files ------------------------------------------------------------------------------------------------------------
def test_folders_are_complete():
    folders = sorted(path.name for path in HUB_CONFIGS.iterdir() if path.is_dir() and not path.name.startswith("_"))
    assert folders == sorted([*PUBLISHED, "tiny-random"])
    for folder in GENERATIVE + ["tiny-random"]:
        assert (HUB_CONFIGS / folder / "generation_config.json").is_file(), folder
    for folder in PRETRAIN + ITM:
        assert not (HUB_CONFIGS / folder / "generation_config.json").exists(), folder


def _json_without_version(path: Path) -> dict:
    content = json.loads(path.read_text(encoding="utf-8"))
    content.pop("transformers_version", None)
    return content


def test_committed_files_match_the_generator(tmp_path):
    load_generator().main(tmp_path)
    written = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*") if path.is_file())
    committed = sorted(
        path.relative_to(HUB_CONFIGS)
        for path in HUB_CONFIGS.rglob("*")
        if path.is_file() and path.parent != HUB_CONFIGS and "__pycache__" not in path.parts
    )
    assert written == committed, "rerun hub_configs/make_hub_configs.py"
    for relative in written:
        assert _json_without_version(tmp_path / relative) == _json_without_version(HUB_CONFIGS / relative), (
            f"{relative} is stale: rerun hub_configs/make_hub_configs.py"
        )


# -- configs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("folder", PUBLISHED)
def test_published_config_loads(folder):
    config = load(folder)
    raw = json.loads((HUB_CONFIGS / folder / "config.json").read_text(encoding="utf-8"))
    assert raw["model_type"] == config.model_type == "modeling_blip2"
    assert raw["vision_config"]["model_type"] == "modeling_blip2_vision_model"
    assert raw["qformer_config"]["model_type"] == "modeling_blip2_qformer"
    assert config.num_query_tokens == 32
    assert config.image_text_hidden_size == 256
    assert config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size
    assert config.qformer_config.cross_attention_frequency == 2
    assert config.vision_config.resolved_post_layernorm_eps == 1e-5

    with_text = folder in PRETRAIN + ITM
    assert config.qformer_config.use_qformer_text_input is with_text
    assert config.qformer_config.vocab_size == (30523 if with_text else 30522)
    expected_architecture = {
        **dict.fromkeys(PRETRAIN, "Blip2ForPretraining"),
        **dict.fromkeys(ITM, "Blip2ForImageTextRetrieval"),
    }.get(folder, "Blip2ForConditionalGeneration")
    assert config.architectures == [expected_architecture]

    text = config.text_config
    if "flan-t5" in folder:
        assert raw["text_config"]["model_type"] == text.model_type == "t5"
        assert not config.use_decoder_only_language_model
        assert config.image_token_index == 32100
        assert (text.vocab_size, text.bos_token_id, text.eos_token_id, text.pad_token_id) == (32128, 1, 1, 0)
        assert text.decoder_start_token_id == 0
        assert text.is_gated_act and text.dense_act_fn == "gelu"
        # Flan-T5 (T5 v1.1) has an untied head and unscaled decoder outputs.
        assert text.scale_decoder_outputs is False
    else:
        assert raw["text_config"]["model_type"] == text.model_type == "opt"
        assert config.use_decoder_only_language_model
        assert config.image_token_index == 50265
        assert (text.vocab_size, text.bos_token_id, text.eos_token_id, text.pad_token_id) == (50304, 2, 50118, 1)


@pytest.mark.parametrize("folder", GENERATIVE)
def test_generation_config(folder):
    config = load(folder)
    generation = GenerationConfig.from_pretrained(HUB_CONFIGS / folder)
    text = config.text_config
    assert generation.max_new_tokens == 30
    assert generation.eos_token_id == text.eos_token_id
    assert generation.pad_token_id == text.pad_token_id
    if config.use_decoder_only_language_model:
        assert generation.bos_token_id == text.bos_token_id == 2
    else:
        assert generation.decoder_start_token_id == text.decoder_start_token_id == 0
    if folder in COCO:
        assert (generation.num_beams, generation.min_new_tokens) == (5, 8)
    else:
        assert generation.num_beams in (None, 1)
        assert generation.min_new_tokens is None


@pytest.mark.parametrize("folder", COCO)
def test_coco_variants_use_364_pixel_images(folder):
    config = load(folder)
    zero_shot = load(folder.removesuffix("-coco"))
    assert config.vision_config.image_size == 364
    assert zero_shot.vision_config.image_size == 224
    with torch.device("meta"):
        vision = Blip2VisionModel(config.vision_config)
    assert tuple(vision.embeddings.position_embedding.shape) == (1, 1 + 26 * 26, 1408)
    # Apart from the image size, a -coco config is its zero-shot counterpart.
    assert config.text_config.to_dict() == zero_shot.text_config.to_dict()
    assert config.qformer_config.to_dict() == zero_shot.qformer_config.to_dict()


# -- parameter counts (meta device) -----------------------------------------------------------------------------------
def test_eva_vit_g_parameter_count():
    config = load("blip2-opt-2.7b").vision_config
    assert (config.num_hidden_layers, config.hidden_size, config.vision_architecture) == (39, 1408, "eva")
    with torch.device("meta"):
        vision = Blip2VisionModel(config)
    total = count(vision)
    print(f"EVA ViT-g (39 layers): {total:,}")
    assert total == 985_952_256
    assert 0.97e9 < total < 1.0e9  # the paper's ~1B (986M) frozen image encoder


def test_clip_vit_l_parameter_count():
    config = load("blip2-pretrain-vit-l").vision_config
    assert (config.num_hidden_layers, config.hidden_size, config.vision_architecture) == (23, 1024, "clip")
    with torch.device("meta"):
        vision = Blip2VisionModel(config)
    total = count(vision)
    print(f"CLIP ViT-L (23 layers): {total:,}")
    # OpenAI CLIP ViT-L/14's visual tower is 303.97M with 24 layers and its output projection; without the last
    # layer (12.6M) and the projection (0.8M), and with ln_vision, it is 290.6M.
    assert 2.85e8 < total < 2.95e8


def test_pretrain_vit_l_qformer_reads_1024_wide_features():
    config = load("blip2-pretrain-vit-l")
    assert config.qformer_config.encoder_hidden_size == 1024
    with torch.device("meta"):
        qformer = Blip2QFormerModel(config.qformer_config)
    assert qformer.encoder.layer[0].crossattention.attention.key.in_features == 1024


def test_qformer_parameter_count():
    config = load("blip2-opt-2.7b").qformer_config
    assert not config.use_qformer_text_input
    with torch.device("meta"):
        qformer = Blip2QFormerModel(config)
    total = count(qformer)
    print(f"Q-Former without text parts: {total:,}")
    assert 1.0e8 < total < 1.1e8


def test_itm_layout_parameter_count():
    config = load("blip2-itm-vit-g")
    qformer_config: Blip2QFormerConfig = config.qformer_config
    hidden, embed = qformer_config.hidden_size, config.image_text_hidden_size
    with torch.device("meta"):
        parts = [
            Blip2QFormerModel(qformer_config),
            Blip2TextEmbeddings(qformer_config),
            torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))]),
            torch.nn.Linear(hidden, embed),  # vision_projection
            torch.nn.Linear(hidden, embed),  # text_projection
            torch.nn.Linear(hidden, 2),  # itm_head
        ]
    total = count(*parts)
    print(f"ITM layout without the image encoder: {total:,}")
    assert 1.8e8 < total < 1.92e8  # the paper's "188M" Q-Former


@pytest.mark.parametrize(
    ("folder", "llm_band", "total_band"),
    [
        # OPT-2.7b: 2.6516B at 50272 tokens, + 32 x 2560 for the resize to 50304; blip2-opt-2.7b is 3.74B.
        ("blip2-opt-2.7b", (2.64e9, 2.66e9), (3.73e9, 3.76e9)),
        # Flan-T5-XL: 2.85B with its untied LM head; blip2-flan-t5-xl is 3.94B.
        ("blip2-flan-t5-xl", (2.84e9, 2.86e9), (3.93e9, 3.95e9)),
        # OPT-6.7b: 6.66B; blip2-opt-6.7b is 7.75B.
        ("blip2-opt-6.7b", (6.65e9, 6.67e9), (7.74e9, 7.76e9)),
        # Flan-T5-XXL: 11.14B with its untied LM head; blip2-flan-t5-xxl is 12.23B.
        ("blip2-flan-t5-xxl", (11.1e9, 11.2e9), (12.2e9, 12.3e9)),
    ],
)
def test_conditional_generation_parameter_count(folder, llm_band, total_band):
    config = load(folder)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    language_model = model.language_model
    llm = count(language_model)
    # transformers >= 5 ties T5's lm_head to `shared` in a model built from a config; the Flan-T5 checkpoints hold a
    # separate head (untied again when they are loaded), which the published sizes include.
    head = language_model.get_output_embeddings().weight
    untied_head = (
        head.numel() if (not config.use_decoder_only_language_model and head is language_model.shared.weight) else 0
    )
    llm += untied_head
    total = count(model) + untied_head
    print(f"{folder}: total {total:,}, LLM {llm:,} (of which untied T5 head {untied_head:,})")
    assert llm_band[0] < llm < llm_band[1]
    assert total_band[0] < total < total_band[1]
    assert (
        total == llm + count(model.vision_model, model.qformer, model.language_projection) + model.query_tokens.numel()
    )


# -- tiny-random ------------------------------------------------------------------------------------------------------
def _image() -> Image.Image:
    pixels = (torch.arange(40 * 50 * 3) % 256).to(torch.uint8).reshape(40, 50, 3).numpy()
    return Image.fromarray(pixels, mode="RGB")


def test_tiny_random_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    config = Blip2Config.from_pretrained(TINY)
    assert len(tokenizer) == config.text_config.vocab_size
    ids = tokenizer("a photo of a cat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["</s>", "a", "photo", "of", "a", "cat"]
    assert tokenizer.unk_token_id not in ids
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer("<image>", add_special_tokens=False).input_ids == [image_id]
    assert image_id == config.image_token_index
    newline = tokenizer("Question: what is on the left? Answer:\n", add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in newline
    assert newline[-1] == config.text_config.eos_token_id == tokenizer.convert_tokens_to_ids("\n")
    assert config.text_config.bos_token_id == tokenizer.bos_token_id
    assert config.text_config.pad_token_id == tokenizer.pad_token_id


def test_tiny_random_image_processor():
    processor = BlipImageProcessor.from_pretrained(TINY)
    pixel_values = processor(_image(), return_tensors="pt").pixel_values
    assert tuple(pixel_values.shape) == (1, 3, 28, 28)
    assert list(processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert list(processor.image_std) == pytest.approx([0.26862954, 0.26130258, 0.27577711])


def test_tiny_random_processor_and_generate():
    config = Blip2Config.from_pretrained(TINY)
    processor = AutoProcessor.from_pretrained(TINY)
    assert type(processor).__name__ == "Blip2ImageTextProcessor"
    assert processor.num_query_tokens == config.num_query_tokens == 4
    inputs = processor(images=_image(), text="a photo of", return_tensors="pt")
    assert tuple(inputs.pixel_values.shape) == (1, 3, 28, 28)
    assert int((inputs.input_ids == config.image_token_index).sum()) == 4

    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig.from_pretrained(TINY)
    output = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    prompt_length = inputs.input_ids.shape[1]
    assert output.shape == (1, prompt_length + 5)
    assert torch.equal(output[:, :prompt_length], inputs.input_ids)
    assert int(output.max()) < config.text_config.vocab_size
    assert isinstance(processor.tokenizer.decode(output[0, prompt_length:]), str)
