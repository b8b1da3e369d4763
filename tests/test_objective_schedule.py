"""The stage-1 objective schedule (`itc_every`, `itm_every`, `itg_every`): a departure from the paper, off by default.

A term with `*_every = k` is computed on the optimiser steps whose `global_step` is a multiple of k, at k times its
weight; evaluation computes every term at its plain weight.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from test_trainer import COLORS, _SequentialTrainer, _StopAfter
from tiny import stage1_config_dict, tiny_qformer_tokenizer
from transformers import HfArgumentParser

from modeling_blip2 import (
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    blip2_image_processor,
)


class _Spy:
    """Records, for each forward call of the model, the optimiser step, the mode, the `losses` asked for and the
    computed terms."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.trainer: Blip2Trainer | None = None
        self.calls: list[dict] = []
        model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        assert "itm" not in kwargs["losses"] or output.itm_logits is not None  # no batch here skips ITM
        terms = {name: float(getattr(output, f"loss_{name}").detach()) for name in kwargs["losses"]}
        self.calls.append(
            {"step": self.trainer.state.global_step, "training": module.training, "losses": kwargs["losses"], **terms}
        )

    def training_calls(self) -> list[tuple[int, tuple[str, ...]]]:
        return [(call["step"], tuple(call["losses"])) for call in self.calls if call["training"]]


def _dataset(repeats: int = 4) -> list[dict]:
    """The four colours in turn, `repeats` times: any 2+ consecutive examples hold an ITM hard negative."""
    images = {name: Image.new("RGB", (40, 40), rgb) for name, rgb in COLORS.items()}
    return [
        {"image": images[name], "text": f"a {name} square", "image_id": index}
        for _ in range(repeats)
        for index, name in enumerate(COLORS)
    ]


@pytest.fixture()
def parts(tmp_path):
    tokenizer = tiny_qformer_tokenizer(tmp_path)
    config = Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]")))
    torch.manual_seed(0)
    model = Blip2ForPretraining(config)
    collator = Blip2ImageTextCollator(blip2_image_processor(28), tokenizer, max_length=8)
    return model, collator


def _args(tmp_path, **overrides) -> Blip2TrainingArguments:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1e-3,
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


def _without_dropout(model: torch.nn.Module) -> None:
    model.config.qformer_config.attention_probs_dropout_prob = 0.0  # read at every call
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def _expected_losses(step: int, every: dict[str, int]) -> tuple[str, ...]:
    return tuple(name for name in ("itc", "itm", "itg") if step % every[name] == 0)


@pytest.mark.parametrize(
    ("accumulation", "every"),
    [(1, {"itc": 1, "itm": 2, "itg": 3}), (2, {"itc": 1, "itm": 2, "itg": 3}), (1, {"itc": 2, "itm": 4, "itg": 1})],
)
def test_each_optimiser_step_computes_the_terms_due_on_it(
    parts, tmp_path, accumulation: int, every: dict[str, int]
) -> None:
    model, collator = parts
    args = _args(
        tmp_path,
        max_steps=6,
        per_device_train_batch_size=8 // accumulation,
        gradient_accumulation_steps=accumulation,
        **{f"{name}_every": value for name, value in every.items()},
    )
    trainer = _SequentialTrainer(model=model, args=args, train_dataset=_dataset(), data_collator=collator)
    spy = _Spy(model)
    spy.trainer = trainer
    trainer.train()
    # Every micro-batch of an optimiser step computes the same terms, decided by the step.
    expected = [(step, _expected_losses(step, every)) for step in range(6) for _ in range(accumulation)]
    assert spy.training_calls() == expected
    # The logged term means cover only the steps that computed the term (logging every 2 steps).
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [2, 4, 6]
    for entry in logged:
        interval = [call for call in spy.calls if entry["step"] - 2 <= call["step"] < entry["step"]]
        for name in ("itc", "itm", "itg"):
            values = [call[name] for call in interval if name in call["losses"]]
            if not values:
                assert f"loss_{name}" not in entry, (entry, name)
                continue
            assert entry[f"loss_{name}"] == pytest.approx(sum(values) / len(values), abs=2e-6), (entry, name)
    assert any(f"loss_{name}" not in entry for entry in logged for name in every)  # some interval lacks a term


def test_a_scheduled_term_is_rescaled_by_its_period(parts, tmp_path) -> None:
    """On a step that computes ITM with `itm_every=3`, the loss is `itc + 3 * itm_weight * itm + ...`."""
    model, collator = parts
    _without_dropout(model)
    weights = {"itc": 1.0, "itm": 0.5, "itg": 2.0}
    every = {"itc": 1, "itm": 3, "itg": 2}
    args = _args(
        tmp_path,
        **{f"{name}_weight": value for name, value in weights.items()},
        **{f"{name}_every": value for name, value in every.items()},
        seeded_itm_negatives=False,  # the direct call below draws from the global generator, seeded alike
    )
    trainer = Blip2Trainer(model=model, args=args, data_collator=collator)
    batch = collator(_dataset(repeats=2))
    for step in range(7):
        trainer.state.global_step = step
        for training in (True, False):
            model.train(training)
            torch.manual_seed(step)  # the ITM hard negatives are drawn at random
            loss = trainer.compute_loss(model, batch).detach()
            torch.manual_seed(step)
            with torch.no_grad():
                direct = model(**batch)
            terms = {name: getattr(direct, f"loss_{name}") for name in weights}
            if training:  # the terms due on this step, each at weight * every
                due = _expected_losses(step, every)
                expected = sum(weights[name] * every[name] * terms[name] for name in due)
            else:  # evaluation: every term at its plain weight, whatever the step
                expected = sum(weights[name] * terms[name] for name in weights)
            # relative: the trainer's ITG head runs on the predicted positions only (same loss up to fp rounding)
            assert float(loss) == pytest.approx(float(expected), rel=1e-6, abs=1e-6), (step, training)


def test_evaluate_computes_every_term_at_its_plain_weight(parts, tmp_path) -> None:
    model, collator = parts
    args = _args(tmp_path, itm_weight=0.5, itm_every=4, itg_every=3)
    trainer = Blip2Trainer(model=model, args=args, eval_dataset=_dataset(repeats=2), data_collator=collator)
    spy = _Spy(model)
    spy.trainer = trainer
    for step in (0, 1):  # a step with every term due, and one with neither ITM nor ITG due
        trainer.state.global_step = step
        metrics = trainer.evaluate()
        assert {"eval_loss_itc", "eval_loss_itm", "eval_loss_itg"} <= set(metrics)
        terms = metrics["eval_loss_itc"] + 0.5 * metrics["eval_loss_itm"] + metrics["eval_loss_itg"]
        assert abs(metrics["eval_loss"] - terms) < 1e-4 * max(1.0, terms), (step, metrics)  # one eval batch
    assert [tuple(call["losses"]) for call in spy.calls] == [("itc", "itm", "itg")] * 2
    assert not any(call["training"] for call in spy.calls)


def test_a_resumed_run_keeps_the_schedule(parts, tmp_path) -> None:
    """The schedule is a function of global_step, which the checkpoint restores: the resumed steps compute what the
    uninterrupted run computed on them (a counter restarted at resume would compute ITM at step 2), and the weights
    end equal."""
    model, collator = parts
    initial = {n: v.clone() for n, v in model.state_dict().items()}
    common = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "itm_every": 3}

    def run(output: str, model: Blip2ForPretraining, resume: str | None = None, **kwargs) -> _Spy:
        trainer = Blip2Trainer(
            model=model,
            args=_args(tmp_path / output, **common),
            train_dataset=_dataset(),
            data_collator=collator,
            **kwargs,
        )
        spy = _Spy(model)
        spy.trainer = trainer
        trainer.train(resume_from_checkpoint=resume)
        return spy

    def fresh() -> Blip2ForPretraining:
        again = Blip2ForPretraining(model.config)
        again.load_state_dict(initial)
        return again

    straight = run("a", model)
    expected_weights = {n: v.clone() for n, v in model.state_dict().items()}
    assert [step for step, losses in straight.training_calls() if "itm" in losses] == [0, 3]
    interrupted = run("b", fresh(), callbacks=[_StopAfter(2)])
    assert interrupted.training_calls() == straight.training_calls()[:2]
    resumed_model = fresh()
    resumed = run("b", resumed_model, resume=str(tmp_path / "b" / "run" / "checkpoint-2"))
    assert resumed.training_calls() == straight.training_calls()[2:]
    for name, value in expected_weights.items():
        assert torch.allclose(resumed_model.state_dict()[name], value, atol=1e-6), name


def test_the_schedule_is_off_by_default_and_parses_from_the_command_line(tmp_path) -> None:
    args = Blip2TrainingArguments(output_dir="unused", report_to=[])
    assert args.loss_every == {"itc": 1, "itm": 1, "itg": 1} and not args.has_objective_schedule
    assert all(args.loss_weights_at(step) == args.loss_weights for step in range(5))
    parser = HfArgumentParser(Blip2TrainingArguments)
    help_text = " ".join(parser.format_help().split())
    assert "--itm_every" in help_text and "A departure from the paper" in help_text
    (parsed,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--itm_every", "4"]
    )
    assert parsed.itm_every == 4 and parsed.has_objective_schedule
    assert parsed.loss_weights_at(4) == {"itc": 1.0, "itm": 4.0, "itg": 1.0}
    assert parsed.loss_weights_at(5) == {"itc": 1.0, "itg": 1.0}
    with pytest.raises(ValueError, match="itm_every must be a positive integer .* got 0"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--report_to", "none", "--itm_every", "0"])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"itm_every": 0}, r"itm_every must be a positive integer .*got 0"),
        ({"itc_every": -2}, r"itc_every must be a positive integer .*got -2"),
        ({"itg_every": True}, r"itg_every must be a positive integer .*got True"),
        ({"itm_every": 2.0}, r"itm_every must be a positive integer .*got 2.0"),
        (
            {"itc_every": 2, "itm_every": 3, "itg_every": 2},
            r"itc_every=2, itm_every=3, itg_every=2 .*step 1 would compute no loss term: keep at least one of them",
        ),
        (  # ITG is off (weight 0), so its every=1 does not count
            {"itg_weight": 0.0, "itc_every": 2, "itm_every": 2},
            r"with itc_every=2, itm_every=2 \(the terms with a non-zero weight\), optimiser step 1",
        ),
        ({"itm_every": 2, "ddp_find_unused_parameters": False}, r"itm_every=2.*drop ddp_find_unused_parameters=False"),
        ({"itm_every": 2, "ddp_static_graph": True}, r"itm_every=2.*drop ddp_static_graph=True"),
    ],
)
def test_bad_schedules_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Blip2TrainingArguments(output_dir="unused", report_to=[], **settings)


def test_a_term_with_weight_zero_stays_off_whatever_its_period() -> None:
    args = Blip2TrainingArguments(output_dir="unused", report_to=[], itm_weight=0.0, itm_every=5, itc_every=2)
    assert all("itm" not in args.loss_weights_at(step) for step in range(11))
    assert args.loss_weights_at(None) == {"itc": 1.0, "itg": 1.0}
    # With ITM off the schedule of ITC alone is a schedule; ITM's period alone would not be.
    assert args.has_objective_schedule
    assert not Blip2TrainingArguments(
        output_dir="unused", report_to=[], itm_weight=0.0, itm_every=5
    ).has_objective_schedule
    # Unscheduled terms keep their settings with ddp flags that a schedule refuses.
    Blip2TrainingArguments(output_dir="unused", report_to=[], ddp_find_unused_parameters=False)


def test_a_schedule_is_refused_for_a_stage2_model(tmp_path) -> None:
    from tiny import tiny_checkpoint_parts

    stage2_model, _ = tiny_checkpoint_parts()
    with pytest.raises(ValueError, match="itm_every=4 schedules stage-1 loss terms, but the model is Blip2ForConditi"):
        Blip2Trainer(model=stage2_model, args=_args(tmp_path, itm_every=4))
    Blip2Trainer(model=stage2_model, args=_args(tmp_path))  # the default is accepted


def test_the_stage1_example_takes_the_schedule_on_its_command_line(tmp_path) -> None:
    from tiny import caption_image_folder, load_example

    tokenizer = tiny_qformer_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))).save_pretrained(tmp_path / "config")
    trainer = load_example("pretrain_stage1").main(
        [
            "--dataset", str(caption_image_folder(tmp_path / "images")), "--config", str(tmp_path / "config"),
            "--qformer_tokenizer", str(tmp_path / "tokenizer"), "--image_id_column", "image_id",
            "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "4", "--warmup_steps", "0",
            "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--save_strategy", "no",
            "--max_text_length", "8", "--output_dir", str(tmp_path / "run"), "--itm_every", "2",
        ]
    )  # fmt: skip
    assert trainer.args.itm_every == 2
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [("loss_itm" in entry, "loss_itc" in entry) for entry in logged] == [
        (True, True),
        (False, True),
        (True, True),
    ]


def test_ddp_with_activation_checkpointing_asks_for_find_unused_parameters(parts) -> None:
    """transformers turns DDP's find_unused_parameters off under activation checkpointing, and a schedule changes the
    parameters a step uses: DDP would fail at the second step (checked by hand under torchrun), so the trainer asks
    for the flag. The check itself, with `distributed` standing for a torchrun launch."""
    from modeling_blip2.trainer import _check_schedule_fits_ddp

    model, _ = parts

    def args(**settings) -> Blip2TrainingArguments:
        return Blip2TrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **settings)

    with pytest.raises(ValueError, match=r"itm_every=2\) .* needs ddp_find_unused_parameters=True"):
        _check_schedule_fits_ddp(args(itm_every=2, activation_checkpointing=True), model, distributed=True)
    model.gradient_checkpointing_enable()  # on the model rather than through the arguments
    with pytest.raises(ValueError, match="needs ddp_find_unused_parameters=True"):
        _check_schedule_fits_ddp(args(itm_every=2), model, distributed=True)
    # Fine: the flag given, no schedule, or no distributed launch.
    _check_schedule_fits_ddp(args(itm_every=2, ddp_find_unused_parameters=True), model, distributed=True)
    _check_schedule_fits_ddp(args(activation_checkpointing=True), model, distributed=True)
    _check_schedule_fits_ddp(args(itm_every=2, activation_checkpointing=True), model, distributed=False)
