"""Stage-2 benchmark: training-step throughput and peak memory with the LLM in fp32, bf16 and 8-bit, and VQA
throughput with five questions per image, with and without reusing the image encoding, against transformers'
built-in BLIP-2.

One randomly initialised checkpoint is saved (a mid-size EVA-style vision encoder, Q-Former and OPT decoder, with
the `hub_configs/tiny-random` tokenizer: `<image>`, BOS, pad and the "\\n" end token of its ids; the LLM's vocabulary
is larger than the tokenizer's 91 words so that its head costs about what OPT's does relative to its width) and every
model below is loaded from it, so they all hold the same weights. The vision encoder is the substantial part of the
image path, as ViT-g is: about 11M parameters over 257 tokens, against a 3.8M-parameter Q-Former and a 20M-parameter
LLM.

1. Stage-2 training step (`modeling_blip2.Blip2ForConditionalGeneration`): the vision encoder and the LLM frozen
   (`freeze_vision_encoder`, `freeze_language_model`), the query tokens, Q-Former, post-LayerNorm and projection
   trained in fp32, on the same caption batches (`Blip2CaptionCollator`, collated once beforehand; batch 8) with
   the package's parameter groups (`trainer.parameter_groups`), AdamW (betas 0.9, 0.98), gradient clipping at 1.0.
   The LLM (and the frozen encoder) is
   - fp32: `from_pretrained(folder)`;
   - bf16: `from_pretrained(folder).apply_precision_policy(torch.bfloat16)` (the vision encoder is bf16 too);
   - 8-bit: `from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))` (the LLM only).
   The step is a plain loop (forward, backward, clip, `optimizer.step`, `zero_grad`): `Blip2Trainer` refuses a
   model loaded in 8-bit (transformers' Trainer: "cannot perform fine-tuning on purely quantized models") even
   though only fp32 parts are trained. The three models train in lock-step (one step each, the order rotating every
   step) after one warm-up step each; samples/s is the batch size over the median step time.

   Memory is measured in a fresh process per variant (forked from a server that has imported torch and
   transformers), with the helpers of `benchmark_inference.py`. First what the loaded model keeps resident, read
   once every weight has been touched: anonymous memory (`RssAnon`) and pages of the memory-mapped checkpoint file
   (`RssFile`; transformers maps the safetensors file, fp32 weights are used in place, and the mapping stays while
   any tensor still points into it, so after bf16 or 8-bit loading the fp32 file pages the conversion read stay
   resident too: clean page cache, which the kernel can drop under pressure). Then, after one warm-up step with a
   throw-away optimizer (lazy initialisation), how far peak RSS rises above that baseline while a new optimizer
   trains `--memory-steps` steps: optimizer state, gradients, activations (glibc's mmap threshold pinned at
   128 KiB, the high-water mark reset through `/proc/self/clear_refs`). The weights' own size
   (`get_memory_footprint()`) is shown next to them.

2. VQA throughput (questions/s): `--vqa-images` images with the same five questions each, answered in batches of
   `--vqa-batch-size` questions with the paper's zero-shot prompt ("Question: {} Answer:") and decoding (5 beams,
   10 new tokens, length penalty -1), and again greedily (1 beam, 10 new tokens):
   - ours, reuse: `predict_answers(..., reuse_image_encoding=True)` encodes each image once (vision encoder and
     Q-Former) and shares the soft prompts among its questions;
   - ours, no reuse: `predict_answers(..., reuse_image_encoding=False)` encodes the image again for every question;
   - built-in: what a transformers user writes: `transformers.Blip2Processor` (tokenizer padding on the left)
     builds `pixel_values` (the image repeated once per question) and prompts with the `<image>` tokens, one
     `generate` call per batch with the same settings, `batch_decode` of the new tokens.
   Everything a run does is timed (image processing, tokenization, generation, decoding). The first run of each
   variant is the warm-up and the equivalence check: the answers' token ids of ours without reuse must equal the
   built-in's, and those with reuse those without ("answers identical: yes/no"; the exit status is 1 on "no").
   Then `--vqa-repeats` timed runs per variant alternate between the variants (the order rotating every repeat)
   and the median is reported (and the best run), with the time spent in image preprocessing, the vision encoder,
   the Q-Former and the LLM (its prompt pass, then the decoding steps), measured by hooks, and the bound on what
   reusing the image encoding can give here (Amdahl: the built-in's time less 4/5 of its image preprocessing,
   encoder and Q-Former time). The built-in class runs the LLM's prompt pass on every beam (transformers expands
   the prompts to batch x beams first); ours runs it once per question and copies its cache to the beams
   (`generate(share_prompt_cache=True)`, the default), in both of our variants.

Run it from the repository root (about 4 minutes on 2 CPU cores, half of it in the bf16 steps on a CPU without
native bf16; `--skip-memory` saves a minute; `--quick` is a smoke test of about 20 s):

    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_stage2.py
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_stage2.py --quick
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_stage2.py --vqa-repeats 5 --output-json out.json

bf16 is slower than fp32 on CPUs without native bf16 matrix instructions (AVX512-BF16 / AMX), by far on AVX2-only
ones, where bf16 matrix products take a slow generic path; the script prints which the CPU has. 8-bit layers run
through bitsandbytes' CPU backend (which casts their fp32 inputs to fp16 at every call).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, BitsAndBytesConfig, GenerationConfig

import modeling_blip2
from modeling_blip2 import (
    Blip2CaptionCollator,
    Blip2ForConditionalGeneration,
    Blip2ImageTextProcessor,
    predict_answers,
)
from modeling_blip2.processing import IMAGE_TOKEN, VQA_PROMPT_DECODER_ONLY, blip2_image_processor
from modeling_blip2.trainer import parameter_groups
from modeling_blip2.vqa import VQA_LENGTH_PENALTY

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_inference import (  # noqa: E402  (a sibling script: same model builder and memory methodology)
    KIB_PER_MIB,
    MemoryResult,
    ModelSize,
    _peak_rss_increase,
    _pin_mmap_threshold,
    _status_kib,
    build_stock_config,
    configure_threads,
    measure_in_fresh_processes,
    quiet_transformers,
    randomise_weights,
)

TINY_RANDOM = Path(__file__).resolve().parents[1] / "hub_configs" / "tiny-random"
WORKER_PRELOAD = ["torch", "transformers", "modeling_blip2", "modeling_blip2.trainer", "benchmark_inference"]

FP32, BF16, INT8 = "fp32", "bf16", "8-bit"
PRECISIONS = (FP32, BF16, INT8)
REUSE, NO_REUSE, BUILT_IN = "ours, reuse", "ours, no reuse", "built-in"
VQA_VARIANTS = (REUSE, NO_REUSE, BUILT_IN)
BEAM, GREEDY = "beam", "greedy"

LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.05
BETAS = (0.9, 0.98)
MAX_GRAD_NORM = 1.0
SOURCE_IMAGE_SIZE = 256

# Widths are multiples of 64 where bitsandbytes quantizes (the LLM's linear layers).
DEFAULT_SIZE = ModelSize(
    vision_hidden=384,
    vision_layers=6,
    vision_heads=6,
    vision_intermediate=1536,
    image_size=224,
    patch_size=14,
    qformer_hidden=256,
    qformer_layers=4,
    qformer_heads=4,
    qformer_intermediate=1024,
    num_query_tokens=32,
    text_hidden=512,
    text_layers=6,
    text_heads=8,
    text_ffn=2048,
    vocab_size=2048,
)
QUICK_SIZE = ModelSize(
    vision_hidden=64,
    vision_layers=2,
    vision_heads=4,
    vision_intermediate=256,
    image_size=56,
    patch_size=14,
    qformer_hidden=64,
    qformer_layers=2,
    qformer_heads=4,
    qformer_intermediate=256,
    num_query_tokens=8,
    text_hidden=64,
    text_layers=2,
    text_heads=4,
    text_ffn=256,
    vocab_size=128,
)

# Words of the tiny-random tokenizer: five VQA questions and the caption vocabulary.
QUESTIONS = (
    "what color is the cat ?",
    "how many people are in the picture ?",
    "what is on the table ?",
    "is the dog sitting on the grass ?",
    "where is the man standing ?",
)
CAPTION_WORDS = (
    "a", "the", "man", "woman", "person", "child", "cat", "dog", "car", "bus", "train", "bike", "boat", "tree",
    "grass", "table", "plate", "food", "pizza", "street", "sky", "water", "field", "room", "bed", "chair", "ball",
    "red", "blue", "green", "white", "black", "brown", "small", "large", "two", "sitting", "standing", "holding",
    "riding", "looking", "on", "in", "at", "with", "and", "near", "next", "to", "above", "below", "under", "behind",
)  # fmt: skip


@dataclass(frozen=True)
class Tokens:
    """Special ids of the tiny-random tokenizer, written into the LLM's config."""

    image: int
    bos: int
    eos: int
    pad: int
    tokenizer_size: int


@dataclass(frozen=True)
class TrainWorkload:
    batch_size: int = 8
    steps: int = 3  # timed, per variant, after the warm-up step
    memory_steps: int = 1
    num_batches: int = 4  # distinct batches, cycled
    max_length: int = 48  # image tokens included
    seed: int = 0


@dataclass(frozen=True)
class VqaWorkload:
    num_images: int = 8
    batch_size: int = 16
    repeats: int = 3
    num_beams: int = 5
    max_new_tokens: int = 10
    greedy: bool = True
    seed: int = 0

    @property
    def num_questions(self) -> int:
        return self.num_images * len(QUESTIONS)


@dataclass(frozen=True)
class Setup:
    """What a memory worker needs to rebuild the data and load a model."""

    size: ModelSize
    tokens: Tokens
    train: TrainWorkload
    checkpoint: str


# -- model, tokenizer and data ----------------------------------------------------------------------------------------
def load_tokenizer(padding_side: str = "right") -> Any:
    return AutoTokenizer.from_pretrained(TINY_RANDOM, padding_side=padding_side)


def tiny_random_tokens() -> Tokens:
    tokenizer = load_tokenizer()
    return Tokens(
        image=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        bos=tokenizer.bos_token_id,
        eos=GenerationConfig.from_pretrained(TINY_RANDOM).eos_token_id,  # "\n", as in the official OPT checkpoints
        pad=tokenizer.pad_token_id,
        tokenizer_size=len(tokenizer),
    )


def save_checkpoint(size: ModelSize, tokens: Tokens, seed: int, directory: str) -> None:
    """The built-in class, randomised (`benchmark_inference.randomise_weights`), saved in the official layout."""
    if size.vocab_size < tokens.tokenizer_size:
        raise ValueError(f"the LLM vocabulary ({size.vocab_size}) must cover the tokenizer ({tokens.tokenizer_size})")
    config = build_stock_config(size)
    config.image_token_index = tokens.image
    text_config = config.text_config
    text_config.bos_token_id, text_config.eos_token_id, text_config.pad_token_id = tokens.bos, tokens.eos, tokens.pad
    model = transformers.Blip2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokens.bos, eos_token_id=tokens.eos, pad_token_id=tokens.pad
    )
    randomise_weights(model, seed)
    model.save_pretrained(directory)


def load_clean(model_class: type, checkpoint: str, **kwargs: Any) -> nn.Module:
    model, info = model_class.from_pretrained(checkpoint, output_loading_info=True, **kwargs)
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise RuntimeError(f"{model_class.__module__}: checkpoint did not load cleanly: {problems}")
    return model


def load_stage2_model(precision: str, checkpoint: str) -> Blip2ForConditionalGeneration:
    """Ours, with the LLM in `precision`, frozen as in stage 2 (encoder but its post-LayerNorm, and LLM), training."""
    if precision == INT8:
        model = load_clean(
            Blip2ForConditionalGeneration, checkpoint, quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )
    else:
        model = load_clean(Blip2ForConditionalGeneration, checkpoint)
        if precision == BF16:
            model.apply_precision_policy(torch.bfloat16)
    model.freeze_vision_encoder()
    model.freeze_language_model()
    return model.train()


def quantized_outside_llm(model: nn.Module) -> tuple[int, list[str]]:
    """How many bitsandbytes layers the model has, and those outside the LLM (there should be none)."""
    names = [name for name, module in model.named_modules() if type(module).__module__.startswith("bitsandbytes")]
    return len(names), [name for name in names if not name.startswith("language_model.")]


def make_images(count: int, seed: int) -> list[Image.Image]:
    """Distinct smooth random RGB images (16x16 noise upscaled to 256x256)."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
            (SOURCE_IMAGE_SIZE, SOURCE_IMAGE_SIZE), Image.Resampling.BILINEAR
        )
        for _ in range(count)
    ]


def build_processor(size: ModelSize) -> Blip2ImageTextProcessor:
    return Blip2ImageTextProcessor(
        blip2_image_processor(size.image_size), load_tokenizer(), num_query_tokens=size.num_query_tokens
    )


def build_builtin_processor(size: ModelSize) -> transformers.Blip2Processor:
    """transformers' own processor, set up for batched generation (left padding)."""
    return transformers.Blip2Processor(
        image_processor=blip2_image_processor(size.image_size),
        tokenizer=load_tokenizer(padding_side="left"),
        num_query_tokens=size.num_query_tokens,
    )


def caption_batches(size: ModelSize, tokens: Tokens, workload: TrainWorkload) -> list[dict[str, torch.Tensor]]:
    """`num_batches` stage-2 batches (random captions of 6-12 words), collated once by `Blip2CaptionCollator`."""
    words = random.Random(workload.seed)
    count = workload.num_batches * workload.batch_size
    images = make_images(count, workload.seed + 1)
    examples = [
        {"image": image, "text": " ".join(words.choices(CAPTION_WORDS, k=words.randint(6, 12)))} for image in images
    ]
    collator = Blip2CaptionCollator(
        build_processor(size), is_encoder_decoder=False, eos_token_id=tokens.eos, max_length=workload.max_length
    )
    return [collator(examples[start : start + workload.batch_size]) for start in range(0, count, workload.batch_size)]


# -- stage-2 training -------------------------------------------------------------------------------------------------
def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the package's parameter groups (no weight decay on biases and norms)."""
    return torch.optim.AdamW(parameter_groups(model, LEARNING_RATE, WEIGHT_DECAY), lr=LEARNING_RATE, betas=BETAS)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().item()


@dataclass
class TrainTimes:
    step_s: list[float] = field(default_factory=list)  # timed steps (warm-up excluded)
    warmup_s: float = 0.0
    losses: list[float] = field(default_factory=list)  # every step, the warm-up included


def time_training(
    models: dict[str, nn.Module], batches: list[dict[str, torch.Tensor]], steps: int
) -> dict[str, TrainTimes]:
    """One warm-up step each, then `steps` steps each in lock-step, the order rotating every step."""
    optimizers = {name: make_optimizer(model) for name, model in models.items()}
    times = {name: TrainTimes() for name in models}
    names = list(models)
    for step in range(steps + 1):
        order = names[step % len(names) :] + names[: step % len(names)]
        batch = batches[step % len(batches)]
        for name in order:
            start = time.perf_counter()
            loss = train_step(models[name], optimizers[name], batch)
            elapsed = time.perf_counter() - start
            times[name].losses.append(loss)
            if step == 0:
                times[name].warmup_s = elapsed
            else:
                times[name].step_s.append(elapsed)
    return times


# -- peak memory of training (runs in the worker processes) -----------------------------------------------------------
@dataclass(frozen=True)
class MemoryJob:
    precision: str
    setup: Setup
    threads: int | None


@dataclass(frozen=True)
class TrainMemory:
    weights_mib: float  # get_memory_footprint()
    resident_anonymous_mib: float  # RssAnon after loading (and reading every weight) minus before
    resident_file_mib: float  # RssFile, the same way: pages of the memory-mapped checkpoint
    training: MemoryResult  # peak above the post-warm-up baseline while training

    @property
    def resident_mib(self) -> float:
        return self.resident_anonymous_mib + self.resident_file_mib


def silence_known_warnings() -> None:
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" at every 8-bit matmul.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def measure_training_memory(job: MemoryJob) -> TrainMemory:
    quiet_transformers()
    silence_known_warnings()
    configure_threads(job.threads)
    pinned = _pin_mmap_threshold()
    batches = caption_batches(job.setup.size, job.setup.tokens, job.setup.train)
    gc.collect()
    before = {field: _status_kib(field) or 0 for field in ("RssAnon", "RssFile")}
    model = load_stage2_model(job.precision, job.setup.checkpoint)
    with torch.no_grad():  # weights still memory-mapped from the checkpoint are resident once read
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.reshape(-1)[:: max(1, 1024 // tensor.element_size())].sum()  # a read in every 4 KiB page
    gc.collect()
    after = {field: _status_kib(field) or 0 for field in ("RssAnon", "RssFile")}
    # Warm-up with a throw-away optimizer, so that lazy initialisation is not counted but the optimizer state is.
    train_step(model, make_optimizer(model), batches[0])
    gc.collect()

    def run() -> None:
        optimizer = make_optimizer(model)
        for step in range(job.setup.train.memory_steps):
            train_step(model, optimizer, batches[step % len(batches)])

    result = _peak_rss_increase(run)
    if pinned:
        result = MemoryResult(result.peak_increase_mib, result.baseline_mib, result.source + ", mmap threshold pinned")
    resident = [(after[field] - before[field]) / KIB_PER_MIB for field in ("RssAnon", "RssFile")]
    return TrainMemory(model.get_memory_footprint() / 2**20, *resident, result)


def measure_memory(jobs: list[MemoryJob]) -> list[TrainMemory]:
    """Runs every job in a fresh process, one at a time."""
    return measure_in_fresh_processes(measure_training_memory, jobs, WORKER_PRELOAD)


# -- VQA --------------------------------------------------------------------------------------------------------------
class ComponentTimer:
    """Seconds spent in image preprocessing, the vision encoder, the Q-Former and the LLM (prompt pass vs decoding
    steps), through module hooks and a wrapper around the image processor's `preprocess`."""

    PARTS = ("images", "vision", "qformer", "llm_prompt", "llm_decode")

    def __init__(self, model: nn.Module, image_processor: Any) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self._started: dict[str, float] = {}
        self._llm_part = "llm_decode"
        preprocess = image_processor.preprocess

        def timed_preprocess(*args: Any, **kwargs: Any) -> Any:  # `__call__` looks it up on the instance
            self._enter("images")
            try:
                return preprocess(*args, **kwargs)
            finally:
                self._exit("images")

        image_processor.preprocess = timed_preprocess
        for part, module in (("vision", model.vision_model), ("qformer", model.qformer)):
            module.register_forward_pre_hook(lambda *_, part=part: self._enter(part))
            module.register_forward_hook(lambda *_, part=part: self._exit(part))
        model.language_model.register_forward_pre_hook(self._enter_llm, with_kwargs=True)
        model.language_model.register_forward_hook(lambda *_: self._exit(self._llm_part))

    def reset(self) -> dict[str, float]:
        seconds, self.seconds = self.seconds, dict.fromkeys(self.PARTS, 0.0)
        return seconds

    def _enter(self, part: str) -> None:
        self._started[part] = time.perf_counter()

    def _exit(self, part: str) -> None:
        self.seconds[part] += time.perf_counter() - self._started.pop(part)

    def _enter_llm(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            tokens = kwargs.get("input_ids", args[0] if args else None)
        self._llm_part = "llm_prompt" if tokens is not None and tokens.shape[1] > 1 else "llm_decode"
        self._enter(self._llm_part)


class GenerateRecorder:
    """Records the new token ids of every `model.generate` call (an instance attribute shadows the method)."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.rows = model, []

    def __enter__(self) -> GenerateRecorder:
        original = self.model.generate

        def generate(*args: Any, **kwargs: Any) -> Any:
            outputs = original(*args, **kwargs)
            sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
            self.rows += sequences[:, kwargs["input_ids"].shape[1] :].tolist()  # generate gives the prompt back first
            return outputs

        self.model.generate = generate
        return self

    def __exit__(self, *exc: Any) -> None:
        del self.model.generate


@dataclass(frozen=True)
class VqaTask:
    images: list[Image.Image]
    questions: list[str]
    image_index: list[int]  # grouped by image, in order: answers come back in question order on every path


def vqa_task(workload: VqaWorkload) -> VqaTask:
    images = make_images(workload.num_images, workload.seed + 2)
    index = [image for image in range(workload.num_images) for _ in QUESTIONS]
    return VqaTask(images, [QUESTIONS[row % len(QUESTIONS)] for row in range(len(index))], index)


def generation_settings(decoding: str, workload: VqaWorkload) -> dict[str, Any]:
    """The same `generate` settings for every variant (those `predict_answers` applies)."""
    if decoding == BEAM:
        return {"num_beams": workload.num_beams, "max_new_tokens": workload.max_new_tokens,
                "length_penalty": VQA_LENGTH_PENALTY}  # fmt: skip
    return {"num_beams": 1, "max_new_tokens": workload.max_new_tokens}


def answer_ours(
    model: nn.Module, processor: Any, task: VqaTask, settings: dict[str, Any], batch_size: int, reuse: bool
) -> list[str]:
    return predict_answers(
        model,
        processor,
        task.images,
        task.questions,
        image_index=task.image_index,
        batch_size=batch_size,
        reuse_image_encoding=reuse,
        **settings,
    )


def answer_builtin(
    model: nn.Module, processor: Any, task: VqaTask, settings: dict[str, Any], batch_size: int
) -> tuple[list[str], list[list[int]]]:
    """The transformers way: processor(images=image per question, text=prompts), generate, decode the new tokens."""
    answers: list[str] = []
    new_ids: list[list[int]] = []
    for start in range(0, len(task.questions), batch_size):  # `generate` runs under no_grad, as `predict_answers`
        rows = range(start, min(start + batch_size, len(task.questions)))
        inputs = processor(
            images=[task.images[task.image_index[row]] for row in rows],
            text=[VQA_PROMPT_DECODER_ONLY.format(task.questions[row]) for row in rows],
            padding=True,
            return_tensors="pt",
        )
        sequences = model.generate(**inputs, **settings)
        new_tokens = sequences[:, inputs["input_ids"].shape[1] :]
        new_ids += new_tokens.tolist()
        answers += [text.strip() for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers, new_ids


@dataclass
class VqaRuns:
    """One decoding mode: seconds and component seconds of every timed run, per variant, and the check."""

    seconds: dict[str, list[float]]
    components: dict[str, list[dict[str, float]]]
    warmup_s: dict[str, float]
    ids_identical_builtin: int  # questions whose new token ids match (ours without reuse vs built-in)
    ids_identical_reuse: int  # (ours with reuse vs without)
    answers_identical: bool  # the decoded answers of all three
    sample: dict[str, list[int]]  # the first question's new token ids, per variant


def run_vqa(
    decoding: str,
    models: dict[str, nn.Module],
    processors: dict[str, Any],
    timers: dict[str, ComponentTimer],
    task: VqaTask,
    workload: VqaWorkload,
) -> VqaRuns:
    settings = generation_settings(decoding, workload)
    batch = workload.batch_size

    def run(variant: str) -> tuple[list[str], list[list[int]]]:
        if variant == BUILT_IN:
            return answer_builtin(models[BUILT_IN], processors[BUILT_IN], task, settings, batch)
        with GenerateRecorder(models[variant]) as recorder:
            answers = answer_ours(models[variant], processors[variant], task, settings, batch, variant == REUSE)
        return answers, recorder.rows

    timer_of = {REUSE: timers["ours"], NO_REUSE: timers["ours"], BUILT_IN: timers[BUILT_IN]}
    seconds: dict[str, list[float]] = {variant: [] for variant in VQA_VARIANTS}
    components: dict[str, list[dict[str, float]]] = {variant: [] for variant in VQA_VARIANTS}
    outputs, warmup_s = {}, {}
    for variant in VQA_VARIANTS:  # warm-up and equivalence check
        timer_of[variant].reset()
        start = time.perf_counter()
        outputs[variant] = run(variant)
        warmup_s[variant] = time.perf_counter() - start
    for repeat in range(workload.repeats):
        order = VQA_VARIANTS[repeat % 3 :] + VQA_VARIANTS[: repeat % 3]
        for variant in order:
            timer_of[variant].reset()
            start = time.perf_counter()
            run(variant)
            seconds[variant].append(time.perf_counter() - start)
            components[variant].append(timer_of[variant].reset())
    for variant, (answers, ids) in outputs.items():
        if len(answers) != workload.num_questions or len(ids) != workload.num_questions:
            raise RuntimeError(f"{variant}: {len(answers)} answers, {len(ids)} id rows for {workload.num_questions}")
    ids = {variant: rows for variant, (_, rows) in outputs.items()}
    return VqaRuns(
        seconds=seconds,
        components=components,
        warmup_s=warmup_s,
        ids_identical_builtin=sum(a == b for a, b in zip(ids[NO_REUSE], ids[BUILT_IN], strict=True)),
        ids_identical_reuse=sum(a == b for a, b in zip(ids[REUSE], ids[NO_REUSE], strict=True)),
        answers_identical=outputs[REUSE][0] == outputs[NO_REUSE][0] == outputs[BUILT_IN][0],
        sample={variant: rows[0] for variant, rows in ids.items()},
    )


# -- report -----------------------------------------------------------------------------------------------------------
def cpu_bf16_support() -> str:
    """What the CPU offers for bf16 matrix products (Linux: /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        flags = []
    native = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{', '.join(native)} (native bf16)" if native else f"none (no AVX512-BF16 / AMX; torch uses {capability})"


def training_table(
    times: dict[str, TrainTimes], memory: dict[str, TrainMemory] | None, workload: TrainWorkload
) -> str:
    lines = [
        "| LLM precision | step time (ms, median) | samples/s | vs fp32 | weights (MiB) | model resident: anonymous "
        "+ checkpoint pages (MiB) | training peak above it (MiB) | resident + training peak (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reference = statistics.median(times[FP32].step_s)
    for precision in PRECISIONS:
        step = statistics.median(times[precision].step_s)
        cells = [f"{step * 1e3:.0f}", f"{workload.batch_size / step:.2f}", f"{reference / step:.2f}"]
        if memory:
            item = memory[precision]
            peak = item.training.peak_increase_mib
            resident = f"{item.resident_anonymous_mib:.0f} + {item.resident_file_mib:.0f}"
            cells += [f"{item.weights_mib:.0f}", resident, f"{peak:.0f}", f"{item.resident_mib + peak:.0f}"]
        else:
            cells += ["not measured"] * 4
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median_components(runs: list[dict[str, float]]) -> dict[str, float]:
    return {part: statistics.median(run[part] for run in runs) for part in ComponentTimer.PARTS}


def vqa_rows(runs: VqaRuns, workload: VqaWorkload) -> dict[str, dict[str, float]]:
    rows = {}
    builtin_s = statistics.median(runs.seconds[BUILT_IN])
    for variant in VQA_VARIANTS:
        median_s = statistics.median(runs.seconds[variant])
        rows[variant] = {
            "questions_per_s": workload.num_questions / median_s,
            "best_questions_per_s": workload.num_questions / min(runs.seconds[variant]),
            "ratio_vs_builtin": builtin_s / median_s,
            "seconds": median_s,
            **{f"{part}_s": value for part, value in median_components(runs.components[variant]).items()},
        }
        rows[variant]["other_s"] = median_s - sum(rows[variant][f"{part}_s"] for part in ComponentTimer.PARTS)
    return rows


def reuse_bound(rows: dict[str, dict[str, float]]) -> float:
    """Amdahl: the built-in's time with its image preprocessing, encoder and Q-Former time cut to one image in five."""
    builtin = rows[BUILT_IN]
    shared = (builtin["images_s"] + builtin["vision_s"] + builtin["qformer_s"]) * (1 - 1 / len(QUESTIONS))
    return builtin["seconds"] / (builtin["seconds"] - shared)


def vqa_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [
        "| decoding | variant | questions/s (median) | best run | vs built-in | whole run (s) | image preprocessing "
        "(s) | vision encoder (s) | Q-Former (s) | LLM prompt pass (s) | LLM decoding steps (s) | other (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for decoding, rows in results.items():
        for variant, row in rows.items():
            lines.append(
                f"| {decoding} | {variant} | {row['questions_per_s']:.2f} | {row['best_questions_per_s']:.2f} "
                f"| {row['ratio_vs_builtin']:.2f} | {row['seconds']:.2f} | {row['images_s']:.2f} "
                f"| {row['vision_s']:.2f} | {row['qformer_s']:.2f} | {row['llm_prompt_s']:.2f} "
                f"| {row['llm_decode_s']:.2f} | {row['other_s']:.2f} |"
            )
    return "\n".join(lines)


def parameter_counts(model: nn.Module) -> dict[str, float]:
    parts = {"vision encoder": model.vision_model, "Q-Former": model.qformer, "LLM": model.language_model}
    return {name: sum(p.numel() for p in part.parameters()) / 1e6 for name, part in parts.items()}


def environment() -> dict[str, Any]:
    import bitsandbytes

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "modeling_blip2": modeling_blip2.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "cpu_bf16": cpu_bf16_support(),
    }


# -- main -------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke test (about 20 s)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed steps per precision (default 3)")
    parser.add_argument("--memory-steps", type=int, default=None, help="steps of each peak-memory run (default 1)")
    parser.add_argument("--skip-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument("--vqa-images", type=int, default=None, help="images, 5 questions each (default 8)")
    parser.add_argument("--vqa-batch-size", type=int, default=None, help="questions per generate (default 16)")
    parser.add_argument("--vqa-repeats", type=int, default=None, help="timed VQA runs per variant (default 3)")
    parser.add_argument("--no-greedy", action="store_true", help="beam search only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    defaults = {
        "train_steps": (1, 3),
        "memory_steps": (1, 1),
        "vqa_images": (2, 8),
        "vqa_batch_size": (5, 16),
        "vqa_repeats": (1, 3),
    }
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_transformers()
    silence_known_warnings()
    configure_threads(args.threads)
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    tokens = tiny_random_tokens()
    train = TrainWorkload(
        batch_size=4 if args.quick else 8,
        steps=args.train_steps,
        memory_steps=args.memory_steps,
        num_batches=2 if args.quick else 4,
        max_length=size.num_query_tokens + 16,
        seed=args.seed,
    )
    vqa = VqaWorkload(
        num_images=args.vqa_images,
        batch_size=args.vqa_batch_size,
        repeats=args.vqa_repeats,
        greedy=not args.no_greedy,
        seed=args.seed,
    )
    print(f"threads={torch.get_num_threads()} quick={args.quick}; CPU bf16 support: {cpu_bf16_support()}")

    with tempfile.TemporaryDirectory(prefix="blip2-benchmark-stage2-") as checkpoint:
        save_checkpoint(size, tokens, args.seed, checkpoint)

        # 1. Stage-2 training.
        batches = caption_batches(size, tokens, train)
        models = {precision: load_stage2_model(precision, checkpoint) for precision in PRECISIONS}
        counts = parameter_counts(models[FP32])
        quantized, misplaced = quantized_outside_llm(models[INT8])
        print("parameters: " + ", ".join(f"{name} {count:.1f}M" for name, count in counts.items()))
        print(f"8-bit model: {quantized} bitsandbytes layers, {len(misplaced)} outside the LLM {misplaced or ''}")
        print(
            f"stage-2 training: batch {train.batch_size}, {train.steps} timed step(s) per precision after 1 warm-up "
            f"step, lock-step; sequence {batches[0]['input_ids'].shape[1]} tokens ({size.num_query_tokens} image)"
        )
        train_times = time_training(models, batches, train.steps)
        del models
        gc.collect()
        memory = None
        if not args.skip_memory:
            setup = Setup(size, tokens, train, checkpoint)
            results = measure_memory([MemoryJob(precision, setup, args.threads) for precision in PRECISIONS])
            memory = dict(zip(PRECISIONS, results, strict=True))
        print(f"\n{training_table(train_times, memory, train)}\n")
        print(
            "first-step loss: "
            + ", ".join(f"{precision} {train_times[precision].losses[0]:.4f}" for precision in PRECISIONS)
        )
        if memory:
            print(f"memory read from: {'; '.join(sorted({item.training.source for item in memory.values()}))}")

        # 2. VQA.
        vqa_models = {
            "ours": load_clean(Blip2ForConditionalGeneration, checkpoint).eval(),
            BUILT_IN: load_clean(transformers.Blip2ForConditionalGeneration, checkpoint).eval(),
        }  # loaded before the folder goes: nothing is read from it later
    models_by_variant = {REUSE: vqa_models["ours"], NO_REUSE: vqa_models["ours"], BUILT_IN: vqa_models[BUILT_IN]}
    ours_processor = build_processor(size)
    processors = {REUSE: ours_processor, NO_REUSE: ours_processor, BUILT_IN: build_builtin_processor(size)}
    timers = {
        "ours": ComponentTimer(vqa_models["ours"], ours_processor.image_processor),
        BUILT_IN: ComponentTimer(vqa_models[BUILT_IN], processors[BUILT_IN].image_processor),
    }
    task = vqa_task(vqa)
    decodings = (BEAM, GREEDY) if vqa.greedy else (BEAM,)
    print(
        f"\nVQA: {vqa.num_images} images x {len(QUESTIONS)} questions = {vqa.num_questions}, batches of "
        f"{vqa.batch_size} questions, {vqa.max_new_tokens} new tokens; {vqa.repeats} timed run(s) per variant"
    )
    runs = {}
    for decoding in decodings:
        runs[decoding] = run_vqa(decoding, models_by_variant, processors, timers, task, vqa)
    labels = {BEAM: f"beam-{vqa.num_beams}", GREEDY: "greedy"}
    results = {labels[decoding]: vqa_rows(item, vqa) for decoding, item in runs.items()}
    print(f"\n{vqa_table(results)}\n")

    identical = True
    for decoding, item in runs.items():
        same = item.ids_identical_builtin == vqa.num_questions and item.ids_identical_reuse == vqa.num_questions
        identical = identical and same and item.answers_identical
        print(
            f"{labels[decoding]}: answers identical: {'yes' if same and item.answers_identical else 'no'} "
            f"(token ids: ours without reuse = built-in for {item.ids_identical_builtin}/{vqa.num_questions} "
            f"questions, ours with reuse = without for {item.ids_identical_reuse}/{vqa.num_questions}; decoded "
            f"answers {'identical' if item.answers_identical else 'differ'}; first answer's ids {item.sample[REUSE]})"
        )
    for label, rows in results.items():
        reuse, no_reuse = rows[REUSE]["ratio_vs_builtin"], rows[NO_REUSE]["ratio_vs_builtin"]
        print(
            f"{label}: ours with reuse / built-in = {reuse:.2f} (target >= 2: {'met' if reuse >= 2 else 'NOT met'}), "
            f"without reuse / built-in = {no_reuse:.2f}; the most image-encoding reuse alone can give here (built-in "
            f"time less 4/5 of its image preprocessing + vision + Q-Former time) = {reuse_bound(rows):.2f}"
        )
    if args.quick:
        print("(--quick: a smoke test; its tiny vision encoder is no substantial part of the work)")
    print(
        "(random weights: most answer ids lie outside the 91-word tokenizer, whose decoding drops them, so the check "
        "compares token ids)"
    )
    elapsed = time.perf_counter() - started
    print(f"wall time: {elapsed:.1f} s (after start-up and imports)")
    if args.output_json:
        report = {
            "environment": environment(),
            "model_size": asdict(size),
            "parameters_millions": counts,
            "tokens": asdict(tokens),
            "training": {
                "workload": asdict(train),
                "times": {precision: asdict(item) for precision, item in train_times.items()},
                "samples_per_s": {
                    precision: train.batch_size / statistics.median(item.step_s)
                    for precision, item in train_times.items()
                },
                "memory": {precision: asdict(item) for precision, item in memory.items()} if memory else None,
                "quantized_layers": quantized,
            },
            "vqa": {
                "workload": asdict(vqa),
                "rows": results,
                "reuse_bound": {label: reuse_bound(rows) for label, rows in results.items()},
                "runs": {labels[decoding]: asdict(item) for decoding, item in runs.items()},
            },
            "answers_identical": identical,
            "wall_time_s": elapsed,
        }
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
