"""FrozenFeatureDataset's on-disk cache: read back without the encoder, same losses as the RAM cache, refuses a
cache made by another encoder / preprocessing / dataset / dtype, resumes an interrupted build, serialises builders."""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tiny import stage1_config_dict, tiny_qformer_tokenizer
from torch.utils.data import SequentialSampler

from modeling_blip2 import (
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    FrozenFeatureDataset,
    blip2_image_processor,
)
from modeling_blip2 import feature_cache as feature_cache_module
from modeling_blip2.feature_cache import FEATURE_FILE, MANIFEST_FILE, PARTIAL_FILE

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def _dataset() -> list[dict]:
    """Four images (a coloured square with a stripe, so patches differ), two captions each, grouped by image id."""
    examples = []
    for index, (name, rgb) in enumerate(COLORS.items()):
        image = Image.new("RGB", (40, 40), rgb)
        image.paste((255 - rgb[0], 255 - rgb[1], 255 - rgb[2]), (0, 8 * index, 40, 8 * index + 6))
        for caption in (f"a {name} square", f"the {name} square"):
            examples.append({"image": image, "text": caption, "image_id": index})
    return examples


class _Spy:
    """Wraps `vision_model.forward_features`: counts the images it encodes, and can fail on a given call (a crash)."""

    def __init__(self, vision_model: torch.nn.Module, fail_on_call: int | None = None) -> None:
        self.vision_model, self.fail_on_call = vision_model, fail_on_call
        self.images, self.calls = 0, 0
        self.original = vision_model.forward_features

    def __call__(self, pixel_values: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("killed while encoding")
        self.images += pixel_values.shape[0]
        return self.original(pixel_values, *args, **kwargs)

    def __enter__(self) -> _Spy:
        self.vision_model.forward_features = self
        return self

    def __exit__(self, *exc: object) -> None:
        del self.vision_model.forward_features  # the class's method again


@pytest.fixture()
def parts():
    tokenizer = tiny_qformer_tokenizer()
    config = Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]")))
    torch.manual_seed(0)
    model = Blip2ForPretraining(config)
    model.freeze_vision_encoder()
    collator = Blip2ImageTextCollator(blip2_image_processor(28), tokenizer, max_length=8)
    return model, collator


def _cache(model, collator, data=None, **kwargs) -> FrozenFeatureDataset:
    data = _dataset() if data is None else data
    return FrozenFeatureDataset(data, model.vision_model, collator.image_processor, progress=False, **kwargs)


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {path.name: (path.stat().st_size, path.stat().st_mtime_ns) for path in folder.iterdir()}


def _losses(model, collator, dataset) -> dict[str, torch.Tensor]:
    batch = collator([dataset[i] for i in range(len(dataset))])
    torch.manual_seed(0)  # ITM's hard negatives are sampled
    with torch.no_grad():
        output = model(**batch)
    return {name: getattr(output, name) for name in ("loss_itc", "loss_itm", "loss_itg")}


def test_the_disk_cache_is_read_back_without_the_encoder(parts, tmp_path) -> None:
    model, collator = parts
    in_ram = _cache(model, collator, dtype=torch.float16)
    folder = tmp_path / "cache"
    with _Spy(model.vision_model) as spy:
        built = _cache(model, collator, cache_dir=folder)
    assert spy.images == 4  # one computation per distinct image
    assert sorted(os.listdir(folder)) == [".lock", FEATURE_FILE, MANIFEST_FILE]
    assert built.features.dtype == torch.float16  # the disk cache's default
    assert torch.equal(built.features, in_ram.features)
    with safe_open(folder / FEATURE_FILE, framework="pt") as file:  # a plain safetensors file, for any reader
        assert torch.equal(file.get_tensor("features"), in_ram.features)
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["features"] == {"file": FEATURE_FILE, "shape": [4, 17, 32], "dtype": "float16"}
    assert manifest["identity"]["encoder"]["class"] == "Blip2VisionModel"
    assert manifest["identity"]["preprocessing"]["size"] == {"height": 28, "width": 28}
    assert manifest["identity"]["dataset"]["num_examples"] == 8

    before = _files(folder)
    with _Spy(model.vision_model) as spy:
        reopened = _cache(model, collator, cache_dir=folder)
    assert spy.calls == 0
    assert _files(folder) == before  # reading writes nothing (a read-only folder would do)
    assert [reopened[i]["text"] for i in range(8)] == [example["text"] for example in _dataset()]
    for index in range(8):
        assert torch.equal(reopened[index]["frozen_image_features"], in_ram[index]["frozen_image_features"])
    assert "image" not in reopened[0]

    # DataLoader workers get the path, not the bytes, and map the file again.
    assert reopened.__getstate__()["features"] is None
    unpickled = pickle.loads(pickle.dumps(reopened))
    assert torch.equal(unpickled.features, in_ram.features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_storage_dtypes(parts, tmp_path, dtype) -> None:
    model, collator = parts
    cached = _cache(model, collator, cache_dir=tmp_path / "cache", dtype=dtype)
    reopened = _cache(model, collator, cache_dir=tmp_path / "cache", dtype=dtype)
    assert reopened.features.dtype == dtype
    assert torch.equal(reopened.features, _cache(model, collator, dtype=dtype).features)
    assert torch.equal(reopened.features, cached.features)


def test_losses_from_the_disk_cache_equal_those_of_the_ram_cache(parts, tmp_path) -> None:
    model, collator = parts
    model.eval()
    ram32, ram16 = _cache(model, collator), _cache(model, collator, dtype=torch.float16)
    disk32 = _cache(model, collator, cache_dir=tmp_path / "fp32", dtype=torch.float32)
    disk16 = _cache(model, collator, cache_dir=tmp_path / "fp16")
    plain = _losses(model, collator, _dataset())  # the encoder at every step
    for name, expected in _losses(model, collator, ram32).items():
        assert torch.allclose(_losses(model, collator, disk32)[name], expected, atol=1e-6), name
        assert torch.allclose(plain[name], expected, atol=1e-6), name
    for name, expected in _losses(model, collator, ram16).items():
        assert torch.equal(_losses(model, collator, disk16)[name], expected), name
    # float16 storage changes the features by their rounding, no more (relative 2^-11, subnormals 2^-25).
    assert torch.allclose(disk16.features.float(), ram32.features, rtol=2**-11, atol=2**-25)
    for name, expected in _losses(model, collator, ram32).items():
        assert torch.allclose(_losses(model, collator, disk16)[name], expected, atol=1e-2), name


def test_a_trainer_run_on_the_disk_cache_matches_the_ram_cache(tmp_path) -> None:
    class SequentialTrainer(Blip2Trainer):
        def _get_train_sampler(self, *args, **kwargs) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    results = []
    for cache_dir in (None, tmp_path / "cache"):
        tokenizer = tiny_qformer_tokenizer()
        torch.manual_seed(0)
        model = Blip2ForPretraining(Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))))
        model.freeze_vision_encoder()
        collator = Blip2ImageTextCollator(blip2_image_processor(28), tokenizer, max_length=8)
        dataset = _cache(model, collator, dtype=torch.float32, cache_dir=cache_dir)
        args = Blip2TrainingArguments(
            output_dir=str(tmp_path / f"run-{cache_dir is None}"),
            per_device_train_batch_size=4,
            learning_rate=5e-4,
            warmup_steps=0,
            max_steps=2,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            seed=0,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = SequentialTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
        trainer.train()
        losses = [log[name] for log in trainer.state.log_history[:2] for name in ("loss_itc", "loss_itm", "loss_itg")]
        results.append((losses, {name: value.detach().clone() for name, value in model.named_parameters()}))
    (ram_losses, ram_weights), (disk_losses, disk_weights) = results
    assert ram_losses == pytest.approx(disk_losses, abs=1e-6)
    for name, value in ram_weights.items():
        assert torch.allclose(disk_weights[name], value, atol=1e-6), name


def test_a_cache_made_differently_is_refused_naming_the_difference(parts, tmp_path) -> None:
    model, collator = parts
    folder = tmp_path / "cache"
    _cache(model, collator, cache_dir=folder)
    before = _files(folder)

    def refused(match: str, data=None, vision_model=None, image_processor=None, **kwargs) -> None:
        with pytest.raises(ValueError, match=match) as error:
            FrozenFeatureDataset(
                _dataset() if data is None else data,
                model.vision_model if vision_model is None else vision_model,
                collator.image_processor if image_processor is None else image_processor,
                progress=False,
                cache_dir=folder,
                **kwargs,
            )
        assert "Use another cache_dir, or delete" in str(error.value)

    refused(r"different dtype than this run's.*dtype: 'float16' in the cache, 'float32' now", dtype=torch.float32)
    other_weights = copy.deepcopy(model.vision_model)
    with torch.no_grad():
        other_weights.encoder.layers[0].layer_norm1.bias.add_(1e-3)
    refused(r"different encoder than this run's.*encoder\.weights_sha256: '", vision_model=other_weights)
    other_layer = copy.deepcopy(model.vision_model)
    other_layer.feature_layer = -2
    refused(r"encoder\.feature_layer: -1 in the cache, -2 now", vision_model=other_layer)
    other_config = copy.deepcopy(model.vision_model)
    other_config.config.layer_norm_eps = 1e-3
    refused(r"encoder\.config\.layer_norm_eps: 1e-0?6 in the cache, 0\.001 now", vision_model=other_config)
    other_processor = copy.deepcopy(collator.image_processor)
    other_processor.image_mean = [0.5, 0.5, 0.5]
    refused(r"different preprocessing than this run's.*preprocessing\.image_mean: \[", image_processor=other_processor)
    refused(r"different dataset than this run's.*dataset\.num_examples: 8 in the cache, 6 now", data=_dataset()[:6])
    renumbered = [{**example, "image_id": example["image_id"] + 10} for example in _dataset()]
    refused(r"dataset\.image_ids_sha256", data=renumbered)
    repainted = [
        {**example, "image": example["image"].transpose(Image.Transpose.FLIP_TOP_BOTTOM)} for example in _dataset()
    ]
    refused(r"dataset\.sampled_images_sha256", data=repainted)
    both = copy.deepcopy(model.vision_model)
    both.feature_layer = -2
    refused(r"different dataset / encoder than this run's", data=_dataset()[:6], vision_model=both)
    assert _files(folder) == before  # a complete cache is never rebuilt or overwritten


def test_an_interrupted_build_is_never_read_and_resumes(parts, tmp_path) -> None:
    model, collator = parts
    expected = _cache(model, collator, dtype=torch.float16, batch_size=1).features  # batches of one, as below
    folder = tmp_path / "cache"
    row_bytes = 17 * 32 * 2

    with _Spy(model.vision_model, fail_on_call=3), pytest.raises(RuntimeError, match="killed while encoding"):
        _cache(model, collator, cache_dir=folder, batch_size=1)
    assert not (folder / MANIFEST_FILE).exists() and not (folder / FEATURE_FILE).exists()
    partial = folder / PARTIAL_FILE
    with open(partial, "rb") as file:
        data_start = 8 + int.from_bytes(file.read(8), "little")
    assert partial.stat().st_size == data_start + 2 * row_bytes  # the two batches done before the crash
    with pytest.raises(Exception, match="(?i)incomplete|metadata|buffer|size"):
        safe_open(partial, framework="pt")  # its header declares all four rows: no reader takes it for whole
    with open(partial, "ab") as file:
        file.write(b"\x01" * 100)  # half a row: the crash came in the middle of a write

    # The build streams: before each batch only the rows written so far are on disk (nothing accumulates in RAM).
    sizes = []

    class Streaming(_Spy):
        def __call__(self, pixel_values, *args, **kwargs):
            sizes.append(partial.stat().st_size)
            return super().__call__(pixel_values, *args, **kwargs)

    with Streaming(model.vision_model) as spy:
        resumed = _cache(model, collator, cache_dir=folder, batch_size=1)
    assert spy.images == 2  # only the images the crashed build had not written
    assert sizes == [data_start + 2 * row_bytes, data_start + 3 * row_bytes]
    assert torch.equal(resumed.features, expected)
    assert not partial.exists()

    # Killed between moving the finished file in and writing the manifest: the file is taken up, not recomputed.
    (folder / MANIFEST_FILE).unlink()
    with _Spy(model.vision_model) as spy:
        finished = _cache(model, collator, cache_dir=folder, batch_size=1)
    assert spy.calls == 0 and (folder / MANIFEST_FILE).exists()
    assert torch.equal(finished.features, expected)

    # A partial build of another cache (here another dtype) is restarted, not continued.
    other = tmp_path / "other"
    with _Spy(model.vision_model, fail_on_call=2), pytest.raises(RuntimeError):
        _cache(model, collator, cache_dir=other, batch_size=1, dtype=torch.float32)
    with _Spy(model.vision_model) as spy:
        restarted = _cache(model, collator, cache_dir=other, batch_size=1)
    assert spy.images == 4
    assert torch.equal(restarted.features, expected)


def test_a_damaged_cache_is_refused(parts, tmp_path) -> None:
    model, collator = parts
    folder = tmp_path / "cache"
    _cache(model, collator, cache_dir=folder)
    with open(folder / FEATURE_FILE, "r+b") as file:
        file.truncate((folder / FEATURE_FILE).stat().st_size - 10)
    with pytest.raises(ValueError, match=r"feature cache in .* is damaged \(features.safetensors: \d+ bytes instead"):
        _cache(model, collator, cache_dir=folder)
    (folder / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* is unreadable"):
        _cache(model, collator, cache_dir=folder)
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": "something else", "version": 7}))
    with pytest.raises(ValueError, match=r"is not a version-1 modeling_blip2.feature_cache manifest"):
        _cache(model, collator, cache_dir=folder)


def test_bad_arguments_are_refused(parts, tmp_path) -> None:
    model, collator = parts
    with pytest.raises(ValueError, match=r"stores .*float16.* got dtype=torch.int8"):
        _cache(model, collator, cache_dir=tmp_path / "cache", dtype=torch.int8)
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, expected a folder"):
        _cache(model, collator, cache_dir=tmp_path / "file")
    processor = collator.image_processor
    with pytest.raises(TypeError, match="needs an image processor with to_dict"):
        FrozenFeatureDataset(_dataset(), model.vision_model, lambda *a, **k: processor(*a, **k), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        _cache(model, collator, batch_size=0)
    huge = copy.deepcopy(model.vision_model)
    original = huge.forward_features
    huge.forward_features = lambda pixel_values: original(pixel_values) * 1e6
    with pytest.raises(ValueError, match=r"exceed the range of torch.float16 .*dtype=torch.bfloat16"):
        FrozenFeatureDataset(_dataset(), huge, processor, progress=False, cache_dir=tmp_path / "huge")
    assert not (tmp_path / "huge" / MANIFEST_FILE).exists()


@pytest.mark.skipif(feature_cache_module.fcntl is None, reason="builds are serialised with fcntl.flock")
def test_concurrent_builders_wait_for_one_build(parts, tmp_path) -> None:
    model, collator = parts
    folder = tmp_path / "cache"
    started, proceed = threading.Event(), threading.Event()
    calls: dict[str, int] = {}
    original = model.vision_model.forward_features

    def encoder(pixel_values, *args, **kwargs):
        name = threading.current_thread().name
        calls[name] = calls.get(name, 0) + 1
        started.set()
        proceed.wait(timeout=30)
        return original(pixel_values, *args, **kwargs)

    model.vision_model.forward_features = encoder
    results: dict[str, FrozenFeatureDataset] = {}
    first = threading.Thread(target=lambda: results.update(first=_cache(model, collator, cache_dir=folder)), name="a")
    second = threading.Thread(
        target=lambda: results.update(second=_cache(model, collator, cache_dir=folder)), name="b"
    )
    first.start()
    assert started.wait(timeout=30)
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # waiting for the lock while the first builds
    proceed.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert calls == {"a": 1}  # the second reads what the first built
    assert torch.equal(results["first"].features, results["second"].features)


# A later run in another process: the model from its checkpoint, the dataset as it loads it, no encoder run allowed.
READER = """
import os, pickle, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
from modeling_blip2 import Blip2ForPretraining, FrozenFeatureDataset, blip2_image_processor

model_folder, cache_dir, data_file, out_file = sys.argv[1:]
model = Blip2ForPretraining.from_pretrained(model_folder)
model.freeze_vision_encoder()
def refuse(*args, **kwargs):
    raise AssertionError("the encoder ran")
model.vision_model.forward_features = refuse
with open(data_file, "rb") as file:
    data = pickle.load(file)
cached = FrozenFeatureDataset(data, model.vision_model, blip2_image_processor(28), progress=False, cache_dir=cache_dir)
torch.save(cached.features.clone(), out_file)
"""


def test_a_later_run_from_the_saved_checkpoint_reads_the_cache(parts, tmp_path) -> None:
    model, collator = parts
    built = _cache(model, collator, cache_dir=tmp_path / "cache")
    model.save_pretrained(tmp_path / "model")
    reloaded = Blip2ForPretraining.from_pretrained(tmp_path / "model")  # the fingerprint survives save and load
    reloaded.freeze_vision_encoder()
    with _Spy(reloaded.vision_model) as spy:
        reopened = _cache(reloaded, collator, cache_dir=tmp_path / "cache")
    assert spy.calls == 0
    assert torch.equal(reopened.features, built.features)


@pytest.mark.slow  # ~10 s: a fresh interpreter imports torch and transformers
def test_another_process_reads_the_cache(parts, tmp_path) -> None:
    model, collator = parts
    model.save_pretrained(tmp_path / "model")  # a later run loads the checkpoint: same fingerprint
    built = _cache(model, collator, cache_dir=tmp_path / "cache")
    with open(tmp_path / "data.pkl", "wb") as file:
        pickle.dump(_dataset(), file)
    arguments = [str(tmp_path / name) for name in ("model", "cache", "data.pkl", "read.pt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", READER, *arguments], check=True, env=env, timeout=120)
    assert torch.equal(torch.load(tmp_path / "read.pt"), built.features)  # read while this process maps it too


def test_pretrain_stage1_example_keeps_its_feature_cache_on_disk(tmp_path, monkeypatch) -> None:
    from tiny import caption_image_folder, load_example

    from modeling_blip2 import Blip2VisionModel

    tokenizer = tiny_qformer_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))).save_pretrained(tmp_path / "config")
    common = [
        "--dataset", str(caption_image_folder(tmp_path / "images")), "--config", str(tmp_path / "config"),
        "--qformer_tokenizer", str(tmp_path / "tokenizer"), "--image_id_column", "image_id", "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--warmup_steps", "0", "--report_to", "none", "--use_cpu",
        "--disable_tqdm", "true", "--save_strategy", "no", "--logging_steps", "1", "--max_text_length", "8",
        "--feature_cache_dir", str(tmp_path / "features"),
    ]  # fmt: skip
    stage1 = load_example("pretrain_stage1")
    first = stage1.main([*common, "--output_dir", str(tmp_path / "first")])
    manifest = tmp_path / "features" / MANIFEST_FILE
    written = manifest.stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the second run ran the image encoder")

    monkeypatch.setattr(Blip2VisionModel, "forward_features", refuse)
    second = stage1.main([*common, "--output_dir", str(tmp_path / "second")])
    assert manifest.stat().st_mtime_ns == written
    assert json.loads(manifest.read_text())["features"]["dtype"] == "float16"  # --cache_dtype's default
    for step in range(2):
        for name in ("loss_itc", "loss_itm", "loss_itg"):
            assert second.state.log_history[step][name] == pytest.approx(first.state.log_history[step][name]), name
