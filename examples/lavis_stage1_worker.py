"""Salesforce LAVIS's own stage-1 model, `Blip2Qformer`, driven by `benchmark_training.py --against-lavis`.

Run with the LAVIS virtual environment's interpreter (`scripts/setup_lavis.sh` makes `.venv-lavis`: torch 2.13.0
CPU, `salesforce-lavis==1.0.2` and the transformers 4.26 that it needs), never with the project's: LAVIS is imported
as installed and this file does not import `modeling_blip2` (which needs transformers 5).

LAVIS builds its parts from downloads (the bert-base-uncased tokenizer, config and weights, the EVA ViT-g weights).
`OfflineBlip2Qformer` overrides only the three class methods that download, `init_tokenizer`, `init_vision_encoder`
and `init_Qformer`, to build the same LAVIS classes at the benchmark's sizes from nothing but a vocabulary file:
LAVIS's `BertTokenizer` set-up with `[DEC]` added as bos, `lavis.models.eva_vit.VisionTransformer` as
`create_eva_vit_g` configures it (pre-norm EVA blocks, no mean pooling, LayerNorm eps 1e-6, q/v biases; width,
depth, heads, MLP width, patch and image size from the benchmark), LAVIS's `LayerNorm` as `ln_vision`, and LAVIS's
`BertLMHeadModel` from a `BertConfig` with BERT-base defaults, the benchmark's sizes and the extra fields
`init_Qformer` sets (`encoder_width`, `add_cross_attention`, `cross_attention_freq`, `query_length`). Everything
else is `Blip2Qformer.__init__` and `Blip2Qformer.forward` as installed: the encoder frozen as `freeze_vit` does
it, `resize_token_embeddings` for `[DEC]`, the query feed-forward copied from the text one, the projections, ITM
head and temperature, `max_txt_len` 32, and the forward with all three losses.

`Blip2Qformer.forward` calls `torch.distributed.get_rank()` and `get_world_size()`, so the worker starts a
one-process gloo group, as LAVIS's own runs always do (with one process its gathers are copies of the local batch).

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout (`{"ok": true, ...}` or
`{"ok": false, "error": ...}`); tensors travel through files. Whatever LAVIS prints goes to stderr. Commands:

- `build {size, vocab_file, seed, threads, state_dict_path, pin_mmap_threshold}`: builds the model (seeded), writes
  its state dict with `torch.save`, replies the parameter counts and the pid.
- `load_batches {path}`: loads a `torch.save`d list of `{"image": (B, 3, H, W) float tensor, "text_input": [str]}`.
- `check {index}`: eval mode, one forward of batch `index` with all three losses; replies the losses, LAVIS's token
  ids and the hard negatives it drew (`torch.multinomial` is wrapped for that call only, to record its results).
- `warmup {index}`: one training step on a deep copy of the model with its own optimiser, then frees both (lazy
  initialisation, kept out of a memory measurement).
- `train_setup {}`: train mode and a fresh AdamW optimiser (the benchmark's settings).
- `step {index}`: one training step on batch `index`: forward, backward, optimiser step, `zero_grad`, the losses as
  floats; replies the seconds it took (measured here, so the pipe is not counted) and the loss terms.
- `train {steps}`: `train_setup`, then `steps` steps over the batches in turn (the memory run).
- `exit {}`.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from functools import partial
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The protocol owns the real stdout; anything printed by LAVIS or its dependencies lands on stderr.
_PROTOCOL = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lavis.models.blip2_models.blip2 import LayerNorm  # noqa: E402
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer  # noqa: E402
from lavis.models.blip2_models.Qformer import BertConfig, BertLMHeadModel  # noqa: E402
from lavis.models.eva_vit import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertTokenizer  # noqa: E402

# Optimiser settings of every variant of the benchmark (the paper's).
LEARNING_RATE = 1e-4
BETAS = (0.9, 0.98)
WEIGHT_DECAY = 0.05
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter, as benchmark_inference.py pins it
GLIBC_INITIAL_MMAP_THRESHOLD = 128 * 1024
LOSS_NAMES = ("loss", "loss_itc", "loss_itm", "loss_lm")  # BlipOutput's


def offline_model_class(size: dict[str, int], vocab_file: str) -> type[Blip2Qformer]:
    """`Blip2Qformer` whose three downloading class methods build LAVIS's own parts at `size`, offline."""
    with open(vocab_file, encoding="utf-8") as vocab:
        vocab_entries = sum(1 for line in vocab if line.strip())

    class OfflineBlip2Qformer(Blip2Qformer):
        @classmethod
        def init_tokenizer(cls) -> BertTokenizer:
            tokenizer = BertTokenizer(vocab_file)  # in place of BertTokenizer.from_pretrained("bert-base-uncased")
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
            return tokenizer

        @classmethod
        def init_vision_encoder(
            cls, model_name: str, img_size: int, drop_path_rate: float, use_grad_checkpoint: bool, precision: str
        ) -> tuple[nn.Module, nn.Module]:
            # create_eva_vit_g's VisionTransformer at the benchmark's size, without its download of the weights.
            hidden, intermediate = size["vision_hidden"], size["vision_intermediate"]
            visual_encoder = VisionTransformer(
                img_size=img_size,
                patch_size=size["patch_size"],
                use_mean_pooling=False,
                embed_dim=hidden,
                depth=size["vision_layers"],
                num_heads=size["vision_heads"],
                mlp_ratio=(intermediate + 0.5) / hidden,  # the Mlp takes int(dim * mlp_ratio)
                qkv_bias=True,
                drop_path_rate=drop_path_rate,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_checkpoint=use_grad_checkpoint,
            )
            if visual_encoder.blocks[0].mlp.fc1.out_features != intermediate:
                raise AssertionError("the EVA MLP width differs from the requested one")
            return visual_encoder, LayerNorm(visual_encoder.num_features)

        @classmethod
        def init_Qformer(  # noqa: N802  (LAVIS's name)
            cls, num_query_token: int, vision_width: int, cross_attention_freq: int = 2
        ) -> tuple[nn.Module, nn.Parameter]:
            # BERT-base's config (BertConfig's defaults) at the benchmark's sizes, then exactly init_Qformer's fields.
            encoder_config = BertConfig(
                vocab_size=vocab_entries,  # the vocabulary file's; [DEC] is added by resize_token_embeddings
                hidden_size=size["qformer_hidden"],
                num_hidden_layers=size["qformer_layers"],
                num_attention_heads=size["qformer_heads"],
                intermediate_size=size["qformer_intermediate"],
            )
            encoder_config.encoder_width = vision_width
            encoder_config.add_cross_attention = True
            encoder_config.cross_attention_freq = cross_attention_freq
            encoder_config.query_length = num_query_token
            qformer = BertLMHeadModel(encoder_config)  # in place of from_pretrained("bert-base-uncased", ...)
            query_tokens = nn.Parameter(torch.zeros(1, num_query_token, encoder_config.hidden_size))
            query_tokens.data.normal_(mean=0.0, std=encoder_config.initializer_range)
            return qformer, query_tokens

    return OfflineBlip2Qformer


def parameter_groups(model: nn.Module) -> list[dict[str, Any]]:
    """LAVIS's runner's groups: no weight decay on biases, norms and the 0-d temperature (`ndim < 2`)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (no_decay if parameter.ndim < 2 else decay).append(parameter)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameter_groups(model), lr=LEARNING_RATE, betas=BETAS)


def training_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> dict[str, float]:
    output = model(batch)
    output.loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {name: getattr(output, name).item() for name in LOSS_NAMES}


class Worker:
    def __init__(self) -> None:
        self.model: Blip2Qformer | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.batches: list[dict[str, Any]] = []
        self._store = tempfile.TemporaryDirectory(prefix="lavis-stage1-worker-")

    # -- commands ----------------------------------------------------------------------------------------------
    def build(
        self,
        size: dict[str, int],
        vocab_file: str,
        seed: int,
        state_dict_path: str | None = None,
        threads: int | None = None,
        pin_mmap_threshold: bool = False,
    ) -> dict[str, Any]:
        pinned = pin_mmap_threshold and _pin_mmap_threshold()
        if threads:
            torch.set_num_threads(threads)
        if not dist.is_initialized():
            store = os.path.join(self._store.name, "store")
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        torch.manual_seed(seed)
        model_class = offline_model_class(size, vocab_file)
        self.model = model_class(
            vit_model="eva_clip_g",
            img_size=size["image_size"],
            drop_path_rate=0,
            use_grad_checkpoint=False,
            vit_precision="fp32",  # CPU: LAVIS's fp16 conversion is for GPUs
            freeze_vit=True,
            num_query_token=size["num_query_tokens"],
            cross_attention_freq=size["cross_attention_frequency"],
            embed_dim=size["embed_dim"],
            max_txt_len=size["text_length"],
        )
        if state_dict_path:
            torch.save(self.model.state_dict(), state_dict_path)
        vision = sum(parameter.numel() for parameter in self.model.visual_encoder.parameters())
        total = sum(parameter.numel() for parameter in self.model.parameters())
        trainable = sum(parameter.numel() for parameter in self.model.parameters() if parameter.requires_grad)
        return {
            "pid": os.getpid(),
            "parameters": {"vision_encoder": vision, "rest": total - vision, "trainable": trainable},
            "threads": torch.get_num_threads(),
            "mmap_threshold_pinned": bool(pinned),
            "versions": _versions(),
        }

    def load_batches(self, path: str) -> dict[str, Any]:
        self.batches = torch.load(path, weights_only=True)
        return {"batches": len(self.batches)}

    @torch.no_grad()
    def check(self, index: int) -> dict[str, Any]:
        """Eval-mode losses on one batch, with the token ids and hard negatives LAVIS used."""
        model = self._model()
        model.eval()
        draws: list[int] = []
        original = torch.multinomial

        def recording_multinomial(*args: Any, **kwargs: Any) -> torch.Tensor:
            result = original(*args, **kwargs)
            draws.append(int(result.reshape(-1)[0]))
            return result

        batch = self.batches[index]
        torch.multinomial = recording_multinomial
        try:
            output = model(batch)
        finally:
            torch.multinomial = original
        batch_size = len(batch["text_input"])
        tokens = model.tokenizer(
            batch["text_input"],
            padding="max_length",
            truncation=True,
            max_length=model.max_txt_len,
            return_tensors="pt",
        )
        return {
            "losses": {name: getattr(output, name).item() for name in LOSS_NAMES},
            "input_ids": tokens.input_ids.tolist(),
            "attention_mask": tokens.attention_mask.tolist(),
            "bos_token_id": model.tokenizer.bos_token_id,
            # Blip2Qformer draws one negative image per text, then one negative text per image.
            "negative_image_per_text": draws[:batch_size],
            "negative_text_per_image": draws[batch_size : 2 * batch_size],
        }

    def warmup(self, index: int = 0) -> dict[str, Any]:
        model = copy.deepcopy(self._model())
        model.train()
        training_step(model, make_optimizer(model), self.batches[index])
        del model
        gc.collect()
        return {}

    def train_setup(self) -> dict[str, Any]:
        model = self._model()
        model.train()  # the frozen encoder stays in eval mode (freeze_vit replaced its `train`)
        self.optimizer = make_optimizer(model)
        return {}

    def step(self, index: int) -> dict[str, Any]:
        if self.optimizer is None:
            raise RuntimeError("call train_setup first")
        batch = self.batches[index]
        start = time.perf_counter()
        losses = training_step(self._model(), self.optimizer, batch)
        return {"seconds": time.perf_counter() - start, "losses": losses}

    def train(self, steps: int) -> dict[str, Any]:
        self.train_setup()
        losses = [self.step(index % len(self.batches))["losses"]["loss"] for index in range(steps)]
        return {"losses": losses}

    def _model(self) -> Blip2Qformer:
        if self.model is None:
            raise RuntimeError("call build first")
        return self.model

    # -- loop ------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        commands = {
            "build": self.build,
            "load_batches": self.load_batches,
            "check": self.check,
            "warmup": self.warmup,
            "train_setup": self.train_setup,
            "step": self.step,
            "train": self.train,
        }
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            command = request.pop("cmd")
            if command == "exit":
                _reply({"ok": True})
                break
            try:
                _reply({"ok": True, **commands[command](**request)})
            except Exception as error:  # reported to the benchmark, which raises it
                _reply({"ok": False, "error": f"{command}: {error!r}", "traceback": traceback.format_exc()})
        if dist.is_initialized():
            dist.destroy_process_group()
        self._store.cleanup()


def _reply(message: dict[str, Any]) -> None:
    _PROTOCOL.write(json.dumps(message) + "\n")
    _PROTOCOL.flush()


def _pin_mmap_threshold() -> bool:
    """glibc's mmap threshold kept at its initial 128 KiB, as the benchmark's own memory workers keep it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return mallopt(M_MMAP_THRESHOLD, GLIBC_INITIAL_MMAP_THRESHOLD) == 1


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "salesforce-lavis": version("salesforce-lavis"),
    }


if __name__ == "__main__":
    Worker().serve()
