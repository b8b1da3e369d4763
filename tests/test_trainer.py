"""Blip2Trainer: loss composition, parameter groups and LR decay, frozen parts, accumulation, cache, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import stage1_config_dict, tiny_qformer_tokenizer
from torch.utils.data import SequentialSampler
from transformers import BertTokenizerFast, TrainerCallback

from modeling_blip2 import (
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    FrozenFeatureDataset,
    RandomResizedCropFlip,
    blip2_image_processor,
)
from modeling_blip2.trainer import parameter_groups

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


class _SequentialTrainer(Blip2Trainer):
    def _get_train_sampler(self, *args, **kwargs) -> SequentialSampler:
        return SequentialSampler(self.train_dataset)


class _StopAfter(TrainerCallback):
    """Interrupts a run after `steps` optimizer steps (as a crash would, after its checkpoint)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control


def _dataset(repeats: int = 4) -> list[dict]:
    examples = []
    for index, (name, rgb) in enumerate(COLORS.items()):
        image = Image.new("RGB", (40, 40), rgb)
        for _ in range(repeats):
            examples.append({"image": image, "text": f"a {name} square", "image_id": index})
    return examples


@pytest.fixture()
def parts(tmp_path):
    tokenizer = tiny_qformer_tokenizer(tmp_path)
    config = Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]")))
    torch.manual_seed(0)
    model = Blip2ForPretraining(config)
    collator = Blip2ImageTextCollator(blip2_image_processor(28), tokenizer, max_length=8)
    return model, collator, tokenizer


def _args(tmp_path, **overrides) -> Blip2TrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-4,
        "warmup_steps": 0,
        "max_steps": 4,
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "dataloader_num_workers": 0,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return Blip2TrainingArguments(**settings)


def test_paper_defaults() -> None:
    args = Blip2TrainingArguments(output_dir="unused", report_to=[])
    assert (args.adam_beta1, args.adam_beta2, args.weight_decay, args.learning_rate) == (0.9, 0.98, 0.05, 1e-4)
    assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr": 1e-5}
    assert args.warmup_steps == 2000 and not args.remove_unused_columns
    with pytest.raises(ValueError, match="not all zero"):
        Blip2TrainingArguments(output_dir="unused", itc_weight=0, itm_weight=0, itg_weight=0)


def test_collator_tokenizes_truncates_and_checks(parts, tmp_path) -> None:
    _, collator, tokenizer = parts
    long_caption = "a red square on the left of the blue square on the right of the cat"
    batch = collator([{"image": Image.new("L", (9, 7)), "text": long_caption, "image_id": 3}] * 2)
    assert batch["input_ids"].shape == (2, 8) and batch["pixel_values"].shape == (2, 3, 28, 28)
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id and batch["attention_mask"].all()  # truncated
    assert batch["image_ids"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="example 1 has an empty or missing caption"):
        collator(
            [{"image": Image.new("RGB", (4, 4)), "text": "a cat"}, {"image": Image.new("RGB", (4, 4)), "text": " "}]
        )
    plain = BertTokenizerFast(vocab={w: i for w, i in tokenizer.get_vocab().items() if w != "[DEC]"})  # no [DEC]
    with pytest.raises(ValueError, match=r"no \[DEC\] token"):
        Blip2ImageTextCollator(blip2_image_processor(28), plain)


def test_augmentation_crops_resizes_and_flips() -> None:
    image = Image.new("RGB", (60, 30))
    image.paste((255, 0, 0), (0, 0, 30, 30))  # left half red
    augment = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(2.0, 2.0), flip_probability=1.0)
    out = augment(image)
    assert out.size == (16, 16)
    assert out.getpixel((15, 8))[0] > 200 and out.getpixel((0, 8))[0] < 50  # the full image, mirrored
    sizes = {RandomResizedCropFlip(16)(Image.new("RGB", (50, 40))).size for _ in range(20)}
    assert sizes == {(16, 16)}


def test_parameter_groups_decay_and_layer_wise_lr(parts) -> None:
    model, _, _ = parts
    model.freeze_vision_encoder()
    groups = parameter_groups(model, 1e-3, 0.05, layer_wise_lr_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in groups:
        for parameter in group["params"]:
            name = names[id(parameter)]
            no_decay = parameter.ndim <= 1 or name == "temp"
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
    scale_of = {names[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}
    layers = model.config.qformer_config.num_hidden_layers
    # Heads above the stack keep the full LR; the top layer gets one factor, each layer below one more.
    assert scale_of["itm_head.weight"] == 1.0 and scale_of["temp"] == 1.0
    assert scale_of["qformer.encoder.layer.2.attention.attention.query.weight"] == 0.5
    assert scale_of["qformer.encoder.layer.0.attention.attention.query.weight"] == 0.5**layers
    assert scale_of["query_tokens"] == 0.5 ** (layers + 1) == scale_of["embeddings.word_embeddings.weight"]
    assert not any(name.startswith("vision_model.encoder") for name in scale_of)  # frozen


def test_trainer_logs_terms_keeps_frozen_parts_in_eval_and_honours_lr_decay(parts, tmp_path) -> None:
    model, collator, _ = parts
    args = _args(tmp_path, layer_wise_lr_decay=0.5, warmup_steps=2, max_steps=6)
    trainer = Blip2Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=collator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"loss_itc", "loss_itm", "loss_itg", "temperature"} <= set(entry) for entry in logged)
    assert not model.vision_model.encoder.training  # frozen encoder stayed in eval mode
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "vision_model.post_layernorm.weight" in changed
    assert not any(name.startswith("vision_model.encoder") for name in changed)
    # The scheduler scales every group's own LR: the ratios set by layer-wise decay survive every step.
    optimizer = trainer.optimizer
    base = [group["lr"] / group["lr_scale"] for group in optimizer.param_groups]
    assert max(base) - min(base) < 1e-12 and min(base) > 0
    assert len({group["lr_scale"] for group in optimizer.param_groups}) > 2


def test_loss_weights_choose_the_terms(parts, tmp_path) -> None:
    model, collator, _ = parts
    trainer = Blip2Trainer(
        model=model,
        args=_args(tmp_path, itm_weight=0.0, itg_weight=2.0, max_steps=2, logging_steps=1),
        train_dataset=_dataset(),
        data_collator=collator,
    )
    trainer.train()
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert "loss_itm" not in entry and {"loss_itc", "loss_itg"} <= set(entry)


def test_training_reduces_the_loss(parts, tmp_path) -> None:
    model, collator, _ = parts
    args = _args(tmp_path, max_steps=30, logging_steps=5, learning_rate=3e-3)
    trainer = Blip2Trainer(model=model, args=args, train_dataset=_dataset(), data_collator=collator)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    # From a random (not BERT) initialisation the Q-Former's text features start almost identical, so in 30 steps
    # the captioning term is the one that moves.
    assert logged[-1]["loss"] < 0.85 * logged[0]["loss"], logged
    assert logged[-1]["loss_itg"] < 0.7 * logged[0]["loss_itg"], logged


def test_gradient_accumulation_averages_micro_batch_losses(parts, tmp_path) -> None:
    model, collator, _ = parts
    model.config.qformer_config.attention_probs_dropout_prob = 0.0  # read at every call: no randomness left
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    initial = {n: v.clone() for n, v in model.state_dict().items()}
    data = _dataset(repeats=2)  # 8 examples: 2 micro-batches of 4
    args = _args(
        tmp_path,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=1,
        optim="sgd",
        learning_rate=0.1,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        itm_weight=0.0,
        max_grad_norm=1e9,
    )
    trainer = _SequentialTrainer(model=model, args=args, train_dataset=data, data_collator=collator)
    order = [[0, 1, 2, 3], [4, 5, 6, 7]]
    trainer.train()

    reference = Blip2ForPretraining(model.config)
    reference.load_state_dict(initial)
    reference.freeze_vision_encoder()
    reference.train()
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for indices in order[:2]:
        batch = collator([data[i] for i in indices])
        output = reference(**batch, losses=("itc", "itg"))
        (output.loss / 2).backward()
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.grad is not None:
                parameter -= 0.1 * parameter.grad
    for name, parameter in model.named_parameters():
        assert torch.allclose(parameter, reference.state_dict()[name], atol=1e-6), name


def test_feature_cache_gives_the_losses_of_the_uncached_path(parts) -> None:
    model, collator, _ = parts
    model.eval()
    data = _dataset(repeats=2)
    with pytest.raises(ValueError, match="parameters still train"):
        FrozenFeatureDataset(data, model.vision_model, collator.image_processor, progress=False)
    model.freeze_vision_encoder()
    # The collator's image-id column is the default; a dataset without it caches one entry per example.
    assert (
        FrozenFeatureDataset(data, model.vision_model, collator.image_processor, progress=False).features.shape[0] == 4
    )
    no_ids = [{key: value for key, value in example.items() if key != "image_id"} for example in data]
    assert (
        len(FrozenFeatureDataset(no_ids, model.vision_model, collator.image_processor, progress=False).features) == 8
    )
    cached = FrozenFeatureDataset(
        data, model.vision_model, collator.image_processor, image_id_column="image_id", batch_size=3, progress=False
    )
    assert cached.features.shape[0] == len(COLORS)  # one computation per distinct image
    plain_batch, cached_batch = collator(data), collator([cached[i] for i in range(len(cached))])
    assert "frozen_image_features" in cached_batch and "pixel_values" not in cached_batch
    with torch.no_grad():
        torch.manual_seed(0)
        expected = model(**plain_batch)
        torch.manual_seed(0)
        actual = model(**cached_batch)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert torch.allclose(getattr(expected, name), getattr(actual, name), atol=1e-6), name
    augmenting = Blip2ImageTextCollator(collator.image_processor, collator.qformer_tokenizer, augment=True)
    with pytest.raises(ValueError, match="cannot be augmented"):
        augmenting([cached[0], cached[1]])


def test_resuming_from_a_checkpoint_ends_with_the_same_weights(parts, tmp_path) -> None:
    model, collator, _ = parts
    initial = {n: v.clone() for n, v in model.state_dict().items()}
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "learning_rate": 1e-3}
    straight = Blip2Trainer(
        model=model, args=_args(tmp_path / "a", **common), train_dataset=_dataset(), data_collator=collator
    )
    straight.train()
    expected = {n: v.clone() for n, v in model.state_dict().items()}

    resumed_model = Blip2ForPretraining(model.config)
    resumed_model.load_state_dict(initial)
    interrupted = Blip2Trainer(
        model=resumed_model,
        args=_args(tmp_path / "b", **common),
        train_dataset=_dataset(),
        data_collator=collator,
        callbacks=[_StopAfter(2)],
    )
    interrupted.train()
    assert interrupted.state.global_step == 2
    again = Blip2ForPretraining(model.config)
    again.load_state_dict(initial)
    resumed = Blip2Trainer(
        model=again, args=_args(tmp_path / "b", **common), train_dataset=_dataset(), data_collator=collator
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / "checkpoint-2"))
    for name, value in expected.items():
        assert torch.allclose(again.state_dict()[name], value, atol=1e-6), name


@pytest.mark.parametrize(("size", "accumulation"), [(9, 1), (17, 2)])
def test_an_epoch_whose_last_batch_holds_one_image_finishes(parts, tmp_path, size: int, accumulation: int) -> None:
    """9 examples at batch 8 (or 17 with accumulation) leave a last batch of one image, with no ITM negative."""
    model, collator, _ = parts
    examples = (_dataset(repeats=5) * 2)[:size]
    for index, example in enumerate(examples):
        example = dict(example)
        example["image_id"] = index
        examples[index] = example
    args = _args(tmp_path, max_steps=-1, num_train_epochs=1, gradient_accumulation_steps=accumulation, logging_steps=1)
    trainer = _SequentialTrainer(model=model, args=args, train_dataset=examples, data_collator=collator)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert trainer.state.epoch == 1.0 and logged
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logged)


def test_evaluate_reports_the_stage1_loss_and_its_terms(parts, tmp_path) -> None:
    model, collator, _ = parts
    args = _args(
        tmp_path,
        max_steps=4,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss_itc",
        per_device_eval_batch_size=8,
    )
    trainer = Blip2Trainer(
        model=model, args=args, train_dataset=_dataset(), eval_dataset=_dataset(repeats=2), data_collator=collator
    )
    trainer.train()  # load_best_model_at_end reads eval_loss_itc
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss_itc", "eval_loss_itm", "eval_loss_itg", "eval_temperature"} <= set(metrics)
    terms = metrics["eval_loss_itc"] + metrics["eval_loss_itm"] + metrics["eval_loss_itg"]
    assert abs(metrics["eval_loss"] - terms) < 1e-4 * max(1.0, terms)  # one eval batch: the loss is the terms' sum
    assert trainer.state.best_metric is not None


def test_a_warm_up_as_long_as_the_run_is_warned_about(parts, tmp_path, caplog) -> None:
    model, collator, _ = parts
    trainer = Blip2Trainer(
        model=model,
        args=_args(tmp_path, warmup_steps=2000, max_steps=2),
        train_dataset=_dataset(),
        data_collator=collator,
    )
    with caplog.at_level("WARNING", logger="modeling_blip2.trainer"):
        trainer.train()
    assert any(
        "warm-up (2000 steps) is as long as the whole run (2 steps)" in record.message for record in caplog.records
    )


def _textured(repeats: int) -> list[dict]:
    """Like `_dataset`, with images whose crops and flips differ (a plain square looks the same augmented)."""
    examples = _dataset(repeats)
    for example in examples:
        pixels = np.random.default_rng(example["image_id"]).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        example["image"] = Image.fromarray(pixels)
    return examples


def test_resuming_with_augmentation_ends_with_the_same_weights(parts, tmp_path) -> None:
    """Augmentation draws are a function of (seed, epoch, example): a resumed run augments as the straight one did
    (its collator's own generator is in no checkpoint). 12 examples at batch 8: 2-step epochs, stopped mid-epoch."""
    model, collator, tokenizer = parts
    total, stop = 6, 3
    augmenting = Blip2ImageTextCollator(collator.image_processor, tokenizer, max_length=8, augment=True, seed=5)
    initial = {n: v.clone() for n, v in model.state_dict().items()}
    common = {"max_steps": total, "save_strategy": "steps", "save_steps": stop, "learning_rate": 1e-3}
    data = _textured(repeats=3)
    Blip2Trainer(
        model=model, args=_args(tmp_path / "a", **common), train_dataset=data, data_collator=augmenting
    ).train()
    expected = {n: v.clone() for n, v in model.state_dict().items()}

    def fresh() -> Blip2ForPretraining:
        again = Blip2ForPretraining(model.config)
        again.load_state_dict(initial)
        return again

    fresh_collator = Blip2ImageTextCollator(collator.image_processor, tokenizer, max_length=8, augment=True, seed=5)
    interrupted = Blip2Trainer(
        model=fresh(),
        args=_args(tmp_path / "b", **common),
        train_dataset=data,
        data_collator=fresh_collator,
        callbacks=[_StopAfter(stop)],
    )
    interrupted.train()
    resumed_model = fresh()
    resumed = Blip2Trainer(
        model=resumed_model, args=_args(tmp_path / "b", **common), train_dataset=data, data_collator=fresh_collator
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "run" / f"checkpoint-{stop}"))
    for name, value in expected.items():
        assert torch.allclose(resumed_model.state_dict()[name], value, atol=1e-6), name
    # Draws differ between examples and between epochs of one example.
    keyed = [{**data[0], "__blip2_sample__": key} for key in ((0, 0), (0, 1), (1, 0))]
    pixels = [augmenting([example])["pixel_values"] for example in keyed]
    assert not torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[0], pixels[2])
    assert torch.equal(pixels[0], augmenting([keyed[0]])["pixel_values"])


def test_bad_training_inputs_are_named(parts, tmp_path) -> None:
    model, collator, _ = parts
    examples = _dataset(repeats=1)
    with pytest.raises(ValueError, match=r"example 0 has image id 1\.2 \('image_id'\): image ids must be integers"):
        collator([{**examples[0], "image_id": 1.2}, {**examples[1], "image_id": 1.7}])
    assert collator([{**examples[0], "image_id": 3.0}, examples[1]])["image_ids"].tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"example 0 has no 'text' column \(the captions\); its columns are"):
        collator([{"image": examples[0]["image"], "caption": "a red square"}])
    with pytest.raises(ValueError, match=r"example 1 has no 'image' column \(the images\)"):
        collator([examples[0], {"picture": examples[1]["image"], "text": "a green square"}])
    model.freeze_vision_encoder()
    with pytest.raises(ValueError, match="empty dataset"):
        FrozenFeatureDataset([], model.vision_model, collator.image_processor, progress=False)
    with pytest.raises(ValueError, match="reads images from column 'image', but the dataset's columns are"):
        FrozenFeatureDataset([{"img": None, "text": "a"}], model.vision_model, collator.image_processor)


def test_a_collator_of_the_other_stage_is_refused(parts, tmp_path) -> None:
    from tiny import tiny_checkpoint_parts

    from modeling_blip2 import Blip2CaptionCollator

    model, collator, _ = parts
    stage2_model, processor = tiny_checkpoint_parts()
    with pytest.raises(ValueError, match="Blip2CaptionCollator builds LLM batches .* stage-1 Blip2ForPretraining"):
        Blip2Trainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=_dataset(),
            data_collator=Blip2CaptionCollator(processor, is_encoder_decoder=False),
        )
    with pytest.raises(ValueError, match="Blip2ImageTextCollator builds stage-1 batches"):
        Blip2Trainer(model=stage2_model, args=_args(tmp_path), train_dataset=_dataset(), data_collator=collator)
    with pytest.raises(ValueError, match="a stage-1 Blip2ForPretraining evaluates its losses"):
        Blip2Trainer(model=model, args=_args(tmp_path, predict_with_generate=True), data_collator=collator)
