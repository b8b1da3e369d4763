"""CapFilt: nucleus sampling in the ITG head, captions ranked by the scorer's own similarity (recomputed here through
other code paths), webdataset and parquet shards in and out, restarts, the example end to end, bad input."""

from __future__ import annotations

import functools
import io
import json
import re
import tarfile
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from tiny import (
    IMAGE_SIZE,
    UNIMODAL_VIT,
    load_example,
    randomise_,
    stage1_config_dict,
    tiny_checkpoint_parts,
    tiny_qformer_tokenizer,
    tiny_vision_image_processor,
)
from webdataset_shards import sample_captions, write_webdataset_shards

from modeling_blip2 import Blip2Config, Blip2ForPretraining, load_captioner_and_scorer, load_scorer, run_capfilt
from modeling_blip2.capfilt import (
    Blip2ItgCaptioner,
    ImageTextScorer,
    candidate_captions,
    capfilt_images,
    rank_captions,
    shard_seed,
)
from modeling_blip2.processing import blip2_image_processor
from modeling_blip2.retrieval import encode_images, encode_texts, itc_similarity

ATOL = 1e-5
TEMPERATURE = 0.3  # sharpens the tiny random model's flat distribution, so that a nucleus is a small set


# -- tiny model folders ----------------------------------------------------------------------------------------------


def _stage1_model() -> Blip2ForPretraining:
    tokenizer = tiny_qformer_tokenizer()
    config = stage1_config_dict(dec_id=tokenizer.bos_token_id)
    config["qformer_config"]["vocab_size"] = len(tokenizer)  # every sampled id decodes to a word
    return randomise_(Blip2ForPretraining(Blip2Config(**config)), std=0.1, seed=3).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny models: a stage-1 model (ITG captioner and ITC scorer), a stage-2 model, and a CLIP dual encoder
    with a BERT tokenizer (offline; CLIP's BPE tokenizer would need its vocabulary files)."""
    root = tmp_path_factory.mktemp("capfilt-models")
    stage1 = root / "stage1"
    _stage1_model().save_pretrained(stage1)
    tiny_qformer_tokenizer().save_pretrained(stage1)
    blip2_image_processor(IMAGE_SIZE).save_pretrained(stage1)

    stage2 = root / "stage2"
    model, processor = tiny_checkpoint_parts(seed=1)
    model.save_pretrained(stage2)
    processor.save_pretrained(stage2)

    clip = root / "clip"
    tokenizer = tiny_qformer_tokenizer()
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    # CLIP pools the text at its end token: BERT's [SEP] here.
    text.update(vocab_size=len(tokenizer), max_position_embeddings=64)
    text.update(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id
    )
    config = transformers.CLIPConfig(vision_config=UNIMODAL_VIT, text_config=text, projection_dim=16)
    randomise_(transformers.CLIPModel(config), std=0.1, seed=4).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    tiny_vision_image_processor("clip").save_pretrained(clip)
    return {"stage1": stage1, "stage2": stage2, "clip": clip}


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_webdataset_shards(tmp_path_factory.mktemp("capfilt-shards"), num_images=6, num_shards=2)


# -- independent scores --------------------------------------------------------------------------------------------


@functools.cache
def _loaded(folder: Path, model_class: type) -> tuple:
    model = model_class.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    return model, tokenizer, transformers.AutoImageProcessor.from_pretrained(folder)


def _stage1_scores(folder: Path, image: Image.Image, texts: list[str]) -> torch.Tensor:
    """ITC similarities through the retrieval module's encoders (not the scorer's code)."""
    model, tokenizer, image_processor = _loaded(folder, Blip2ForPretraining)
    pixel_values = image_processor([image], return_tensors="pt").pixel_values
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    images = encode_images(model, pixel_values, progress=False)
    encoded = encode_texts(model, tokens.input_ids, tokens.attention_mask, progress=False)
    return itc_similarity(model, images, encoded)[0]


def _clip_scores(folder: Path, image: Image.Image, texts: list[str]) -> torch.Tensor:
    """Cosine similarities through CLIP's own forward (its logits are the scaled cosine similarities)."""
    model, tokenizer, image_processor = _loaded(folder, transformers.CLIPModel)
    pixel_values = image_processor([image], return_tensors="pt").pixel_values
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixel_values)
        return output.logits_per_image[0] / model.logit_scale.exp()


def _check_ranking(record: dict, recomputed: torch.Tensor, keep: int) -> None:
    """Stored candidate scores are the recomputed ones, and the kept captions are the top `keep` of them."""
    candidates = record["candidates"]
    assert len(candidates) == len(recomputed) and len(set(candidates)) == len(candidates)
    assert torch.allclose(torch.tensor(record["candidate_scores"]), recomputed, atol=ATOL)
    order = recomputed.argsort(descending=True, stable=True)[:keep].tolist()
    assert record["captions"] == [candidates[index] for index in order]
    assert torch.allclose(torch.tensor(record["scores"]), recomputed[order], atol=ATOL)
    assert record["scores"] == sorted(record["scores"], reverse=True)
    if record["original_caption"] is not None:
        assert candidates[0] == record["original_caption"]
        assert record["original_score"] == pytest.approx(float(recomputed[0]), abs=ATOL)


def _read_webdataset(folder: Path) -> list[dict]:
    files = sorted(str(path) for path in folder.glob("*.tar"))
    dataset = datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    return list(dataset.decode(False))


# -- the ITG head's nucleus sampling --------------------------------------------------------------------------------


def test_itg_generate_samples_from_the_nucleus_and_several_sequences_per_image() -> None:
    model = _stage1_model()
    pixel_values = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    dec = model.config.qformer_config.bos_token_id

    def sample(count: int, tokens: int, **options: object) -> torch.Tensor:
        generator = torch.Generator().manual_seed(7)
        images = pixel_values.expand(count, -1, -1, -1)
        options = {"temperature": TEMPERATURE, **options}
        return model.generate(
            pixel_values=images, max_new_tokens=tokens, do_sample=True, generator=generator, **options
        )

    greedy = model.generate(pixel_values=pixel_values.expand(3, -1, -1, -1), max_new_tokens=6)
    assert torch.equal(sample(3, 6, top_p=1e-6), greedy)  # a nucleus of one token is greedy search
    assert torch.equal(sample(3, 6, top_p=1.0), sample(3, 6))  # the whole distribution: plain sampling

    # The first token's nucleus, from the ITG head run on [DEC] (the non-incremental path) and transformers' warper.
    with torch.no_grad():
        logits = model.itg_logits(model.image_embeddings(pixel_values), torch.tensor([[dec]]), None)[:, 0]
    warped = transformers.TopPLogitsWarper(top_p=0.5)(None, logits.float() / TEMPERATURE)
    nucleus = set(torch.isfinite(warped[0]).nonzero().flatten().tolist())
    assert 2 <= len(nucleus) < logits.shape[-1] // 2  # the filter matters for this distribution
    drawn = set(sample(400, 1, top_p=0.5)[:, 1].tolist())
    assert len(drawn) >= 2 and drawn <= nucleus  # several tokens drawn, none outside the nucleus
    assert len(set(sample(400, 1)[:, 1].tolist()) - nucleus) > 0  # without the filter, others come up

    # Several sequences per image: the same as the image repeated (its encoding is computed once and repeated).
    images = torch.cat([pixel_values, -pixel_values])
    assert torch.equal(
        model.generate(pixel_values=images, max_new_tokens=5, num_return_sequences=3),
        model.generate(pixel_values=images.repeat_interleave(3, dim=0), max_new_tokens=5),
    )
    generators = [torch.Generator().manual_seed(3) for _ in range(2)]
    options = {"max_new_tokens": 5, "do_sample": True, "top_p": 0.8, "temperature": TEMPERATURE}
    assert torch.equal(
        model.generate(pixel_values=images, num_return_sequences=3, generator=generators[0], **options),
        model.generate(pixel_values=images.repeat_interleave(3, dim=0), generator=generators[1], **options),
    )

    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        sample(1, 1, top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(1, 1, temperature=0.0)
    with pytest.raises(ValueError, match="num_return_sequences must be >= 1"):
        sample(1, 1, num_return_sequences=0)


def test_itg_nucleus_ranks_the_top_tokens_or_the_whole_vocabulary_row_by_row() -> None:
    """Rows whose nucleus lies within their top 256 tokens rank only those, the others sort the whole vocabulary:
    one batch with both kinds of rows (fixed next-token logits over 400 tokens) samples from transformers' nucleus."""
    model = _stage1_model()
    generator = torch.Generator().manual_seed(1)
    flat, peaked = torch.randn(400, generator=generator) * 0.1, torch.randn(400, generator=generator) * 4

    class FixedLogits(torch.nn.Module):
        def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # even rows flat, odd rows peaked
            return torch.stack([flat, peaked])[torch.arange(hidden.shape[0]) % 2]

    model.qformer_lm_head = FixedLogits()
    images = torch.zeros(600, 3, IMAGE_SIZE, IMAGE_SIZE)
    drawn = model.generate(pixel_values=images, max_new_tokens=1, do_sample=True, top_p=0.9, generator=generator)
    for logits, tokens, sizes in ((flat, drawn[0::2, 1], (257, 400)), (peaked, drawn[1::2, 1], (2, 256))):
        warped = transformers.TopPLogitsWarper(top_p=0.9)(None, logits[None])
        nucleus = set(torch.isfinite(warped[0]).nonzero().flatten().tolist())
        assert sizes[0] <= len(nucleus) < sizes[1]  # beyond the top 256 (sorted), and within them
        assert set(tokens.tolist()) <= nucleus and len(set(tokens.tolist())) >= min(len(nucleus), 50) // 2
    assert set(drawn[0::2, 1].tolist()) - set(flat.topk(256).indices.tolist())  # tokens past the top 256 come up


# -- ranking ------------------------------------------------------------------------------------------------------


def test_candidates_and_ranking() -> None:
    assert candidate_captions(" a  red square ", ["a red square", "", "  ", "a dog", "a dog"]) == [
        "a red square",
        "a dog",
    ]
    assert candidate_captions(None, ["a dog"]) == ["a dog"]
    assert rank_captions(["a", "b", "c", "d"], [0.1, 0.3, 0.3, 0.2], keep=3) == (["b", "c", "d"], [0.3, 0.3, 0.2])
    with pytest.raises(ValueError, match="one score per candidate"):
        rank_captions(["a", "b"], [0.1], keep=1)


def test_capfilt_images_keeps_the_best_by_the_scorers_similarity(folders: dict[str, Path]) -> None:
    captioner, scorer = load_captioner_and_scorer(folders["stage1"], folders["stage1"], device="cpu")
    assert isinstance(captioner, Blip2ItgCaptioner) and scorer.model is captioner.model  # loaded once
    images = [Image.new("RGB", (30, 26), colour) for colour in ("red", "navy", "gold")]
    originals = ["a red square", None, "the yellow square on the left"]
    results = capfilt_images(images, originals, captioner, scorer, num_captions=5, keep=3)
    for image, original, result in zip(images, originals, results, strict=True):
        assert len(result.captions) == min(3, len(result.candidates)) and result.original_caption == original
        recomputed = _stage1_scores(folders["stage1"], image, result.candidates)
        _check_ranking(
            {
                "candidates": result.candidates,
                "candidate_scores": result.candidate_scores,
                "captions": result.captions,
                "scores": result.scores,
                "original_caption": result.original_caption,
                "original_score": result.original_score,
            },
            recomputed,
            keep=3,
        )
    assert results[1].original_score is None and len(results[1].candidates) <= 5


# -- shards end to end ---------------------------------------------------------------------------------------------


def test_stage1_itg_and_itc_over_webdataset_shards(folders: dict[str, Path], shards: list[Path], tmp_path) -> None:
    captioner, scorer = load_captioner_and_scorer(folders["stage1"], folders["stage1"], device="cpu")
    output = tmp_path / "out"
    report = run_capfilt(
        [str(shards[0].parent / "*.tar")],
        captioner,
        scorer,
        output,
        num_captions=4,
        keep=2,
        batch_size=4,
        save_candidates=True,
        progress=False,
    )
    assert (report.shards_processed, report.shards_skipped, report.images) == (2, 0, 6)
    assert report.images_per_second > 0
    assert json.loads((output / "capfilt_report.json").read_text())["images"] == 6
    assert sorted(path.name for path in output.iterdir()) == [
        "capfilt_report.json",
        "shard-00000.tar",
        "shard-00001.tar",
    ]

    records = _read_webdataset(output)
    inputs = {row["__key__"]: row for row in _read_webdataset(shards[0].parent)}
    assert [row["__key__"] for row in records] == [f"sample{index:06d}" for index in range(6)]
    for index, row in enumerate(records):
        record = row["json"]
        assert row["jpg"]["bytes"] == inputs[row["__key__"]]["jpg"]["bytes"]  # the image as it came
        assert record["image_id"] == index  # the input's metadata carried over
        assert record["original_caption"] == sample_captions(index)[0]
        assert row["txt"] == record["captions"][0]
        image = Image.open(io.BytesIO(row["jpg"]["bytes"])).convert("RGB")
        _check_ranking(record, _stage1_scores(folders["stage1"], image, record["candidates"]), keep=2)
    # The captions come from the ITG head: words of the Q-Former tokenizer only.
    words = set(tiny_qformer_tokenizer().get_vocab())
    synthetic = [caption for row in records for caption in row["json"]["candidates"][1:]]
    assert synthetic and all(set(re.findall(r"[^\s.?]+", caption)) <= words for caption in synthetic)


def test_stage2_captioner_and_clip_scorer_through_the_example(folders: dict[str, Path], tmp_path) -> None:
    # Parquet in, parquet out; the original captions live in a "text" column, the images are PNG.
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue", "white", "black")]
    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "image_id": datasets.Value("int64")}
    )
    source = datasets.Dataset.from_dict(
        {"image": images, "text": [f"a {c} square" for c in "abcde"], "image_id": list(range(5))}, features=features
    )
    source.to_parquet(tmp_path / "part-0.parquet")
    argv = [
        *("--data_files", str(tmp_path / "*.parquet"), "--captioner", str(folders["stage2"])),
        *("--scorer", str(folders["clip"]), "--output_dir", str(tmp_path / "out"), "--output_format", "parquet"),
        *("--num_captions", "3", "--keep", "2", "--batch_size", "2", "--max_new_tokens", "8", "--save_candidates"),
        *("--no_progress", "--device", "cpu"),
    ]
    report = load_example("capfilt").main(argv)
    assert (report.images, report.settings["captioner"]) == (5, str(folders["stage2"]))
    output = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train")
    assert len(output) == 5 and output.features["image"] == datasets.Image()
    for index, row in enumerate(output):
        assert row["image_id"] == index and row["original_caption"] == f"a {'abcde'[index]} square"
        assert row["text"] == row["captions"][0] and row["key"] == f"part-0_{index:08d}"
        assert isinstance(row["image"], Image.Image) and row["image"].format == "PNG"
        _check_ranking(row, _clip_scores(folders["clip"], images[index], row["candidates"]), keep=2)


def test_restart_skips_finished_shards_and_redoes_an_unfinished_one(folders: dict[str, Path], tmp_path) -> None:
    shards = write_webdataset_shards(tmp_path / "in", num_images=6, num_shards=3)
    captioner, scorer = load_captioner_and_scorer(folders["stage1"], folders["stage1"], device="cpu")
    options = {"num_captions": 3, "keep": 2, "batch_size": 1, "progress": False}
    run_capfilt([str(path) for path in shards], captioner, scorer, tmp_path / "reference", **options)

    class Counting:
        def __init__(self, fail_on: int | None = None) -> None:
            self.calls, self.fail_on = 0, fail_on

        def __call__(self, images: list, num_captions: int) -> list[list[str]]:
            self.calls += 1
            if self.calls == self.fail_on:
                raise RuntimeError("stopped")
            return captioner(images, num_captions)

    output = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stopped"):  # stops inside the second shard
        run_capfilt([str(path) for path in shards], Counting(fail_on=4), scorer, output, **options)
    assert sorted(path.name for path in output.iterdir()) == ["shard-00000.tar"]
    (output / "shard-00001.tar.partial").write_bytes(b"left by a killed run")

    counting = Counting()
    report = run_capfilt([str(path) for path in shards], counting, scorer, output, **options)
    assert (report.shards_skipped, report.shards_processed, report.images, counting.calls) == (1, 2, 4, 4)
    names = ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    assert sorted(path.name for path in output.glob("shard-*")) == names
    for name in names:  # the same bytes as the uninterrupted run: sampling is seeded per shard
        assert (output / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert shard_seed(0, shards[0]) != shard_seed(0, shards[1])

    again = run_capfilt([str(path) for path in shards], counting, scorer, output, **options)
    assert (again.shards_skipped, again.images, again.images_per_second, counting.calls) == (3, 0, None, 4)


# -- bad input ------------------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error(folders: dict[str, Path], shards: list[Path], tmp_path) -> None:
    example = load_example("capfilt")
    common = ["--output_dir", str(tmp_path / "out"), "--no_progress", "--device", "cpu"]
    stage1, stage2, clip = (str(folders[name]) for name in ("stage1", "stage2", "clip"))

    def run(data_files: str, captioner: str, scorer: str, *extra: str) -> None:
        example.main(["--data_files", data_files, "--captioner", captioner, "--scorer", scorer, *common, *extra])

    data = str(shards[0])
    with pytest.raises(ValueError, match=r"keep must be between 1 and num_captions \+ 1 = 11.*got keep=12"):
        run(data, stage1, stage1, "--num_captions", "10", "--keep", "12")
    with pytest.raises(ValueError, match="num_captions must be >= 1"):
        run(data, stage1, stage1, "--num_captions", "0", "--keep", "1")
    with pytest.raises(FileNotFoundError, match="captioner: expected a model folder.*missing"):
        run(data, str(tmp_path / "missing"), stage1)
    with pytest.raises(FileNotFoundError, match="scorer: expected a model folder holding config.json"):
        run(data, stage1, str(tmp_path))
    with pytest.raises(ValueError, match="captioner: expected a BLIP-2 folder.*'clip'"):
        run(data, clip, clip)
    with pytest.raises(ValueError, match="scorer: .* without the contrastive \\(ITC\\) heads"):
        run(data, stage2, stage2)
    with pytest.raises(ValueError, match="a prompt needs a stage-2 captioner"):
        run(data, stage1, stage1, "--prompt", "a photo of")
    with pytest.raises(ValueError, match="output_format must be one of"):
        run(data, stage1, stage1, "--output_format", "csv")

    # No images: nothing matches, a shard of another kind, shards without samples, no caption column.
    with pytest.raises(FileNotFoundError, match="nothing matches"):
        run(str(tmp_path / "none" / "*.tar"), stage1, stage1)
    (tmp_path / "notes.txt").write_text("not a shard")
    with pytest.raises(ValueError, match="is not a webdataset .tar or a .parquet shard"):
        run(str(tmp_path / "notes.txt"), stage1, stage1)
    empty = tmp_path / "empty"
    empty.mkdir()
    tarfile.open(empty / "shard-00000.tar", "w").close()
    with pytest.raises(ValueError, match="no images: the 1 input shard"):
        run(str(empty), stage1, stage1)
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": [1]}).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no caption column among .*name it"):
        run(str(tmp_path / "x.parquet"), stage1, stage1)


def test_scorer_refuses_a_model_without_both_feature_getters() -> None:
    with pytest.raises(TypeError, match="dual encoder with get_image_features and get_text_features"):
        ImageTextScorer(torch.nn.Linear(2, 2), None, None)


def test_dual_encoder_scores_are_cosine_similarities(folders: dict[str, Path]) -> None:
    scorer = load_captioner_and_scorer(folders["stage1"], folders["clip"], device="cpu")[1]
    image = Image.new("RGB", (30, 30), "teal")
    texts = [["a photo of a cat", "the blue square", "dog"]]
    scores = scorer([image], texts)[0]
    features = scorer.encode_images([image])
    assert features.shape == (1, 16) and torch.allclose(features.norm(dim=-1), torch.ones(1))
    assert torch.allclose(scores, F.cosine_similarity(features, scorer.encode_texts(texts[0])), atol=ATOL)
    assert torch.allclose(scores, _clip_scores(folders["clip"], image, texts[0]), atol=ATOL)


def test_siglip_scores_its_texts_padded_to_its_length(tmp_path) -> None:
    """SigLIP was trained on texts padded to 64 tokens and pools the last position: the scorer pads them so, and its
    scores are SigLIP's own logits without their scale and bias."""
    tokenizer = tiny_qformer_tokenizer()
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4}
    config = transformers.SiglipConfig(text_config={**text, "vocab_size": len(tokenizer)}, vision_config=UNIMODAL_VIT)
    model = randomise_(transformers.SiglipModel(config), std=0.1, seed=5).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tiny_vision_image_processor("siglip").save_pretrained(tmp_path)
    scorer = load_scorer(tmp_path, device="cpu")
    assert (scorer.text_padding, scorer.max_text_length) == ("max_length", 64)
    image, texts = Image.new("RGB", (30, 30), "teal"), ["a photo of a cat", "the blue square", "dog"]
    tokens = tokenizer(texts, padding="max_length", max_length=64, return_tensors="pt")
    pixel_values = tiny_vision_image_processor("siglip")([image], return_tensors="pt").pixel_values
    with torch.no_grad():
        output = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixel_values)
        expected = (output.logits_per_image[0] - model.logit_bias) / model.logit_scale.exp()
    assert torch.allclose(scorer([image], [texts])[0], expected, atol=ATOL)


def test_unreadable_images_are_skipped_and_counted(folders: dict[str, Path], tmp_path) -> None:
    good = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(good, format="PNG")
    with tarfile.open(tmp_path / "web.tar", "w") as archive:
        for key, payload in (("a", good.getvalue()), ("b", b"not an image"), ("c", good.getvalue())):
            for name, data in ((f"{key}.png", payload), (f"{key}.txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    captioner, scorer = load_captioner_and_scorer(folders["stage1"], folders["stage1"], device="cpu")
    report = run_capfilt(tmp_path / "web.tar", captioner, scorer, tmp_path / "out", num_captions=2, progress=False)
    assert (report.images, report.unreadable_images) == (2, 1)
    rows = _read_webdataset(tmp_path / "out")
    assert [row["__key__"] for row in rows] == ["a", "c"] and rows[0]["png"]["bytes"] == good.getvalue()
    assert [row["json"]["original_caption"] for row in rows] == ["caption a", "caption c"]
