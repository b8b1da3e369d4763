"""Several processes end to end: `torchrun` (gloo, CPU) runs the training examples with `Blip2Trainer`, and 2
processes x B samples end with the weights of 1 process x 2B samples.

Why the two runs can agree: transformers shards a map-style dataset by giving rank r the r-th of every W consecutive
batches of the same seeded permutation (accelerate's `BatchSamplerShard` over `SeedableRandomSampler`), and streams an
iterable dataset through the main process, which hands rank r the r-th of W consecutive batches (`dispatch_batches`):
either way the W local batches of a step, stacked rank-major, are the 2B-sample batch one process takes. On that
global batch the stage-1 terms are those of one process (`tests/test_distributed_stage1.py` shows it for the model):
ITC and ITM are means over equal local batches with cross-rank candidates; ITG is weighted by the rank's share of the
tokens (`average_tokens_across_devices`, transformers' default); the ITM hard negatives are drawn with
`--seeded_itm_negatives` (a generator seeded by (seed, step) over the whole gathered batch). Dropout is off in the
tiny checkpoints and augmentation is not used: both draw per-process random numbers.

The 2-process runs are real command lines; the 1-process reference runs the same example in this process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import QFORMER_WORDS, load_example, randomise_, stage1_config_dict, tiny_qformer_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "configs"
WORLD_SIZE = 2
LOCAL_BATCH = 3
GLOBAL_BATCH = WORLD_SIZE * LOCAL_BATCH
STEPS_PER_PASS = 3  # 18 samples at 6 per step
STEPS = STEPS_PER_PASS + 1  # one step into the second pass: a new permutation, or a reshuffled stream
LAUNCH_TIMEOUT_S = 300
# float64 stage 1: one process and two differ by summation order (~1e-16 relative); a wrong negative, a token weighted
# wrongly or a sample seen by the wrong step moves the weights by ~1e-4 and more.
FLOAT64_TOLERANCE = {"atol": 1e-10, "rtol": 1e-8}

# Two captions per image (pairs share an image id and an image); lengths differ, so the ranks' ITG token counts do.
CAPTIONS = (
    "a red cat",
    "the red cat on the left",
    "a photo of a green dog",
    "green dog",
    "the blue square on the right",
    "a blue square",
    "what is this yellow cat ?",
    "a yellow cat .",
    "the red dog on the right",
    "red dog",
    "a photo of the green square",
    "the green square .",
    "blue cat on the left",
    "a photo of a blue cat",
    "the yellow dog",
    "what is this yellow dog ?",
    "a red square on the left",
    "red square",
)
assert len(CAPTIONS) == STEPS_PER_PASS * GLOBAL_BATCH and all(
    word in QFORMER_WORDS for c in CAPTIONS for word in c.split()
)


# -- launching -------------------------------------------------------------------------------------------------------
def _environment() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }


def _launch(command: list[str], expect_failure: bool = False) -> str:
    """Runs a launcher command line (torchrun, accelerate launch) in a session of its own; fails with its output on
    a non-zero exit (a zero one with `expect_failure`) or after `LAUNCH_TIMEOUT_S`. Returns its output."""
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_environment(),
        cwd=REPO,
        start_new_session=True,  # a timeout ends the launcher and its workers together, by this group id only
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{command[:4]} timed out after {LAUNCH_TIMEOUT_S} s\n{_excerpt(output)}") from None
    failed = process.returncode != 0
    assert failed == expect_failure, f"{' '.join(command)}\nexited with {process.returncode}\n{_excerpt(output)}"
    return output


def _excerpt(output: str) -> str:
    """The output's first traceback and its end (a failing rank's error can be far from the end)."""
    start = output.find("Traceback")
    first = output[start : start + 4000] + "\n...\n" if start >= 0 else ""
    return first + output[-6000:]


def _torchrun(script: str, args: list[str], expect_failure: bool = False) -> str:
    """`torchrun --standalone --nproc-per-node 2 examples/<script> ARGS` (run as `python -m torch.distributed.run`
    from this interpreter)."""
    return _launch(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD_SIZE}"]
        + [str(EXAMPLES / script), *args],
        expect_failure,
    )


# -- data and checkpoints --------------------------------------------------------------------------------------------
def _image_folder(folder: Path) -> Path:
    """18 image-caption rows in an image folder with `metadata.jsonl`: image `k` (a colour) has captions 2k, 2k+1."""
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for row, caption in enumerate(CAPTIONS):
            image_id = row // 2
            colour = (40 * image_id % 256, 255 - 25 * image_id, 90 + 17 * image_id)
            Image.new("RGB", (30, 26), colour).save(folder / f"{row:02d}.png")
            metadata.write(json.dumps({"file_name": f"{row:02d}.png", "text": caption, "image_id": image_id}) + "\n")
    return folder


def _stage1_checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    """A tiny random stage-1 model without dropout, saved in `dtype` with its Q-Former tokenizer and image
    processor."""
    from modeling_blip2 import Blip2Config, Blip2ForPretraining, blip2_image_processor

    tokenizer = tiny_qformer_tokenizer()
    config = stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))
    config["qformer_config"].update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config["vision_config"].update(attention_dropout=0.0)
    model = randomise_(Blip2ForPretraining(Blip2Config(**config)), std=0.1, seed=0)
    with torch.no_grad():
        model.temp.fill_(0.07)  # inside the clamp range, so the temperature trains too
    model.to(dtype).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    blip2_image_processor(model.config.vision_config.image_size).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("multiprocess")
    _image_folder(root / "images")
    _stage1_checkpoint(root / "stage1_float64", torch.float64)
    return root


def _stage1_args(data: list[str], checkpoint: Path, output_dir: Path, batch: int, *extra: str) -> list[str]:
    image_ids = [] if "webdataset" in data else ["--image_id_column", "image_id"]  # webdataset: json.image_id
    return [
        *data, "--model_name_or_path", str(checkpoint), *image_ids, "--max_text_length", "12",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS),
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip


def _assert_same_weights(actual_dir: Path, expected_dir: Path, tolerance: dict[str, float]) -> None:
    actual = load_file(actual_dir / "model.safetensors")
    expected = load_file(expected_dir / "model.safetensors")
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        torch.testing.assert_close(
            actual[name], tensor, **tolerance, msg=lambda details, name=name: f"{name} differs:\n{details}"
        )


def _max_difference(first_dir: Path, second_dir: Path) -> float:
    first, second = load_file(first_dir / "model.safetensors"), load_file(second_dir / "model.safetensors")
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def _assert_trained(trainer: object, initial_dir: Path, trained_dir: Path) -> None:
    """Every trainable tensor moved (by AdamW at LR 1e-3 over 4 steps), every frozen one stayed. Attention key
    biases are the exception: adding the same vector to every key shifts all of a query's scores equally, which the
    softmax ignores, so their gradient is zero."""
    initial, trained = load_file(initial_dir / "model.safetensors"), load_file(trained_dir / "model.safetensors")
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert trainable and trainable <= trained.keys()
    for name, tensor in trained.items():
        moved = float((tensor - initial[name]).abs().max())
        if name in trainable and not name.endswith(".key.bias"):
            assert moved > 1e-4, f"trainable {name} did not train (moved {moved})"
        elif name in trainable:
            assert moved < 1e-10, f"{name} moved by {moved}, but the softmax makes its gradient zero"
        else:
            assert moved == 0, f"frozen {name} moved by {moved}"


# -- the mechanisms, in one process ----------------------------------------------------------------------------------
def test_seeded_hard_negatives_follow_the_softmax_and_the_seed() -> None:
    """`sample_hard_negatives(seed=...)` (Gumbel-max over the gathered batch) draws from the same distribution as the
    default multinomial draw, never a positive, the same negatives for the same seed; a generator and a seed at once
    are refused."""
    from modeling_blip2.losses import sample_hard_negatives

    similarity = torch.tensor(
        [[5.0, 1.0, 2.0, 0.0], [0.5, 3.0, -1.0, 0.5], [1.0, 1.0, 4.0, 1.0], [0.0, 2.0, 1.0, 6.0]]
    )
    image_ids = torch.tensor([0, 1, 2, 0])  # rows 0 and 3 are positives of each other
    positives = image_ids[:, None] == image_ids[None, :]
    # Negative images per text come from the text-to-image rows, negative texts per image from the image-to-text rows.
    rows = (similarity.t(), similarity)
    expected = [row.masked_fill(positives, float("-inf")).softmax(dim=1) for row in rows]
    draws = 4000
    counts = torch.zeros(2, 4, 4)
    for seed in range(draws):
        negatives = sample_hard_negatives(similarity, similarity.t().contiguous(), image_ids, seed=seed)
        for direction, drawn in enumerate(negatives):
            assert not positives[torch.arange(4), drawn].any()
            counts[direction, torch.arange(4), drawn] += 1
    for direction, probabilities in enumerate(expected):
        frequencies = counts[direction] / draws
        standard_error = (probabilities * (1 - probabilities) / draws).sqrt()
        assert ((frequencies - probabilities).abs() <= 4 * standard_error + 1e-9).all(), (frequencies, probabilities)

    first = sample_hard_negatives(similarity, similarity.t(), image_ids, seed=7)
    again = sample_hard_negatives(similarity, similarity.t(), image_ids, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    with pytest.raises(ValueError, match="not both"):
        sample_hard_negatives(similarity, similarity.t(), generator=torch.Generator(), seed=0)


def test_token_share_is_one_in_a_single_process() -> None:
    from modeling_blip2.losses import itg_num_predicted_tokens, token_share_across_ranks

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert int(itg_num_predicted_tokens(mask)) == 2 + 3  # every real token but the first of its row
    assert float(token_share_across_ranks(itg_num_predicted_tokens(mask))) == 1.0
    with pytest.raises(ValueError, match="batch, length"):
        itg_num_predicted_tokens(mask[0])


# -- end to end ------------------------------------------------------------------------------------------------------
def _stage1_one_process(workspace: Path, data: list[str], name: str) -> Path:
    """The single-process reference: stage 1 from `data` at batch 6 in this process (4 AdamW steps, float64), with
    its checks (trained, no dropout); run once per data set and module."""
    checkpoint, one = workspace / "stage1_float64", workspace / f"{name}_one_process"
    if (one / "model.safetensors").is_file():
        return one
    trainer = load_example("pretrain_stage1").main(
        _stage1_args(data, checkpoint, one, GLOBAL_BATCH, "--seeded_itm_negatives")
    )
    assert trainer.state.global_step == STEPS and trainer.model.temp.dtype == torch.float64
    assert {"loss_itc", "loss_itm", "loss_itg"} <= set(trainer.state.log_history[0])
    dropout = [
        name for name, module in trainer.model.named_modules() if isinstance(module, torch.nn.Dropout) and module.p
    ]
    assert not dropout, f"dropout draws per-process random numbers; it is on in {dropout}"
    _assert_trained(trainer, checkpoint, one)
    return one


def _stage1_two_processes_equal_one(workspace: Path, data: list[str], name: str) -> None:
    """Stage 1 from `data` under torchrun with 2 processes x 3 samples ends with the weights of 1 process x 6."""
    two = workspace / f"{name}_two_processes"
    _torchrun(
        "pretrain_stage1.py",
        _stage1_args(data, workspace / "stage1_float64", two, LOCAL_BATCH, "--seeded_itm_negatives"),
    )
    _assert_same_weights(two, _stage1_one_process(workspace, data, name), FLOAT64_TOLERANCE)


def test_stage1_two_processes_match_one_process_on_the_doubled_batch(workspace: Path) -> None:
    """`torchrun --nproc-per-node 2 examples/pretrain_stage1.py` on a map-style image folder (batch 3 per process,
    4 AdamW steps, one into a second pass; float64) ends with the weights of one process at batch 6; drawing the
    hard negatives from torch's global generator instead does not."""
    data = ["--dataset", str(workspace / "images")]
    _stage1_two_processes_equal_one(workspace, data, "map_style")

    # The control: the same single-process run with negatives from torch's global generator ends elsewhere.
    unseeded = workspace / "map_style_one_process_unseeded"
    load_example("pretrain_stage1").main(
        _stage1_args(data, workspace / "stage1_float64", unseeded, GLOBAL_BATCH, "--no_seeded_itm_negatives")
    )
    assert _max_difference(unseeded, workspace / "map_style_two_processes") > 1e3 * FLOAT64_TOLERANCE["atol"]


def test_stage1_streamed_shards_two_processes_match_one_process(workspace: Path) -> None:
    """The same from webdataset shards streamed (`--dataset webdataset --data_files 'shards/*.tar' --streaming`,
    two captions per image in `json.captions`, one drawn per step): the main process reads the stream and hands each
    process its batch, so the global batches are those of one process."""
    from webdataset_shards import write_webdataset_shards

    shards = workspace / "shards"
    write_webdataset_shards(shards, num_images=STEPS_PER_PASS * GLOBAL_BATCH, num_shards=2, captions_per_image=2)
    data = ["--dataset", "webdataset", "--data_files", str(shards / "*.tar"), "--streaming"]
    _stage1_two_processes_equal_one(workspace, data, "streamed")


# Stage 2 trains its bridge in fp32 (the precision policy): measured, 2 x 3 and 1 x 6 end 3.8e-7 apart after 4 AdamW
# steps at LR 1e-3; with per-rank token means instead of the global one (--average_tokens_across_devices false) 3e-3.
STAGE2_TOLERANCE = {"atol": 1e-5, "rtol": 1e-4}


@pytest.mark.slow
def test_stage2_two_processes_match_one_process_on_the_doubled_batch(workspace: Path) -> None:
    """`torchrun --nproc-per-node 2 examples/pretrain_stage2.py` (stage-1 checkpoint + tiny OPT, captions of different
    lengths): the LM loss is a mean over all processes' tokens (transformers' `average_tokens_across_devices`), so
    the run ends with the weights of one process at batch 6, within fp32 noise; the frozen LLM is untouched."""
    stage1, llm = _stage2_parts(workspace)
    data = ["--dataset", str(workspace / "images")]
    two, one = workspace / "stage2_two_processes", workspace / "stage2_one_process"
    _torchrun("pretrain_stage2.py", _stage2_args(data, stage1, llm, two, LOCAL_BATCH))
    trainer = load_example("pretrain_stage2").main(_stage2_args(data, stage1, llm, one, GLOBAL_BATCH))
    assert trainer.state.global_step == STEPS
    _assert_same_weights(two, one, STAGE2_TOLERANCE)

    trained, start = load_file(one / "model.safetensors"), load_file(stage1 / "model.safetensors")
    bridge = [name for name in trained if name.startswith(("qformer.", "query_tokens")) and name in start]
    moved = {name: float((trained[name] - start[name]).abs().max()) for name in bridge}
    assert bridge and max(moved.values()) > 1e-3
    # Some Q-Former weights get tiny gradients through the random tiny LLM (AdamW moves them by ~lr * g / eps).
    unmoved = {name: value for name, value in moved.items() if value < 1e-6 and not name.endswith(".key.bias")}
    assert not unmoved, f"bridge tensors that did not train: {unmoved}"
    frozen_llm = load_file(llm / "model.safetensors")
    for name, tensor in frozen_llm.items():
        assert torch.equal(trained[f"language_model.{name}"], tensor), f"the frozen LLM's {name} moved"


@pytest.mark.slow
def test_accelerate_launch_two_processes_match_one_process(workspace: Path) -> None:
    """`accelerate launch --config_file examples/configs/accelerate_2proc.yaml examples/pretrain_stage1.py ...
    --use_cpu` runs the 2 processes (through torchrun, gloo on the CPU) and ends where one process at batch 6 does.
    (`accelerate launch --cpu --num_processes 2` starts a single process without MPI: measured, 6 steps per pass of
    18 samples at batch 3.)"""
    data = ["--dataset", str(workspace / "images")]
    two = workspace / "accelerate_two_processes"
    args = _stage1_args(data, workspace / "stage1_float64", two, LOCAL_BATCH, "--seeded_itm_negatives")
    config = ["--config_file", str(CONFIGS / "accelerate_2proc.yaml")]
    _launch([sys.executable, "-m", "accelerate.commands.launch", *config, str(EXAMPLES / "pretrain_stage1.py"), *args])
    _assert_same_weights(two, _stage1_one_process(workspace, data, "map_style"), FLOAT64_TOLERANCE)


# -- sharded training ------------------------------------------------------------------------------------------------
def test_stage2_sharded_with_fsdp2_on_cpu_matches_one_process(tmp_path: Path) -> None:
    """torch's FSDP2 over 2 CPU processes (gloo, `tests/fsdp_stage2_worker.py`): the frozen encoder and LLM sharded
    with the trainable bridge, 3 AdamW steps on 3 captions each (float64), end with the weights of one unsharded
    process on the 6 captions. (transformers reaches FSDP through accelerate on GPUs only: see the `gpu` test.)"""
    from fsdp_stage2_worker import STEPS as WORKER_STEPS
    from fsdp_stage2_worker import build_model, train_unsharded

    worker = Path(__file__).with_name("fsdp_stage2_worker.py")
    _launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            str(worker),
            str(tmp_path),
        ]
    )
    result = torch.load(tmp_path / "fsdp.pt")
    assert result["frozen"] == ["language_model", "vision_model"] and result["sharded_blocks"] > 2
    expected, initial = train_unsharded(), dict(build_model().named_parameters())
    assert result["parameters"].keys() == expected.keys() and WORKER_STEPS == 3
    for name, tensor in expected.items():
        torch.testing.assert_close(result["parameters"][name], tensor, **FLOAT64_TOLERANCE, msg=name)
    moved = {name: float((tensor - initial[name]).abs().max()) for name, tensor in expected.items()}
    assert max(moved.values()) > 1e-2
    trainable = {name for name, parameter in initial.items() if parameter.requires_grad}
    assert all(moved[name] == 0 for name in expected if name not in trainable)


@pytest.mark.gpu
def test_stage2_fsdp_through_training_arguments_matches_one_process(workspace: Path) -> None:
    """On 2 or more GPUs: `torchrun --nproc-per-node 2 examples/pretrain_stage2.py ... --fsdp full_shard
    --fsdp_config examples/configs/fsdp_stage2.json` (FSDP2 through `TrainingArguments(fsdp=...)`, the encoder's and
    the LLM's blocks sharded) ends with the weights of one process at batch 6. Not run in this project so far."""
    if torch.cuda.device_count() < WORLD_SIZE:
        pytest.skip(f"needs {WORLD_SIZE} GPUs, found {torch.cuda.device_count()}")
    stage1, llm = _stage2_parts(workspace)
    data = ["--dataset", str(workspace / "images")]
    two, one = workspace / "stage2_fsdp_two_processes", workspace / "stage2_gpu_one_process"
    fsdp = ["--fsdp", "full_shard", "--fsdp_config", str(CONFIGS / "fsdp_stage2.json")]
    on_gpu = [arg for arg in _stage2_args(data, stage1, llm, two, LOCAL_BATCH) if arg != "--use_cpu"]
    _torchrun("pretrain_stage2.py", [*on_gpu, *fsdp])
    reference = [arg for arg in _stage2_args(data, stage1, llm, one, GLOBAL_BATCH) if arg != "--use_cpu"]
    load_example("pretrain_stage2").main(reference)
    _assert_same_weights(two, one, STAGE2_TOLERANCE)


# -- launches that would train otherwise than asked -------------------------------------------------------------------
def _tiny_trainer(output_dir: Path, **arguments: object) -> object:
    from modeling_blip2 import Blip2Config, Blip2ForPretraining, Blip2Trainer, Blip2TrainingArguments

    model = Blip2ForPretraining(Blip2Config(**stage1_config_dict()))
    args = Blip2TrainingArguments(output_dir=str(output_dir), report_to="none", **arguments)
    return Blip2Trainer(model=model, args=args, train_dataset=[{"image": None, "text": ""}])


@pytest.mark.slow
def test_fsdp_on_cpu_processes_is_refused(workspace: Path) -> None:
    """accelerate applies `fsdp` only across GPUs or other accelerators: on CPU processes it runs DDP (transformers
    refuses a single process itself). Blip2Trainer says so instead of training unsharded (measured: `torchrun
    --nproc-per-node 2 examples/pretrain_stage1.py ... --use_cpu --fsdp full_shard` ran DDP before this check)."""
    data = ["--dataset", str(workspace / "images")]
    args = _stage1_args(data, workspace / "stage1_float64", workspace / "fsdp_refused", LOCAL_BATCH)
    fsdp = ["--fsdp", "full_shard", "--fsdp_config", str(CONFIGS / "fsdp_stage2.json")]
    output = _torchrun("pretrain_stage1.py", [*args, *fsdp], expect_failure=True)
    assert "instead of FSDP" in output and "run on GPUs" in output


def test_launched_processes_without_a_process_group_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun on a machine without GPUs and without --use_cpu, transformers sets up no process group and
    every process trained alone on the whole data set (measured: both ranks logged epoch 0.17 per step of 3 out of
    18 samples); Blip2Trainer refuses, naming --use_cpu."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    if torch.cuda.is_available():
        pytest.skip("with GPUs accelerate would set up a process group for WORLD_SIZE=2 (and wait for rank 1)")
    with pytest.raises(ValueError, match="pass --use_cpu"):
        _tiny_trainer(tmp_path, use_cpu=False)


# -- DeepSpeed -------------------------------------------------------------------------------------------------------
DEEPSPEED_ZERO2 = CONFIGS / "deepspeed_zero2_stage2.json"


def _auto_values(node: object, path: str = "") -> list[str]:
    """The dotted keys still set to "auto" (transformers fills them from the training arguments)."""
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _auto_values(value, f"{path}{name}.")]
    return [path.rstrip(".")] if node == "auto" else []


def _trainer_deepspeed_config(path: Path) -> object:
    """transformers' `HfTrainerDeepSpeedConfig` for `path`. transformers builds that class on accelerate's
    `HfDeepSpeedConfig` only when DeepSpeed is installed (else on `object`, and its constructor refuses to run);
    without DeepSpeed the same filling methods are put on accelerate's parser here, as transformers composes them."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    if hf_deepspeed.is_deepspeed_available():
        return hf_deepspeed.HfTrainerDeepSpeedConfig(str(path))
    methods = {
        name: value
        for name, value in vars(hf_deepspeed.HfTrainerDeepSpeedConfig).items()
        if name not in ("__init__", "__dict__", "__weakref__", "__module__", "__doc__")
    }
    config = type("HfTrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)(str(path))
    config._dtype, config.mismatches = None, []  # what transformers' constructor sets
    return config


def test_deepspeed_zero2_config_is_filled_by_the_training_arguments(tmp_path: Path) -> None:
    """`--deepspeed examples/configs/deepspeed_zero2_stage2.json`: ZeRO stage 2 without offload, no optimizer or
    scheduler of its own (Blip2Trainer's parameter groups and LR schedule run as the client optimizer), and every
    "auto" value one that transformers' `HfTrainerDeepSpeedConfig` fills from `Blip2TrainingArguments` without a
    mismatch. DeepSpeed itself is not installed here (its runs need CUDA)."""
    from modeling_blip2 import Blip2TrainingArguments

    raw = json.loads(DEEPSPEED_ZERO2.read_text())
    assert set(_auto_values(raw)) == {
        "bf16.enabled",
        "fp16.enabled",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    }
    assert "optimizer" not in raw and "scheduler" not in raw and raw["zero_allow_untested_optimizer"] is True
    for precision, expected in (({}, (False, False)), ({"bf16": True}, (True, False))):
        config = _trainer_deepspeed_config(DEEPSPEED_ZERO2)
        assert config.is_zero2() and not config.is_zero3() and not config.is_offload()
        args = Blip2TrainingArguments(
            output_dir=str(tmp_path),
            per_device_train_batch_size=4,
            gradient_accumulation_steps=2,
            max_grad_norm=0.5,
            use_cpu=True,
            report_to="none",
            **precision,
        )
        config.trainer_config_process(args)
        config.trainer_config_finalize(args, torch.nn.Linear(2, 2), num_training_steps=10)  # raises on mismatches
        assert _auto_values(config.config) == []
        assert config.get_value("train_micro_batch_size_per_gpu") == 4
        assert config.get_value("gradient_accumulation_steps") == 2
        assert config.get_value("train_batch_size") == 8  # world size 1 x 4 x 2
        assert config.get_value("gradient_clipping") == 0.5
        assert (config.get_value("bf16.enabled"), config.get_value("fp16.enabled")) == expected


def _stage2_parts(root: Path) -> tuple[Path, Path]:
    """A float32 stage-1 checkpoint without dropout and a tiny random OPT LLM with its tokenizer (`<image>` added)."""
    from tiny import TINY_RANDOM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_blip2 import Blip2Config

    stage1 = root / "stage1_float32"
    if not stage1.exists():
        _stage1_checkpoint(stage1, torch.float32)
    llm = root / "llm"
    if not llm.exists():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(Blip2Config.from_pretrained(TINY_RANDOM).text_config).save_pretrained(llm)
        AutoTokenizer.from_pretrained(TINY_RANDOM).save_pretrained(llm)
    return stage1, llm


def _stage2_args(data: list[str], stage1: Path, llm: Path, output_dir: Path, batch: int, *extra: str) -> list[str]:
    return [
        *data, "--stage1", str(stage1), "--language_model", str(llm), "--llm_dtype", "float32",
        "--output_dir", str(output_dir), "--per_device_train_batch_size", str(batch), "--max_steps", str(STEPS),
        "--learning_rate", "1e-3", "--warmup_steps", "0", "--use_cpu", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", "--logging_steps", "1", "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip
