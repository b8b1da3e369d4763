"""Writes the `config.json` (and `generation_config.json`) of every published BLIP-2 variant in this package's format.

Every config is built with `Blip2Config` and written with `to_json_file`, so each folder loads with
`Blip2Config.from_pretrained(folder)`. `tiny-random` also gets offline processor files (a tiny word-level tokenizer and
a `BlipImageProcessor` config). Run from anywhere:

    python hub_configs/make_hub_configs.py [output_dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import GenerationConfig, OPTConfig, PreTrainedTokenizerFast, T5Config

from modeling_blip2 import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig

HERE = Path(__file__).resolve().parent

NUM_QUERY_TOKENS = 32
IMAGE_TEXT_HIDDEN_SIZE = 256
# BERT vocabulary plus the `[DEC]` token of the Q-Former's image-grounded generation objective.
QFORMER_VOCAB_WITH_DEC = 30523
OPT_IMAGE_TOKEN_INDEX = 50265
T5_IMAGE_TOKEN_INDEX = 32100
MAX_NEW_TOKENS = 30
# Paper section 5, captioning recipe (fine-tuned COCO models): beam search of width 5, 8 to 30 new tokens.
CAPTION_NUM_BEAMS = 5
CAPTION_MIN_NEW_TOKENS = 8

# OpenAI CLIP normalisation, used by every official BLIP-2 preprocessor.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# -- image encoders ---------------------------------------------------------------------------------------------------
def eva_vit_g(image_size: int = 224) -> Blip2VisionConfig:
    """EVA ViT-g/14 without its last layer (39 of 40); `ln_vision` eps 1e-5 as in LAVIS."""
    return Blip2VisionConfig(
        vision_architecture="eva",
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=39,
        num_attention_heads=16,
        patch_size=14,
        image_size=image_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        post_layernorm_eps=1e-5,
        qkv_bias=True,
    )


def clip_vit_l() -> Blip2VisionConfig:
    """OpenAI CLIP ViT-L/14 without its last layer (23 of 24)."""
    return Blip2VisionConfig(
        vision_architecture="clip",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        patch_size=14,
        image_size=224,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        post_layernorm_eps=1e-5,
        qkv_bias=True,
    )


def qformer(encoder_hidden_size: int, with_text: bool) -> Blip2QFormerConfig:
    """BERT-base Q-Former; `with_text` adds the text feed-forward path and the `[DEC]` token (stage 1, ITM)."""
    return Blip2QFormerConfig(
        vocab_size=QFORMER_VOCAB_WITH_DEC if with_text else 30522,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        cross_attention_frequency=2,
        encoder_hidden_size=encoder_hidden_size,
        use_qformer_text_input=with_text,
        bos_token_id=QFORMER_VOCAB_WITH_DEC - 1 if with_text else None,  # [DEC], the last id
    )


# -- language models --------------------------------------------------------------------------------------------------
def opt(hidden_size: int, ffn_dim: int) -> OPTConfig:
    """OPT with the vocabulary resized to 50304 and `eos` = "\\n" (50118), as in the official checkpoints."""
    return OPTConfig(
        vocab_size=50304,
        hidden_size=hidden_size,
        ffn_dim=ffn_dim,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden_size,
        do_layer_norm_before=True,
        bos_token_id=2,
        eos_token_id=50118,
        pad_token_id=1,
    )


def flan_t5(d_model: int, d_ff: int, num_heads: int) -> T5Config:
    """Flan-T5 (T5 v1.1 layout: gated GELU, untied LM head, no decoder output scaling)."""
    config = T5Config(
        vocab_size=32128,
        d_model=d_model,
        d_kv=64,
        d_ff=d_ff,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        # transformers >= 5 stores this as `scale_decoder_outputs=False` and writes `tie_word_embeddings: true`.
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        decoder_start_token_id=0,
    )
    # "gated-gelu" implies gelu_new; the official conversion sets exact GELU (REFERENCE section 2).
    config.dense_act_fn = "gelu"
    return config


def opt_2_7b() -> OPTConfig:
    return opt(hidden_size=2560, ffn_dim=10240)


def opt_6_7b() -> OPTConfig:
    return opt(hidden_size=4096, ffn_dim=16384)


def flan_t5_xl() -> T5Config:
    return flan_t5(d_model=2048, d_ff=5120, num_heads=32)


def flan_t5_xxl() -> T5Config:
    return flan_t5(d_model=4096, d_ff=10240, num_heads=64)


# -- composite configs ------------------------------------------------------------------------------------------------
def blip2(
    vision: Blip2VisionConfig,
    text: OPTConfig | T5Config,
    architecture: str,
    with_qformer_text: bool = False,
    image_token_index: int | None = None,
) -> Blip2Config:
    if image_token_index is None:
        image_token_index = T5_IMAGE_TOKEN_INDEX if text.is_encoder_decoder else OPT_IMAGE_TOKEN_INDEX
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer(vision.hidden_size, with_qformer_text),
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_text_hidden_size=IMAGE_TEXT_HIDDEN_SIZE,
        image_token_index=image_token_index,
        architectures=[architecture],
    )


def generation_config(text: OPTConfig | T5Config, captioning: bool) -> GenerationConfig:
    """Token ids from the LLM config; the `-coco` captioning models add the paper's beam search settings."""
    kwargs: dict[str, Any] = {"max_new_tokens": MAX_NEW_TOKENS}
    if captioning:
        kwargs.update(num_beams=CAPTION_NUM_BEAMS, min_new_tokens=CAPTION_MIN_NEW_TOKENS)
    if text.is_encoder_decoder:
        kwargs.update(
            decoder_start_token_id=text.decoder_start_token_id,
            eos_token_id=text.eos_token_id,
            pad_token_id=text.pad_token_id,
        )
    else:
        kwargs.update(bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id)
    return GenerationConfig(**kwargs)


GENERATE = "Blip2ForConditionalGeneration"


def published_variants() -> dict[str, tuple[Blip2Config, GenerationConfig | None]]:
    """Folder name -> (config, generation config or None)."""
    variants: dict[str, tuple[Blip2Config, GenerationConfig | None]] = {
        # Stage 1 has no LLM; the text_config is OPT-2.7b's as a placeholder (see README.md).
        "blip2-pretrain-vit-g": (blip2(eva_vit_g(), opt_2_7b(), "Blip2ForPretraining", with_qformer_text=True), None),
        "blip2-pretrain-vit-l": (blip2(clip_vit_l(), opt_2_7b(), "Blip2ForPretraining", with_qformer_text=True), None),
        "blip2-itm-vit-g": (
            blip2(eva_vit_g(), opt_2_7b(), "Blip2ForImageTextRetrieval", with_qformer_text=True),
            None,
        ),
    }
    language_models = {
        "opt-2.7b": opt_2_7b,
        "opt-6.7b": opt_6_7b,
        "flan-t5-xl": flan_t5_xl,
        "flan-t5-xxl": flan_t5_xxl,
    }
    for name, make_text in language_models.items():
        config = blip2(eva_vit_g(), make_text(), GENERATE)
        variants[f"blip2-{name}"] = (config, generation_config(config.text_config, captioning=False))
    for name in ("opt-2.7b", "opt-6.7b", "flan-t5-xl"):
        config = blip2(eva_vit_g(image_size=364), language_models[name](), GENERATE)
        variants[f"blip2-{name}-coco"] = (config, generation_config(config.text_config, captioning=True))
    return variants


# -- tiny-random ------------------------------------------------------------------------------------------------------
TINY_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
TINY_IMAGE_TOKEN = "<image>"
TINY_NEWLINE = "\n"
TINY_WORDS = [
    "a",
    "an",
    "the",
    "this",
    "that",
    "is",
    "are",
    "of",
    "on",
    "in",
    "at",
    "with",
    "and",
    "to",
    "for",
    "from",
    "by",
    "near",
    "next",
    "above",
    "below",
    "under",
    "behind",
    "front",
    "photo",
    "picture",
    "image",
    "cat",
    "dog",
    "man",
    "woman",
    "person",
    "people",
    "child",
    "car",
    "bus",
    "train",
    "bike",
    "boat",
    "tree",
    "grass",
    "table",
    "plate",
    "food",
    "pizza",
    "street",
    "sky",
    "water",
    "field",
    "room",
    "bed",
    "chair",
    "ball",
    "red",
    "blue",
    "green",
    "white",
    "black",
    "brown",
    "small",
    "large",
    "two",
    "sitting",
    "standing",
    "holding",
    "riding",
    "looking",
    "left",
    "right",
    "what",
    "color",
    "how",
    "many",
    "where",
    "who",
    "which",
    "does",
    "yes",
    "no",
    "question",
    "answer",
    "short",
]
TINY_PUNCTUATION = [":", "?", ".", ","]
TINY_MODEL_MAX_LENGTH = 128


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small caption/VQA vocabulary; like OPT's it puts `</s>` first as BOS."""
    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS + TINY_WORDS + TINY_PUNCTUATION)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Added tokens are matched before normalisation and pre-tokenisation, so "<image>" and "\n" survive both.
    tokenizer.add_special_tokens([TINY_IMAGE_TOKEN])
    tokenizer.add_tokens([TINY_NEWLINE])
    bos_id = vocab["</s>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="</s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=TINY_MODEL_MAX_LENGTH,
        padding_side="right",
    )


def tiny_image_processor_dict(image_size: int) -> dict[str, Any]:
    """`preprocessor_config.json` for transformers' `BlipImageProcessor` (as in the official repos, but tiny)."""
    return {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "Blip2ImageTextProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
    }


def tiny_random(tokenizer: PreTrainedTokenizerFast) -> tuple[Blip2Config, GenerationConfig]:
    vision = Blip2VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        post_layernorm_eps=1e-5,
        initializer_range=0.02,
    )
    qformer_config = Blip2QFormerConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        use_qformer_text_input=True,
        bos_token_id=127,  # the last id stands for [DEC]
    )
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MODEL_MAX_LENGTH,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
        bos_token_id=tokenizer.bos_token_id,
        # Like the official OPT checkpoints, generation stops at "\n".
        eos_token_id=tokenizer.convert_tokens_to_ids(TINY_NEWLINE),
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer_config,
        text_config=text,
        num_query_tokens=4,
        image_text_hidden_size=16,
        image_token_index=tokenizer.convert_tokens_to_ids(TINY_IMAGE_TOKEN),
        architectures=[GENERATE],
    )
    return config, generation_config(text, captioning=False)


def write_tiny_random(folder: Path) -> None:
    tokenizer = tiny_tokenizer()
    config, generation = tiny_random(tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    special_tokens_map = folder / "special_tokens_map.json"
    if not special_tokens_map.exists():  # transformers >= 5 no longer writes it; older readers still look for it
        _write_json(special_tokens_map, {key: str(value) for key, value in tokenizer.special_tokens_map.items()})
    _write_json(folder / "preprocessor_config.json", tiny_image_processor_dict(config.vision_config.image_size))
    _write_json(
        folder / "processor_config.json",
        {
            "processor_class": "Blip2ImageTextProcessor",
            "num_query_tokens": config.num_query_tokens,
            "image_token": TINY_IMAGE_TOKEN,
        },
    )


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(output_dir: Path = HERE) -> None:
    for name, (config, generation) in published_variants().items():
        folder = output_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        config.to_json_file(folder / "config.json")
        if generation is not None:
            generation.save_pretrained(folder)
        print(f"wrote {folder}")
    write_tiny_random(output_dir / "tiny-random")
    print(f"wrote {output_dir / 'tiny-random'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
