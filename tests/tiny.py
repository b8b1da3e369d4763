"""Tiny BLIP-2 configurations for the tests, as plain dicts that both our and the stock config classes accept."""

from __future__ import annotations

import copy

import torch

NUM_QUERY_TOKENS = 4
IMAGE_TOKEN = 110
VOCAB = 120
IMAGE_SIZE = 28

VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 7,
    "initializer_range": 0.02,
}
QFORMER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}
TEXT = {
    "opt": {
        "model_type": "opt",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 64,
        "word_embed_proj_dim": 32,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 1,
    },
    "llama": {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "t5": {
        "model_type": "t5",
        "vocab_size": VOCAB,
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_decoder_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 1,
        "pad_token_id": 0,
        "decoder_start_token_id": 0,
    },
}
FAMILIES = tuple(TEXT)


def config_dict(family: str = "opt", **overrides: object) -> dict:
    """A composite config dict (no model_type), loadable by our `Blip2Config` and the stock one."""
    config = {
        "vision_config": copy.deepcopy(VISION),
        "qformer_config": copy.deepcopy(QFORMER),
        "text_config": copy.deepcopy(TEXT[family]),
        "num_query_tokens": NUM_QUERY_TOKENS,
        "image_token_index": IMAGE_TOKEN,
    }
    config.update(overrides)
    return config


def randomise_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Gives every parameter a non-trivial random value (stock init leaves some at ~0), keeping ties intact."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        # The EVA encoder has no key bias: official checkpoints hold zeros in that third of the fused qkv bias.
        for name, parameter in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                parameter[parameter.shape[0] // 3 : 2 * parameter.shape[0] // 3] = 0
    return model


def pixels(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompt_with_image_tokens(texts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `[<image> x Q] + text`, left-padded (the processor's layout)."""
    rows = [[IMAGE_TOKEN] * NUM_QUERY_TOKENS + text for text in texts]
    return left_pad(rows, pad_id)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


def labelled_batch(family: str) -> dict[str, torch.Tensor]:
    """Two images with left-padded prompts and LM labels (decoder targets for T5): one training batch."""
    ids, mask = prompt_with_image_tokens([[5, 6, 7], [8, 9, 10, 11]], TEXT[family]["pad_token_id"])
    batch = {"pixel_values": pixels(), "input_ids": ids, "attention_mask": mask}
    if family == "t5":
        batch["labels"] = torch.tensor([[12, 13, 14], [15, 16, 17]])
    else:
        batch["labels"] = ids.masked_fill(mask == 0, -100)
    return batch


TINY_RANDOM = __import__("pathlib").Path(__file__).resolve().parents[1] / "hub_configs" / "tiny-random"


def tiny_checkpoint_parts(seed: int = 0):
    """A randomised tiny-random model (OPT LLM) and its processor, built from `hub_configs/tiny-random`."""
    from transformers import AutoTokenizer

    from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ImageTextProcessor
    from modeling_blip2.processing import blip2_image_processor

    config = Blip2Config.from_pretrained(TINY_RANDOM)
    model = randomise_(Blip2ForConditionalGeneration(config), std=0.2, seed=seed).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_RANDOM)
    processor = Blip2ImageTextProcessor(
        blip2_image_processor(config.vision_config.image_size), tokenizer, num_query_tokens=config.num_query_tokens
    )
    return model, processor


QFORMER_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "a",
    "photo",
    "of",
    "the",
    "red",
    "green",
    "blue",
    "yellow",
    "square",
    "on",
    "left",
    "right",
    "cat",
    "dog",
    "what",
    "is",
    "this",
    "?",
    ".",
]


def tiny_qformer_tokenizer(folder=None):
    """A BERT WordPiece tokenizer over a few words, with `[DEC]` added (its id fits the tiny Q-Former vocab)."""
    from transformers import BertTokenizerFast

    from modeling_blip2.processing import with_qformer_start_token

    return with_qformer_start_token(BertTokenizerFast(vocab={word: i for i, word in enumerate(QFORMER_WORDS)}))


def stage1_config_dict(dec_id: int = len(QFORMER_WORDS)) -> dict:
    """A tiny stage-1 config: Q-Former with text input, `[DEC]` id set, no `<image>` token."""
    config = config_dict()
    config["qformer_config"].update({"use_qformer_text_input": True, "bos_token_id": dec_id})
    config["image_text_hidden_size"] = 16
    config["image_token_index"] = None
    return config


def tiny_t5_like_tokenizer():
    """A word-level tokenizer that behaves like T5's: pad 0, `</s>` 1 appended to every text, `<image>` added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [
        "<pad>",
        "</s>",
        "<unk>",
        "a",
        "photo",
        "of",
        "the",
        "red",
        "green",
        "blue",
        "square",
        "on",
        "left",
        "right",
        "question",
        "answer",
        "short",
        ":",
        "what",
        "is",
        "it",
        "?",
        "cat",
        "dog",
        "<image>",
    ]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


# The LLM families added for issue 12, kept apart from TEXT so that tests parametrized over FAMILIES stay as they are.
# Gemma's default head_dim (256) and Phi-3's default pad id (32000) do not fit a tiny model: both are set here.
# Mistral gets a sliding window shorter than the test prompts so that the windowed attention path runs.
MORE_TEXT = {
    "qwen2": {
        "model_type": "qwen2",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "gemma": {
        "model_type": "gemma",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 64,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
    "phi3": {
        "model_type": "phi3",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "original_max_position_embeddings": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
    "mistral": {
        "model_type": "mistral",
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
        "sliding_window": 8,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    },
}
MORE_FAMILIES = tuple(MORE_TEXT)


# -- unimodal parts (issue 12): tiny vision models, LLMs and a BERT saved as their own checkpoints ------------------
UNIMODAL_VIT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": IMAGE_SIZE,
    "patch_size": 7,
}
UNIMODAL_VISION_FAMILIES = ("siglip", "clip", "dinov2", "convnext")
UNIMODAL_LLM_FAMILIES = ("qwen2", "llama", "t5")
UNIMODAL_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}


def tiny_vision_model(family: str) -> torch.nn.Module:
    """A tiny vision checkpoint of `family`; CLIP as the whole dual encoder, the way CLIP checkpoints are published."""
    import transformers

    if family == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**UNIMODAL_VIT))
    if family == "clip":
        text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
        config = transformers.CLIPConfig(
            vision_config=UNIMODAL_VIT, text_config={**text, "vocab_size": 60}, projection_dim=16
        )
        return transformers.CLIPModel(config)
    if family == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**UNIMODAL_VIT))
    if family == "convnext":
        config = transformers.ConvNextConfig(hidden_sizes=[16, 24], depths=[1, 1], num_stages=2, image_size=IMAGE_SIZE)
        return transformers.ConvNextModel(config)
    raise ValueError(f"no tiny vision model for {family!r}; one of {UNIMODAL_VISION_FAMILIES}")


def tiny_vision_image_processor(family: str):
    """The image processor a `tiny_vision_model(family)` checkpoint ships with, in its PIL implementation (what
    transformers loads without torchvision), giving `IMAGE_SIZE` images with the family's own statistics."""
    import transformers

    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if family == "siglip":
        return transformers.SiglipImageProcessorPil(size=side)
    if family == "clip":
        return transformers.CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE + 4}, crop_size=side)
    if family == "dinov2":
        return transformers.BitImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE + 4},
            crop_size=side,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        )
    if family == "convnext":
        return transformers.ConvNextImageProcessorPil(size={"shortest_edge": IMAGE_SIZE})
    raise ValueError(f"no tiny image processor for {family!r}; one of {UNIMODAL_VISION_FAMILIES}")


def tiny_language_model(family: str) -> tuple[torch.nn.Module, object]:
    """A tiny LLM of `family` and its tokenizer (tiny-random's BPE; T5's a word-level one holding `<image>`)."""
    import transformers

    text = {key: value for key, value in TEXT["t5" if family == "t5" else "llama"].items() if key != "model_type"}
    if family == "t5":
        tokenizer = tiny_t5_like_tokenizer()
        config = transformers.T5Config(**{**text, "vocab_size": len(tokenizer)})
        return transformers.T5ForConditionalGeneration(config), tokenizer
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_RANDOM)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**text)), tokenizer
    if family == "qwen2":  # exactly as many embeddings as tokens: adding <image> must grow them
        config = transformers.Qwen2Config(**{**text, "vocab_size": len(tokenizer)})
        return transformers.Qwen2ForCausalLM(config), tokenizer
    raise ValueError(f"no tiny language model for {family!r}; one of {UNIMODAL_LLM_FAMILIES}")


def save_unimodal_parts(
    root, vision: tuple[str, ...] = (), language: tuple[str, ...] = (), bert: bool = True
) -> tuple[dict, dict]:
    """Saves randomised tiny unimodal checkpoints under `root`, one folder per family (vision folders hold their
    image processor, LLM folders their tokenizer) and `bert` (a BERT with the tiny Q-Former tokenizer).

    Returns the folders and the saved models as they were in memory, both keyed by family (and "bert")."""
    from pathlib import Path

    import transformers

    root = Path(root)
    folders, models = {}, {}
    for family in vision:
        seed = UNIMODAL_VISION_FAMILIES.index(family)
        model = randomise_(tiny_vision_model(family), std=0.1, seed=seed)
        model.save_pretrained(root / family)
        tiny_vision_image_processor(family).save_pretrained(root / family)
        folders[family], models[family] = root / family, model
    for family in language:
        model, tokenizer = tiny_language_model(family)
        randomise_(model, std=0.1, seed=10 + UNIMODAL_LLM_FAMILIES.index(family)).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        folders[family], models[family] = root / family, model
    if bert:
        config = transformers.BertConfig(vocab_size=len(QFORMER_WORDS), max_position_embeddings=64, **UNIMODAL_BERT)
        model = randomise_(transformers.BertModel(config), std=0.1, seed=20)
        model.save_pretrained(root / "bert")
        tiny_qformer_tokenizer().save_pretrained(root / "bert")
        folders["bert"], models["bert"] = root / "bert", model
    return folders, models


# -- the command-line examples ---------------------------------------------------------------------------------------
def load_example(name: str):
    """The module of `examples/<name>.py` (its `main(argv)` runs it as the command line would)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def caption_image_folder(folder):
    """An image folder of four coloured squares with a `metadata.jsonl` (file name, caption, integer image id)."""
    import json

    from PIL import Image

    folder.mkdir()
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, (name, rgb) in enumerate(colors.items()):
            Image.new("RGB", (36, 30), rgb).save(folder / f"{name}.png")
            metadata.write(json.dumps({"file_name": f"{name}.png", "text": f"a {name} square", "image_id": index}))
            metadata.write("\n")
    return folder
