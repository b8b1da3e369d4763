"""Inference benchmark: `modeling_blip2.Blip2ForConditionalGeneration` against transformers' built-in BLIP-2.

Both implementations are loaded from one randomly initialised checkpoint (a mid-size EVA-style vision encoder,
Q-Former and OPT decoder), so they hold identical weights. The script first checks that they compute the same
thing (forward logits, greedy and beam-search token ids; it prints "outputs identical: yes/no" and exits with 1 on
"no"), then measures for each of them:

1. forward latency: batch 8, a prompt of `num_query_tokens` image tokens + BOS + a few text tokens;
2. greedy `generate` throughput in new tokens/s (batch 8, exactly 20 new tokens);
3. beam-search `generate` throughput in new tokens/s (batch 8, 5 beams, exactly 20 new tokens; a returned
   sequence counts, not the beams explored; ours runs each prompt through the LLM once and copies its cache to the
   beams, `share_prompt_cache`);
4. the peak memory of each of those operations;
5. the compiled path, both implementations compiled the same way: the latency of `torch.compile(model,
   fullgraph=True)`'s forward, and greedy throughput with a static cache whose decoding step transformers
   compiles (`cache_implementation="static"`, `compile_config`). Compilation happens in the equivalence check
   (which also checks compiled outputs against eager) and is not timed; no memory is measured for these.

Latency and throughput are measured in this process, in eval mode under `torch.inference_mode()`: the equivalence
check runs every operation once per implementation (the warm-up; `--warmup` adds more), then each gets `--repeats`
timed runs, of which the median is reported. The implementations alternate, swapping order every repeat, to spread
drift evenly.

Peak memory is measured once per (implementation, operation) in a fresh worker process (forked from a server that
has imported torch and transformers, so it starts fast) that loads the model, runs the operation once on a batch
of one (lazy initialisation), resets the kernel's high-water mark of resident memory (`/proc/self/clear_refs`),
and reports how far peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) then rises above that post-load baseline while
the operation runs on the full batch. The workers keep glibc's mmap threshold at its initial 128 KiB, so that
freed tensors leave RSS at once and the peak follows the tensors the operation holds (`--adaptive-mmap-threshold`
turns this off: the numbers then move by several MiB from run to run). With `--device cuda`, the peak is
`torch.cuda.max_memory_allocated()` above the memory allocated before the operation.

Run it from the repository root (about a minute on 2 CPU cores; `--quick` runs a tiny model as a smoke test):

    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_inference.py
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_inference.py --quick
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_inference.py --threads 4 --repeats 7 --output-json out.json
    HF_HUB_OFFLINE=1 .venv/bin/python examples/benchmark_inference.py --device cuda --dtype bfloat16

In bfloat16 the two need not agree token for token: loaded with `dtype=torch.bfloat16`, ours keeps the language
projection and the post-encoder LayerNorm in float32 as well as the query tokens and Q-Former (the built-in keeps
only the latter two).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

import modeling_blip2

BUILT_IN = "built-in"
OURS = "ours"
IMPLEMENTATIONS = (BUILT_IN, OURS)
OPERATIONS = ("forward", "greedy", "beam")
# The compiled path: `torch.compile(model, fullgraph=True)` forward, and greedy decoding with a static cache whose
# decoding step transformers compiles (`compile_config`, on every device). Timed like the others; no memory row
# (a fresh worker would spend its run compiling).
COMPILED_OPERATIONS = ("compiled forward", "static-cache compiled greedy")
_COMPILED_FORWARD: dict[int, Callable[..., Any]] = {}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MODEL_CLASSES: dict[str, type[transformers.PreTrainedModel]] = {
    BUILT_IN: transformers.Blip2ForConditionalGeneration,
    OURS: modeling_blip2.Blip2ForConditionalGeneration,
}
# Imported once by the server that forks the memory workers, so that each fresh worker starts in well under a second.
WORKER_PRELOAD = ["torch", "transformers", "transformers.models.blip_2.modeling_blip_2", "modeling_blip2"]
KIB_PER_MIB = 1024
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
GLIBC_INITIAL_MMAP_THRESHOLD = 128 * 1024


@dataclass(frozen=True)
class ModelSize:
    """Dimensions of the benchmarked model (EVA-style vision encoder, Q-Former, OPT decoder)."""

    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    qformer_hidden: int
    qformer_layers: int
    qformer_heads: int
    qformer_intermediate: int
    num_query_tokens: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_ffn: int
    vocab_size: int


DEFAULT_SIZE = ModelSize(
    vision_hidden=384,
    vision_layers=6,
    vision_heads=6,
    vision_intermediate=1536,
    image_size=224,
    patch_size=14,
    qformer_hidden=384,
    qformer_layers=4,
    qformer_heads=6,
    qformer_intermediate=1536,
    num_query_tokens=32,
    text_hidden=512,
    text_layers=6,
    text_heads=8,
    text_ffn=2048,
    vocab_size=2000,
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
    vocab_size=500,
)


@dataclass(frozen=True)
class Workload:
    """What each operation is asked to do."""

    batch_size: int = 8
    text_tokens: int = 4  # after the image tokens and BOS
    new_tokens: int = 20
    num_beams: int = 5
    seed: int = 0


@dataclass(frozen=True)
class MemoryJob:
    """One peak-memory measurement, run in a fresh worker process."""

    implementation: str
    operation: str
    checkpoint: str
    device: str
    dtype: str
    threads: int | None
    workload: Workload
    pin_mmap_threshold: bool


@dataclass(frozen=True)
class MemoryResult:
    peak_increase_mib: float
    baseline_mib: float
    source: str  # what the peak was read from


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    metric: str
    unit: str
    built_in: float
    ours: float
    higher_is_better: bool

    @property
    def ratio(self) -> float:
        return self.ours / self.built_in if self.built_in else float("nan")


# -- model and inputs ------------------------------------------------------------------------------------------------
def build_stock_config(size: ModelSize) -> transformers.Blip2Config:
    """A stock BLIP-2 config; the last vocabulary entry is the `<image>` token."""
    text_config = transformers.OPTConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.text_hidden,
        word_embed_proj_dim=size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        ffn_dim=size.text_ffn,
        max_position_embeddings=128,
    )
    return transformers.Blip2Config(
        vision_config={
            "hidden_size": size.vision_hidden,
            "num_hidden_layers": size.vision_layers,
            "num_attention_heads": size.vision_heads,
            "intermediate_size": size.vision_intermediate,
            "image_size": size.image_size,
            "patch_size": size.patch_size,
        },
        qformer_config={
            "hidden_size": size.qformer_hidden,
            "num_hidden_layers": size.qformer_layers,
            "num_attention_heads": size.qformer_heads,
            "intermediate_size": size.qformer_intermediate,
            "encoder_hidden_size": size.vision_hidden,
        },
        text_config=text_config.to_dict(),
        num_query_tokens=size.num_query_tokens,
        image_token_index=size.vocab_size - 1,
    )


@torch.no_grad()
def randomise_weights(model: nn.Module, seed: int) -> None:
    """N(0, 0.02) everywhere, LayerNorm weights around 1 (the stock init leaves the vision encoder near zero).

    The key third of the vision qkv bias, which ours skips as EVA has none, gets random values too: it shifts every
    score of a query by the same amount, so the attention does not depend on it.
    """
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            mean = 1.0 if isinstance(module, nn.LayerNorm) and name == "weight" else 0.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02 + mean)


def save_random_checkpoint(size: ModelSize, seed: int, directory: str) -> None:
    model = transformers.Blip2ForConditionalGeneration(build_stock_config(size))
    randomise_weights(model, seed)
    model.save_pretrained(directory)


def load_model(implementation: str, checkpoint: str, device: str, dtype: str) -> nn.Module:
    model, info = MODEL_CLASSES[implementation].from_pretrained(
        checkpoint, dtype=DTYPES[dtype], output_loading_info=True
    )
    problems = {key: value for key, value in info.items() if value}
    if problems:
        raise RuntimeError(f"{implementation}: checkpoint did not load cleanly: {problems}")
    return model.to(device).eval()


def make_inputs(config: Any, workload: Workload, device: str, dtype: str) -> dict[str, torch.Tensor]:
    """Random images and prompts `[<image>] * num_query_tokens + [BOS] + text`, the same for every call."""
    generator = torch.Generator().manual_seed(workload.seed)
    batch, side = workload.batch_size, config.vision_config.image_size
    pixel_values = torch.randn(batch, 3, side, side, generator=generator)
    image_ids = torch.full((batch, config.num_query_tokens), config.image_token_index)
    bos_ids = torch.full((batch, 1), config.text_config.bos_token_id)
    text_ids = torch.randint(4, config.text_config.vocab_size - 1, (batch, workload.text_tokens), generator=generator)
    input_ids = torch.cat([image_ids, bos_ids, text_ids], dim=1)
    return {
        "pixel_values": pixel_values.to(device, DTYPES[dtype]),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
    }


def first_rows(inputs: dict[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {name: tensor[:count] for name, tensor in inputs.items()}


# -- operations ------------------------------------------------------------------------------------------------------
def generation_kwargs(operation: str, workload: Workload) -> dict[str, Any]:
    settings = {
        "do_sample": False,
        "num_beams": workload.num_beams if operation == "beam" else 1,
        "max_new_tokens": workload.new_tokens,
        "min_new_tokens": workload.new_tokens,
    }
    if operation == "static-cache compiled greedy":
        compile_config = transformers.CompileConfig(fullgraph=True)
        compile_config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        settings.update(cache_implementation="static", compile_config=compile_config)
    return settings


def compiled_forward(model: nn.Module) -> Callable[..., Any]:
    """`torch.compile(model, fullgraph=True)`, made once per model."""
    if id(model) not in _COMPILED_FORWARD:
        _COMPILED_FORWARD[id(model)] = torch.compile(model, fullgraph=True)
    return _COMPILED_FORWARD[id(model)]


def run_operation(
    model: nn.Module, operation: str, inputs: dict[str, torch.Tensor], workload: Workload
) -> torch.Tensor:
    """Forward logits, or the generated ids (prompt included)."""
    if operation == "forward":
        return model(**inputs).logits
    if operation == "compiled forward":
        return compiled_forward(model)(**inputs).logits
    return model.generate(**inputs, **generation_kwargs(operation, workload))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function: Callable[[], Any], device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def time_operation(
    models: dict[str, nn.Module],
    operation: str,
    inputs: dict[str, torch.Tensor],
    workload: Workload,
    warmup: int,
    repeats: int,
    device: str,
) -> dict[str, list[float]]:
    """Seconds per run of each implementation, alternating between them and swapping the order every repeat."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                run_operation(model, operation, inputs, workload)
        for repeat in range(repeats):
            order = list(models) if repeat % 2 == 0 else list(reversed(models))
            for name in order:
                seconds[name].append(
                    timed(lambda name=name: run_operation(models[name], operation, inputs, workload), device)
                )
    return seconds


# -- equivalence -----------------------------------------------------------------------------------------------------
def check_equivalence(
    models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], workload: Workload
) -> dict[str, Any]:
    """Whether both implementations give the same greedy and beam-search ids, and how close their logits are; and
    whether the compiled path (compiled forward, static-cache compiled greedy) gives what eager gives."""
    with torch.inference_mode():
        outputs = {
            operation: {name: run_operation(model, operation, inputs, workload) for name, model in models.items()}
            for operation in (*OPERATIONS, *COMPILED_OPERATIONS)
        }
    logits, compiled_logits = outputs["forward"], outputs["compiled forward"]
    static = outputs["static-cache compiled greedy"]
    return {
        "greedy_ids_identical": torch.equal(outputs["greedy"][BUILT_IN], outputs["greedy"][OURS]),
        "beam_ids_identical": torch.equal(outputs["beam"][BUILT_IN], outputs["beam"][OURS]),
        "logits_max_abs_diff": float((logits[BUILT_IN].float() - logits[OURS].float()).abs().max()),
        "compiled_logits_max_abs_diff_vs_eager": {
            name: float((compiled_logits[name].float() - logits[name].float()).abs().max()) for name in models
        },
        "static_compiled_greedy_ids_equal_eager": {
            name: torch.equal(static[name], outputs["greedy"][name]) for name in models
        },
        "new_tokens_per_row": int(outputs["greedy"][OURS].shape[1] - inputs["input_ids"].shape[1]),
    }


# -- peak memory (runs in the worker processes) ----------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (Linux), e.g. VmRSS or VmHWM."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Lowers the kernel's resident-memory high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _max_rss_kib() -> int:
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss // 1024 if sys.platform == "darwin" else max_rss  # bytes on macOS, KiB on Linux


def _pin_mmap_threshold() -> bool:
    """Keeps glibc's mmap threshold at its initial 128 KiB instead of letting it adapt to freed blocks.

    Every block above it then gets its own mapping that is returned to the system when freed, so peak RSS follows
    the tensors an operation holds rather than the allocation history (which otherwise moves it by several MiB).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return mallopt(M_MMAP_THRESHOLD, GLIBC_INITIAL_MMAP_THRESHOLD) == 1


def _peak_rss_increase(run: Callable[[], Any]) -> MemoryResult:
    gc.collect()
    reset = _reset_peak_rss()
    read_peak, source = _max_rss_kib, "ru_maxrss"
    current = _status_kib("VmRSS")
    if reset and current is not None and _max_rss_kib() > current + KIB_PER_MIB:
        # ru_maxrss also keeps the high-water mark left by exited threads, which the reset cannot lower.
        read_peak, source = (lambda: _status_kib("VmHWM") or 0), "VmHWM"
    if not reset:
        source += " (high-water mark not reset: the loading peak may hide the operation's)"
    baseline = read_peak()
    run()
    return MemoryResult((read_peak() - baseline) / KIB_PER_MIB, baseline / KIB_PER_MIB, source)


def _peak_cuda_increase(run: Callable[[], Any]) -> MemoryResult:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    mib = 1024 * 1024
    return MemoryResult((torch.cuda.max_memory_allocated() - baseline) / mib, baseline / mib, "max_memory_allocated")


def measure_peak_memory(job: MemoryJob) -> MemoryResult:
    """Loads one implementation, warms it up on one row, and measures one run of the operation on the batch."""
    quiet_transformers()
    configure_threads(job.threads)
    pinned = job.pin_mmap_threshold and not job.device.startswith("cuda") and _pin_mmap_threshold()
    model = load_model(job.implementation, job.checkpoint, job.device, job.dtype)
    inputs = make_inputs(model.config, job.workload, job.device, job.dtype)
    with torch.inference_mode():
        run_operation(model, job.operation, first_rows(inputs, 1), job.workload)

        def run() -> None:
            run_operation(model, job.operation, inputs, job.workload)

        if job.device.startswith("cuda"):
            return _peak_cuda_increase(run)
        result = _peak_rss_increase(run)
    if pinned:
        return replace(result, source=result.source + ", glibc mmap threshold pinned at 128 KiB")
    return result


def _isolated_worker(measure: Callable[[Any], Any], job: Any, connection: Connection) -> None:
    try:
        connection.send(measure(job))
    except BaseException as error:  # report it to the parent rather than dying silently
        connection.send(RuntimeError(f"{job!r}: {error!r}"))
        raise
    finally:
        connection.close()


def measure_in_fresh_processes(measure: Callable[[Any], Any], jobs: list[Any], preload: list[str]) -> list[Any]:
    """Runs `measure(job)` for every job in a fresh process, one at a time (forkserver preloading `preload`, so a
    worker starts fast with the libraries imported but no model memory of the parent). `measure` must be a
    module-level function."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(preload)
    results = []
    for job in jobs:
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_isolated_worker, args=(measure, job, sender))
        process.start()
        sender.close()
        result = receiver.recv()
        process.join()
        if isinstance(result, BaseException):
            raise result
        results.append(result)
    return results


def measure_memory(jobs: list[MemoryJob]) -> list[MemoryResult]:
    """Peak memory of every (implementation, operation) job, each in a fresh process."""
    return measure_in_fresh_processes(measure_peak_memory, jobs, WORKER_PRELOAD)


def quiet_transformers() -> None:
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def configure_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def throughput(seconds: list[float], new_tokens: int) -> float:
    return new_tokens / statistics.median(seconds)


def build_rows(
    seconds: dict[str, dict[str, list[float]]], memory: dict[tuple[str, str], MemoryResult], workload: Workload
) -> list[Row]:
    new_tokens = workload.batch_size * workload.new_tokens
    forward = seconds["forward"]
    rows = [Row("forward latency", "ms", *(statistics.median(forward[name]) * 1e3 for name in IMPLEMENTATIONS), False)]
    for operation, label in (("greedy", "greedy generate"), ("beam", f"beam-{workload.num_beams} generate")):
        rates = (throughput(seconds[operation][name], new_tokens) for name in IMPLEMENTATIONS)
        rows.append(Row(f"{label} throughput", "new tokens/s", *rates, True))
    compiled = seconds["compiled forward"]
    rows.append(
        Row(
            "compiled forward latency",
            "ms",
            *(statistics.median(compiled[name]) * 1e3 for name in IMPLEMENTATIONS),
            False,
        )
    )
    rates = (throughput(seconds["static-cache compiled greedy"][name], new_tokens) for name in IMPLEMENTATIONS)
    rows.append(Row("static-cache compiled greedy generate throughput", "new tokens/s", *rates, True))
    for operation, label in (("forward", "forward"), ("greedy", "greedy generate"), ("beam", "beam generate")):
        peaks = (memory[name, operation].peak_increase_mib for name in IMPLEMENTATIONS)
        rows.append(Row(f"{label} peak memory", "MiB", *peaks, False))
    return rows


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| metric | built-in | ours | ratio ours/built-in (throughput: higher is better; latency, memory: lower "
        "is better) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        arrow = "higher is better" if row.higher_is_better else "lower is better"
        ratio = f"{row.ratio:.3f}" if math.isfinite(row.ratio) else "n/a"
        lines.append(f"| {row.metric} ({row.unit}, {arrow}) | {row.built_in:.4g} | {row.ours:.4g} | {ratio} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "modeling_blip2": modeling_blip2.__version__,
        "platform": platform.platform(),
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
    }


# -- main ------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (median reported)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="extra untimed runs per implementation (the equivalence check already runs every operation once)",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke test (about 15 s, mostly start-up)")
    parser.add_argument(
        "--adaptive-mmap-threshold",
        action="store_true",
        help="leave glibc's adaptive mmap threshold on in the memory workers (peak RSS then varies by several MiB "
        "from run to run)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    return args


def measure_speed(
    models: dict[str, nn.Module], inputs: dict[str, torch.Tensor], workload: Workload, args: argparse.Namespace
) -> dict[str, dict[str, list[float]]]:
    return {
        operation: time_operation(models, operation, inputs, workload, args.warmup, args.repeats, args.device)
        for operation in (*OPERATIONS, *COMPILED_OPERATIONS)
    }


def memory_jobs(checkpoint: str, workload: Workload, args: argparse.Namespace) -> list[MemoryJob]:
    return [
        MemoryJob(
            implementation=name,
            operation=operation,
            checkpoint=checkpoint,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            workload=workload,
            pin_mmap_threshold=not args.adaptive_mmap_threshold,
        )
        for operation in OPERATIONS
        for name in IMPLEMENTATIONS
    ]


def print_equivalence(equivalence: dict[str, Any]) -> None:
    yes_no = {True: "yes", False: "no"}
    print(f"outputs identical: {yes_no[equivalence['greedy_ids_identical']]} (greedy token ids)")
    print(f"beam-search ids identical: {yes_no[equivalence['beam_ids_identical']]}")
    print(f"forward logits max |diff|: {equivalence['logits_max_abs_diff']:.3g}")
    for name, same in equivalence["static_compiled_greedy_ids_equal_eager"].items():
        difference = equivalence["compiled_logits_max_abs_diff_vs_eager"][name]
        print(
            f"{name}: static-cache compiled greedy ids = eager: {yes_no[same]}; compiled forward logits max |diff| "
            f"vs eager: {difference:.3g}"
        )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_transformers()
    configure_threads(args.threads)
    size = QUICK_SIZE if args.quick else DEFAULT_SIZE
    workload = Workload(seed=args.seed)
    print(f"device={args.device} dtype={args.dtype} threads={torch.get_num_threads()} quick={args.quick}")

    with tempfile.TemporaryDirectory(prefix="blip2-benchmark-") as checkpoint:
        save_random_checkpoint(size, args.seed, checkpoint)
        models = {name: load_model(name, checkpoint, args.device, args.dtype) for name in IMPLEMENTATIONS}
        inputs = make_inputs(models[OURS].config, workload, args.device, args.dtype)
        equivalence = check_equivalence(models, inputs, workload)
        print_equivalence(equivalence)
        if equivalence["new_tokens_per_row"] != workload.new_tokens:
            raise RuntimeError(f"generated {equivalence['new_tokens_per_row']} tokens, not {workload.new_tokens}")
        seconds = measure_speed(models, inputs, workload, args)
        del models, inputs
        gc.collect()
        jobs = memory_jobs(checkpoint, workload, args)
        results = measure_memory(jobs)
    memory = {(job.implementation, job.operation): result for job, result in zip(jobs, results, strict=True)}

    rows = build_rows(seconds, memory, workload)
    print(f"\n{markdown_table(rows)}\n")
    print(f"memory read from: {'; '.join(sorted({result.source for result in memory.values()}))}")
    elapsed = time.perf_counter() - started
    print(f"wall time: {elapsed:.1f} s (after start-up and imports)")
    if args.output_json:
        report = {
            "environment": environment(args),
            "model_size": asdict(size),
            "workload": asdict(workload),
            "repeats": args.repeats,
            "extra_warmup": args.warmup,
            "equivalence": equivalence,
            "rows": [{**asdict(row), "ratio": row.ratio} for row in rows],
            "seconds": seconds,
            "memory": {f"{name}/{operation}": asdict(result) for (name, operation), result in memory.items()},
            "wall_time_s": elapsed,
        }
        args.output_json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output_json}")
    compiled_ok = all(equivalence["static_compiled_greedy_ids_equal_eager"].values())
    return 0 if equivalence["greedy_ids_identical"] and equivalence["beam_ids_identical"] and compiled_ok else 1


if __name__ == "__main__":
    sys.exit(main())
