"""The command-line examples run end to end on the tiny-random fixture (random weights)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from tiny import caption_image_folder as _image_folder
from tiny import load_example as _load

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "hub_configs" / "tiny-random")


def _images(tmp_path) -> list[str]:
    paths = [tmp_path / "red.png", tmp_path / "blue.png"]
    Image.new("RGB", (40, 30), (200, 30, 30)).save(paths[0])
    Image.new("RGBA", (30, 40), (30, 30, 200, 255)).save(paths[1])
    return [str(path) for path in paths]


def test_caption_example(tmp_path) -> None:
    red, blue = _images(tmp_path)
    common = ["--model", TINY, "--random_init", "--max_new_tokens", "4", "--min_new_tokens", "4"]
    captions = _load("caption").main([*common, "--prompt", "a photo of", "--images", red, blue, red])
    assert len(captions) == 3 and all(text.startswith("a photo of") for text in captions)
    assert captions[0] == captions[2]  # same image, same greedy caption
    beam = _load("caption").main([*common, "--num_beams", "3", "--images", red])
    assert len(beam) == 1 and isinstance(beam[0], str)


def test_vqa_example(tmp_path) -> None:
    red, blue = _images(tmp_path)
    common = ["--model", TINY, "--random_init", "--max_new_tokens", "3", "--num_beams", "2"]
    answers = _load("vqa").main([*common, "--images", red, blue, "--questions", "what color?", "what shape?"])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    shared = _load("vqa").main([*common, "--images", red, blue, "--questions", "what color?"])
    assert len(shared) == 2


def test_pretrain_stage1_example_on_an_image_folder(tmp_path) -> None:
    from tiny import stage1_config_dict, tiny_qformer_tokenizer

    from modeling_blip2 import Blip2Config, Blip2ForPretraining

    tokenizer = tiny_qformer_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))).save_pretrained(tmp_path / "config")
    data = _image_folder(tmp_path / "images")
    common = [
        "--dataset", str(data), "--config", str(tmp_path / "config"),
        "--qformer_tokenizer", str(tmp_path / "tokenizer"), "--logging_steps", "1",
        "--image_id_column", "image_id", "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--warmup_steps", "0", "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
        "--max_text_length", "8",
    ]  # fmt: skip
    stage1 = _load("pretrain_stage1")
    cached = stage1.main([*common, "--cache_image_features", "--output_dir", str(tmp_path / "cached")])
    assert cached.state.global_step == 2
    assert {"loss_itc", "loss_itm", "loss_itg"} <= set(cached.state.log_history[0])
    reloaded = Blip2ForPretraining.from_pretrained(tmp_path / "cached")
    assert torch.equal(reloaded.temp, cached.model.temp.detach())
    augmented = stage1.main([*common, "--augment", "--output_dir", str(tmp_path / "augmented")])
    assert augmented.state.global_step == 2


def test_stage2_and_caption_finetuning_examples(tmp_path) -> None:
    from tiny import TINY_RANDOM, stage1_config_dict, tiny_qformer_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration, Blip2ForPretraining

    qformer_tokenizer = tiny_qformer_tokenizer()
    Blip2ForPretraining(
        Blip2Config(**stage1_config_dict(qformer_tokenizer.convert_tokens_to_ids("[DEC]")))
    ).save_pretrained(tmp_path / "stage1")
    llm_config = Blip2Config.from_pretrained(TINY_RANDOM).text_config
    AutoModelForCausalLM.from_config(llm_config).save_pretrained(tmp_path / "llm")
    AutoTokenizer.from_pretrained(TINY_RANDOM).save_pretrained(tmp_path / "llm")
    data = _image_folder(tmp_path / "images")
    common = [
        "--dataset", str(data), "--max_steps", "2", "--per_device_train_batch_size", "2", "--warmup_steps", "0",
        "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "1",
    ]  # fmt: skip
    stage2 = _load("pretrain_stage2").main(
        [*common, "--stage1", str(tmp_path / "stage1"), "--language_model", str(tmp_path / "llm"),
         "--llm_dtype", "bfloat16", "--output_dir", str(tmp_path / "stage2")]
    )  # fmt: skip
    assert stage2.state.global_step == 2 and stage2.state.log_history[0]["loss"] > 0
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    assert model.qformer.layernorm.weight.dtype == torch.float32
    trainer, scores = _load("finetune_caption").main(
        [*common, "--model_name_or_path", str(tmp_path / "stage2"), "--image_size", "42", "--train_vision_encoder",
         "--eval_dataset", str(data), "--num_beams", "2", "--max_new_tokens", "4", "--min_new_tokens", "2",
         "--output_dir", str(tmp_path / "caption")]
    )  # fmt: skip
    assert trainer.model.config.vision_config.image_size == 42
    assert set(scores) >= {"bleu4", "cider"} and 0 <= scores["bleu4"] <= 100
    assert (tmp_path / "caption" / "caption_scores.json").is_file()


def test_benchmarks_run_in_quick_mode(tmp_path) -> None:
    """Smoke runs only (no timing asserted): the scripts still work and their equivalence checks pass."""
    assert (
        _load("benchmark_training").main(["--quick", "--skip-memory", "--output-json", str(tmp_path / "t.json")]) == 0
    )
    assert (tmp_path / "t.json").is_file()
