"""Issue 12, examples: `pretrain_stage1.py --vision_model` and `pretrain_stage2.py --vision_model / --language_model`
on tiny SigLIP / DINOv2 encoders, Llama / Qwen2 LLMs and a BERT saved as their own checkpoints; what they save loads
back and (stage 2) captions through the pipeline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from PIL import Image
from tiny import caption_image_folder, load_example, save_unimodal_parts
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, SiglipVisionConfig, pipeline

from modeling_blip2 import Blip2ForConditionalGeneration, Blip2ForPretraining
from modeling_blip2.processing import QFORMER_START_TOKEN

BRIDGE = ("query_tokens", "qformer.", "language_projection.", "vision_model.post_layernorm.")

TRAINING = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--warmup_steps", "0", "--logging_steps", "1",
    "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
]  # fmt: skip


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("unimodal-examples")
    folders, models = save_unimodal_parts(root, vision=("siglip", "dinov2"), language=("llama", "qwen2"))
    folders["images"] = caption_image_folder(root / "images")
    return {"folders": folders, "models": models, "root": root}


@pytest.fixture(scope="module")
def stage1_output(parts) -> dict:
    """Stage 1 on SigLIP's second-last hidden state with a BERT-initialised Q-Former, from cached features."""
    folders, output = parts["folders"], parts["root"] / "stage1"
    trainer = load_example("pretrain_stage1").main(
        ["--dataset", str(folders["images"]), "--vision_model", str(folders["siglip"]),
         "--qformer_init_from", str(folders["bert"]), "--vision_feature_layer", "-2", "--num_query_tokens", "4",
         "--image_id_column", "image_id", "--max_text_length", "8", "--cache_image_features",
         "--output_dir", str(output), *TRAINING]
    )  # fmt: skip
    return {"trainer": trainer, "output": output}


def _caption_image() -> Image.Image:
    return Image.new("RGB", (36, 30), (220, 30, 30))


def _assert_captions_like_the_model(folder, max_new_tokens: int = 3) -> None:
    """The saved folder captions through the pipeline, as the reloaded model does on the saved processor's inputs."""
    captioner = pipeline("image-to-text", model=str(folder), trust_remote_code=True)
    caption = captioner(_caption_image(), max_new_tokens=max_new_tokens)[0]["generated_text"]
    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(images=_caption_image(), return_tensors="pt")
    expected = processor.decode_generated(model.generate(**inputs, max_new_tokens=max_new_tokens))[0]
    assert isinstance(caption, str) and caption.strip() == expected


def test_stage1_composes_trains_and_saves_what_loads_back(parts, stage1_output) -> None:
    trainer, output = stage1_output["trainer"], stage1_output["output"]
    assert trainer.state.global_step == 2
    assert {"loss_itc", "loss_itm", "loss_itg"} <= set(trainer.state.log_history[0])
    reloaded = Blip2ForPretraining.from_pretrained(output)
    assert isinstance(reloaded.config.vision_config, SiglipVisionConfig)
    assert reloaded.config.vision_feature_layer == -2 and reloaded.config.num_query_tokens == 4
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name
    # The frozen encoder is the saved SigLIP, untouched by training.
    backbone = reloaded.vision_model.backbone.state_dict()
    for name, value in parts["models"]["siglip"].state_dict().items():
        assert torch.equal(backbone[name], value), name
    assert type(AutoImageProcessor.from_pretrained(output)).__name__.startswith("SiglipImageProcessor")
    assert AutoTokenizer.from_pretrained(output).bos_token == QFORMER_START_TOKEN


def test_stage1_on_dinov2_without_the_class_token_with_augmentation(parts, tmp_path) -> None:
    folders = parts["folders"]
    trainer = load_example("pretrain_stage1").main(
        ["--dataset", str(folders["images"]), "--vision_model", str(folders["dinov2"]),
         "--qformer_init_from", str(folders["bert"]), "--vision_feature_select_strategy", "default",
         "--num_query_tokens", "4", "--max_text_length", "8", "--augment", "--output_dir", str(tmp_path), *TRAINING]
    )  # fmt: skip
    assert trainer.state.global_step == 2
    reloaded = Blip2ForPretraining.from_pretrained(tmp_path)
    assert reloaded.config.vision_feature_select_strategy == "default"
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__.startswith("BitImageProcessor")


def test_stage2_from_the_composed_stage1_with_another_llm(parts, stage1_output, tmp_path) -> None:
    folders, stage1 = parts["folders"], stage1_output["output"]
    trainer = load_example("pretrain_stage2").main(
        ["--dataset", str(folders["images"]), "--stage1", str(stage1), "--language_model", str(folders["llama"]),
         "--output_dir", str(tmp_path), *TRAINING]
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.state.log_history[0]["loss"] > 0
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    # Stage 1's encoder, feature layer and Q-Former carried over; the LLM is the Llama folder's.
    assert isinstance(model.config.vision_config, SiglipVisionConfig) and model.config.vision_feature_layer == -2
    carried = Blip2ForPretraining.from_pretrained(stage1)  # the frozen tower came over unchanged (the rest trained)
    for name, value in carried.vision_model.backbone.state_dict().items():
        assert torch.equal(model.vision_model.backbone.state_dict()[name], value), name
    for name, value in parts["models"]["llama"].state_dict().items():
        if name != "model.embed_tokens.weight" and name != "lm_head.weight":  # grown for <image>
            assert torch.equal(model.language_model.state_dict()[name], value), name
    _assert_captions_like_the_model(tmp_path)


def test_stage2_composed_without_stage1_captions_through_the_pipeline(parts, tmp_path) -> None:
    folders = parts["folders"]
    trainer = load_example("pretrain_stage2").main(
        ["--dataset", str(folders["images"]), "--vision_model", str(folders["siglip"]),
         "--language_model", str(folders["qwen2"]), "--qformer_init_from", str(folders["bert"]),
         "--num_query_tokens", "4", "--vision_feature_layer", "-2", "--cache_image_features",
         "--image_id_column", "image_id", "--llm_dtype", "bfloat16", "--output_dir", str(tmp_path), *TRAINING]
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.state.log_history[0]["loss"] > 0
    assert type(trainer.train_dataset).__name__ == "FrozenFeatureDataset"
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.num_query_tokens == 4 and model.config.vision_feature_layer == -2
    trained = [(name, value) for name, value in trainer.model.named_parameters() if value.requires_grad]
    assert trained and all(name.startswith(BRIDGE) for name, _ in trained)
    for name, value in trained:
        assert torch.equal(model.get_parameter(name), value.detach()), name
    assert model.qformer.layernorm.weight.dtype == torch.float32
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["num_query_tokens"] == 4
    assert type(AutoImageProcessor.from_pretrained(tmp_path)).__name__.startswith("SiglipImageProcessor")
    _assert_captions_like_the_model(tmp_path)


def test_stage2_composed_with_augmentation(parts, tmp_path) -> None:
    folders = parts["folders"]
    trainer = load_example("pretrain_stage2").main(
        ["--dataset", str(folders["images"]), "--vision_model", str(folders["dinov2"]),
         "--language_model", str(folders["llama"]), "--qformer_init_from", str(folders["bert"]),
         "--num_query_tokens", "4", "--augment", "--output_dir", str(tmp_path), *TRAINING]
    )  # fmt: skip
    assert trainer.state.global_step == 2 and trainer.data_collator.augmentation is not None
    assert trainer.data_collator.augmentation.size == 28  # the DINOv2 image processor's crop
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path)
    assert model.config.vision_config.model_type == "dinov2"


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        (
            "pretrain_stage1",
            ["--vision_model", "{siglip}", "--config", "{siglip}"],
            "cannot be combined with --config",
        ),
        (
            "pretrain_stage1",
            ["--vision_model", "{siglip}", "--model_name_or_path", "{siglip}"],
            "cannot be combined with --model_name_or_path",
        ),
        ("pretrain_stage1", ["--config", "{siglip}", "--num_query_tokens", "4"], "--num_query_tokens only apply"),
        ("pretrain_stage1", ["--vision_model", "{siglip}"], "pass --qformer_init_from"),
        ("pretrain_stage1", ["--vision_model", "{bare}", "--qformer_init_from", "{bert}"], "preprocessor_config"),
        ("pretrain_stage2", ["--vision_model", "{bare}", "--language_model", "{llama}"], "preprocessor_config"),
        ("pretrain_stage2", ["--language_model", "{llama}"], "pass --stage1"),
        (
            "pretrain_stage2",
            ["--language_model", "{llama}", "--vision_model", "{siglip}", "--stage1", "{siglip}"],
            "cannot be combined with --stage1",
        ),
        (
            "pretrain_stage2",
            ["--language_model", "{llama}", "--stage1", "{siglip}", "--vision_feature_layer", "-2"],
            "--vision_feature_layer only apply",
        ),
    ],
)
def test_conflicting_or_missing_model_sources_are_named(parts, tmp_path, script, flags, message) -> None:
    folders = {name: str(path) for name, path in parts["folders"].items()}
    folders["bare"] = str(tmp_path / "bare")  # a vision checkpoint saved without its image processor
    shutil.copytree(folders["siglip"], folders["bare"], ignore=shutil.ignore_patterns("preprocessor_config.json"))
    argv = ["--dataset", folders["images"], *[flag.format(**folders) for flag in flags]]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_example(script).main([*argv, "--output_dir", str(tmp_path / "output"), *TRAINING])
