"""Training from streams (webdataset shards, parquet) and from caption lists: keys, shuffling, resume, examples."""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image
from test_trainer import _StopAfter
from tiny import load_example, stage1_config_dict, tiny_checkpoint_parts, tiny_qformer_tokenizer
from webdataset_shards import sample_captions, sample_key, write_webdataset_shards

from modeling_blip2 import (
    Blip2CaptionCollator,
    Blip2Config,
    Blip2ForPretraining,
    Blip2ImageTextCollator,
    Blip2Trainer,
    Blip2TrainingArguments,
    blip2_image_processor,
)
from modeling_blip2.columns import SAMPLE_KEY, caption_values, image_id_value, stable_string_id
from modeling_blip2.streaming import StreamPosition, _SampleKeyedStream

NUM_IMAGES = 10


def _webdataset(folder: Path, num_images: int = NUM_IMAGES, shards: int = 3, captions: int = 3, buffer: int = 4):
    paths = write_webdataset_shards(folder, num_images, shards, captions_per_image=captions)
    stream = datasets.load_dataset(
        "webdataset", data_files=[str(path) for path in paths], split="train", streaming=True
    )
    return stream.shuffle(seed=0, buffer_size=buffer) if buffer else stream


def _parquet(folder: Path, num_images: int = NUM_IMAGES, captions: int = 2) -> datasets.IterableDataset:
    from webdataset_shards import sample_image

    rows = {
        "image": [sample_image(index) for index in range(num_images)],
        "captions": [sample_captions(index, captions) for index in range(num_images)],
        "image_id": list(range(num_images)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    table = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    for part in range(2):
        table.shard(2, part, contiguous=True).to_parquet(str(folder / f"part-{part}.parquet"))
    files = sorted(str(path) for path in folder.glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train", streaming=True)


def _read(stream: _SampleKeyedStream, epoch: int) -> list[tuple[tuple[int, int], str]]:
    stream.set_epoch(epoch)
    return [(example[SAMPLE_KEY], example["__key__"]) for example in stream]


# -- caption lists and image ids ----------------------------------------------------------------------------------
def test_caption_lists_draw_one_caption_per_example_seeded_by_sample_and_epoch() -> None:
    captions = [f"caption {i}" for i in range(6)]
    fallback = random.Random(0)

    def draw(epoch: int, index: int, seed: int = 0) -> str:
        example = {"text": captions, SAMPLE_KEY: (epoch, index)}
        return caption_values([example], "text", seed, fallback)[0]

    assert draw(0, 3) == draw(0, 3)  # reproducible: a resumed run draws the same caption
    by_epoch = {draw(epoch, 3) for epoch in range(12)}
    by_index = {draw(0, index) for index in range(12)}
    assert len(by_epoch) > 1 and len(by_index) > 1 and by_epoch <= set(captions)
    assert {draw(0, 3, seed) for seed in range(12)} != {draw(0, 3)}
    # Plain strings pass through; a caption list's draw does not depend on the augmentation's generator.
    assert caption_values([{"text": " one ", SAMPLE_KEY: (0, 0)}], "text", 0, fallback) == ["one"]
    # Without a key (a collator used outside Blip2Trainer) the collator's own generator draws.
    unkeyed = [caption_values([{"text": captions}], "text", 0, random.Random(5))[0] for _ in range(2)]
    assert unkeyed[0] == unkeyed[1]


def test_caption_list_errors_name_the_example() -> None:
    fallback = random.Random(0)
    good = {"json": {"captions": ["a cat"]}, "__key__": "sample000001"}
    bad = {"json": {"captions": []}, "__key__": "sample000002"}
    with pytest.raises(ValueError, match=r"example 1 \(__key__ 'sample000002'\) has an empty list of captions"):
        caption_values([good, bad], "json.captions", 0, fallback)
    with pytest.raises(ValueError, match=r"example 0 has an empty or non-string caption in its list .*: 3"):
        caption_values([{"text": ["fine", 3]}], "text", 0, fallback)
    with pytest.raises(
        ValueError, match=r"example 0 has no 'json.caption' column .*nested: \{'json': \['captions'\]\}"
    ):
        caption_values([good], "json.caption", 0, fallback)
    with pytest.raises(ValueError, match="expected a string or a list of strings"):
        caption_values([{"text": {"a": 1}}], "text", 0, fallback)


def test_captions_of_one_image_share_its_image_id_in_a_batch(tmp_path) -> None:
    tokenizer = tiny_qformer_tokenizer()
    collator = Blip2ImageTextCollator(blip2_image_processor(28), tokenizer, max_length=8, text_column="json.captions")
    image = Image.new("RGB", (32, 32), (200, 20, 20))
    examples = [
        {"jpg": image, "json": {"captions": ["a red square", "the red photo"]}, "__key__": key, SAMPLE_KEY: (0, i)}
        for i, key in enumerate(["sample000001", "sample000002", "sample000001"])
    ]
    collator.image_column = "jpg"
    ids = collator(examples)["image_ids"].tolist()  # no id column: the webdataset key, hashed
    assert ids[0] == ids[2] != ids[1] and ids[0] == stable_string_id("sample000001")
    for example, image_id in zip(examples, (7, 8, 7), strict=True):
        example["json"]["image_id"] = image_id
    collator.image_id_column = "json.image_id"
    assert collator(examples)["image_ids"].tolist() == [7, 8, 7]
    assert image_id_value("cat.jpg", 0, "file") == image_id_value("cat.jpg", 5, "file") != image_id_value("a", 0, "f")
    assert stable_string_id("sample000001") == 3234532927386915569  # stable across processes and runs


# -- the keyed stream -----------------------------------------------------------------------------------------------
def test_stream_numbers_each_pass_and_reshuffles_shards_and_buffer_every_pass(tmp_path) -> None:
    stream = _SampleKeyedStream(_webdataset(tmp_path / "shards", shards=3, buffer=4))
    first, again, second = _read(stream, 0), _read(stream, 0), _read(stream, 1)
    assert [key for key, _ in first] == [(0, i) for i in range(NUM_IMAGES)]
    assert [key for key, _ in second] == [(1, i) for i in range(NUM_IMAGES)]
    assert first == again  # a pass is a function of (seed, epoch)
    assert (
        sorted(name for _, name in first)
        == sorted(name for _, name in second)
        == [sample_key(i) for i in range(NUM_IMAGES)]
    )
    assert [name for _, name in first] != [name for _, name in second]  # another order in the next pass


def test_a_started_stream_drops_the_consumed_examples_of_its_pass_only(tmp_path) -> None:
    stream = _SampleKeyedStream(_webdataset(tmp_path / "shards"))
    whole = [_read(stream, epoch) for epoch in (0, 1)]
    stream.start(epoch_offset=1, epoch=1, consumed=[4])  # resumed in pass 1, 4 examples in
    assert _read(stream, 0) == whole[1][4:]  # transformers' epoch 0 is pass 1
    assert [key for key, _ in _read(stream, 1)] == [(2, i) for i in range(NUM_IMAGES)]  # the next pass: whole


def test_stream_workers_read_disjoint_shards_and_resume_per_worker(tmp_path) -> None:
    source = _webdataset(tmp_path / "shards", num_images=12, shards=4, buffer=0)
    stream = _SampleKeyedStream(source, num_workers=2)

    def batches() -> list[list]:
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=list)
        return [[(example[SAMPLE_KEY], example["__key__"]) for example in batch] for batch in loader]

    whole = batches()
    seen = [item for batch in whole for item in batch]
    assert sorted(name for _, name in seen) == [sample_key(i) for i in range(12)]  # every sample once
    assert len({key for key, _ in seen}) == 12 and all(len({key[1] % 2 for key, _ in b}) == 1 for b in whole)
    position = StreamPosition()
    position.reset(num_workers=2)
    position.advance(torch.tensor([key for batch in whole[:3] for key, _ in batch]), accelerator=_OneProcess())
    state = position.state()["attributes"]
    assert state == {"epoch": 0, "consumed": [4, 2]}  # batches 0, 2 from worker 0; batch 1 from worker 1
    stream.start(epoch_offset=0, epoch=0, consumed=state["consumed"])
    rest = [item for batch in batches() for item in batch]
    assert sorted(rest) == sorted(seen[6:])  # nothing seen twice, nothing left out


class _OneProcess:
    num_processes = 1


def test_persistent_stream_workers_read_the_next_pass(tmp_path) -> None:
    """Two persistent DataLoader workers (3 batches of 2 each per pass) see the pass number change in shared memory:
    the 8 steps end 2 batches into pass 1, one from each worker."""
    model, tokenizer = _stage1_parts()
    stream = _webdataset(tmp_path / "shards", num_images=12, shards=4, buffer=0)
    args = _args(
        tmp_path / "run",
        max_steps=8,
        per_device_train_batch_size=2,
        dataloader_num_workers=2,
        dataloader_persistent_workers=True,
    )
    trainer = _stage1_trainer(model, tokenizer, stream, args)
    trainer.train()
    assert trainer.state.global_step == 8
    assert trainer._stream_position().state()["attributes"] == {"epoch": 1, "consumed": [2, 2]}


# -- training through Blip2Trainer ----------------------------------------------------------------------------------
def _stage1_parts():
    tokenizer = tiny_qformer_tokenizer()
    config = Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]")))
    torch.manual_seed(0)
    return Blip2ForPretraining(config), tokenizer


def _args(output_dir: Path, **overrides) -> Blip2TrainingArguments:
    settings = {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-4,
        "warmup_steps": 0,
        "max_steps": 6,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "seed": 0,
        "use_cpu": True,
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return Blip2TrainingArguments(**settings)


def _stage1_trainer(model, tokenizer, dataset, args, **kwargs) -> Blip2Trainer:
    collator = Blip2ImageTextCollator(
        blip2_image_processor(28),
        tokenizer,
        max_length=8,
        augment=True,
        image_column="jpg",
        text_column="json.captions",
        image_id_column="json.image_id",
    )
    return Blip2Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, **kwargs)


def test_stage1_streams_webdataset_shards_past_the_end_and_resumes_exactly(tmp_path) -> None:
    """10 images at batch 4: steps 1-3 read pass 0 (4 + 4 + 2), steps 4-6 pass 1, reshuffled. A run stopped after
    step 4 (mid pass 1) and resumed from its checkpoint ends with the uninterrupted run's weights."""
    model, tokenizer = _stage1_parts()
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    stream = _webdataset(tmp_path / "shards")
    trainer = _stage1_trainer(model, tokenizer, stream, _args(tmp_path / "whole"))
    trainer.train()
    assert trainer.state.global_step == 6
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    assert trainer._stream_position().state()["attributes"] == {"epoch": 1, "consumed": [10]}
    expected = {name: value.clone() for name, value in model.state_dict().items()}

    saving = {"save_strategy": "steps", "save_steps": 2}
    interrupted_model, _ = _stage1_parts()
    interrupted_model.load_state_dict(initial)
    interrupted = _stage1_trainer(
        interrupted_model, tokenizer, stream, _args(tmp_path / "cut", **saving), callbacks=[_StopAfter(4)]
    )
    interrupted.train()
    assert interrupted.state.global_step == 4
    checkpoint = tmp_path / "cut" / "checkpoint-4"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["StreamPosition"]["attributes"] == {"epoch": 1, "consumed": [4]}

    mismatched = _stage1_trainer(
        interrupted_model, tokenizer, stream, _args(tmp_path / "cut", dataloader_num_workers=2, **saving)
    )
    with pytest.raises(ValueError, match="holds 1 of them .* but this run has dataloader_num_workers=2"):
        mismatched.train(resume_from_checkpoint=str(checkpoint))
    resumed_model, _ = _stage1_parts()
    resumed_model.load_state_dict(initial)
    resumed = _stage1_trainer(resumed_model, tokenizer, stream, _args(tmp_path / "cut", **saving))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    for name, value in expected.items():
        assert torch.allclose(resumed_model.state_dict()[name], value, atol=1e-6), name


def test_stage1_streams_parquet_and_refuses_a_stream_without_max_steps(tmp_path) -> None:
    model, tokenizer = _stage1_parts()
    stream = _parquet(tmp_path / "parquet")
    collator = Blip2ImageTextCollator(blip2_image_processor(28), tokenizer, max_length=8, text_column="captions")
    args = _args(tmp_path / "run", max_steps=4)
    trainer = Blip2Trainer(model=model, args=args, train_dataset=stream, data_collator=collator)
    trainer.train()
    assert trainer.state.global_step == 4
    assert trainer._stream_position().state()["attributes"] == {"epoch": 1, "consumed": [4]}
    with pytest.raises(ValueError, match="max_steps has to be specified"):  # transformers' own refusal
        Blip2Trainer(
            model=model, args=_args(tmp_path / "b", max_steps=-1), train_dataset=stream, data_collator=collator
        ).train()


@pytest.mark.parametrize("source", ["webdataset", "parquet"])
def test_stage2_streams_caption_lists(tmp_path, source: str) -> None:
    model, processor = tiny_checkpoint_parts()
    if source == "webdataset":
        stream, columns = _webdataset(tmp_path / "shards", captions=2), {"image_column": "jpg"}
        columns["text_column"] = "json.captions"
    else:
        stream, columns = _parquet(tmp_path / "parquet"), {"text_column": "captions"}
    collator = Blip2CaptionCollator(processor, is_encoder_decoder=False, max_length=24, **columns)
    model.freeze_language_model()
    trainer = Blip2Trainer(
        model=model, args=_args(tmp_path / "run", max_steps=2), train_dataset=stream, data_collator=collator
    )
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


# -- the examples -----------------------------------------------------------------------------------------------------
_COMMON = [
    "--report_to", "none", "--use_cpu", "--disable_tqdm", "true", "--logging_steps", "1", "--warmup_steps", "0",
    "--per_device_train_batch_size", "4", "--shuffle_buffer_size", "4",
]  # fmt: skip


def test_pretrain_examples_stream_webdataset_shards(tmp_path, monkeypatch) -> None:
    from tiny import TINY_RANDOM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_webdataset_shards(tmp_path / "shards", NUM_IMAGES, 3, captions_per_image=3)
    monkeypatch.chdir(tmp_path)  # the glob is relative, as typed on a command line
    tokenizer = tiny_qformer_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))).save_pretrained(tmp_path / "config")
    data = ["--dataset", "webdataset", "--data_files", "shards/*.tar", "--streaming"]
    stage1 = load_example("pretrain_stage1").main(
        [*data, *_COMMON, "--config", str(tmp_path / "config"), "--qformer_tokenizer", str(tmp_path / "tokenizer"),
         "--max_text_length", "8", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2",
         "--output_dir", str(tmp_path / "stage1")]
    )  # fmt: skip
    assert stage1.state.global_step == 4
    collator = stage1.data_collator
    assert (collator.image_column, collator.text_column, collator.image_id_column) == (
        "jpg",
        "json.captions",
        "json.image_id",
    )
    assert stage1._stream_position().state()["attributes"] == {"epoch": 1, "consumed": [4]}
    checkpoint = tmp_path / "stage1" / "checkpoint-4"
    resumed = load_example("pretrain_stage1").main(
        [*data, *_COMMON, "--config", str(tmp_path / "config"), "--qformer_tokenizer", str(tmp_path / "tokenizer"),
         "--max_text_length", "8", "--max_steps", "5", "--save_strategy", "no",
         "--output_dir", str(tmp_path / "stage1"), "--resume_from_checkpoint", str(checkpoint)]
    )  # fmt: skip
    assert resumed.state.global_step == 5
    assert resumed._stream_position().state()["attributes"] == {"epoch": 1, "consumed": [8]}

    llm_config = Blip2Config.from_pretrained(TINY_RANDOM).text_config
    AutoModelForCausalLM.from_config(llm_config).save_pretrained(tmp_path / "llm")
    AutoTokenizer.from_pretrained(TINY_RANDOM).save_pretrained(tmp_path / "llm")
    stage2 = load_example("pretrain_stage2").main(
        [*data, *_COMMON, "--stage1", str(tmp_path / "stage1"), "--language_model", str(tmp_path / "llm"),
         "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(tmp_path / "stage2")]
    )  # fmt: skip
    assert stage2.state.global_step == 2 and stage2.state.log_history[0]["loss"] > 0
    with pytest.raises(ValueError, match="--streaming reads a dataset of unknown length: pass --max_steps"):
        load_example("pretrain_stage1").main(
            [*data, *_COMMON, "--config", str(tmp_path / "config"), "--output_dir", str(tmp_path / "x")]
        )


def test_capfilt_output_streams_into_stage1_with_its_caption_lists(tmp_path, monkeypatch) -> None:
    """CapFilt's webdataset output (kept captions in `.json`, best first; the input's image id carried over) trains
    stage 1 through the example with the default webdataset columns."""
    from tiny import randomise_

    from modeling_blip2.capfilt import load_captioner_and_scorer, run_capfilt

    tokenizer = tiny_qformer_tokenizer()
    config = stage1_config_dict(dec_id=tokenizer.bos_token_id)
    config["qformer_config"]["vocab_size"] = len(tokenizer)
    randomise_(Blip2ForPretraining(Blip2Config(**config)), std=0.1, seed=3).save_pretrained(tmp_path / "capfilt")
    tokenizer.save_pretrained(tmp_path / "capfilt")
    blip2_image_processor(28).save_pretrained(tmp_path / "capfilt")
    write_webdataset_shards(tmp_path / "web", 8, 2)
    captioner, scorer = load_captioner_and_scorer(tmp_path / "capfilt", tmp_path / "capfilt", device="cpu")
    run_capfilt(
        [str(tmp_path / "web" / "*.tar")],
        captioner,
        scorer,
        tmp_path / "shards",
        num_captions=4,
        keep=2,
        batch_size=4,
        progress=False,
    )
    Blip2Config(**stage1_config_dict(tokenizer.convert_tokens_to_ids("[DEC]"))).save_pretrained(tmp_path / "config")
    monkeypatch.chdir(tmp_path)
    trainer = load_example("pretrain_stage1").main(
        ["--dataset", "webdataset", "--data_files", "shards/*.tar", "--streaming", *_COMMON,
         "--config", str(tmp_path / "config"), "--qformer_tokenizer", str(tmp_path / "capfilt"),
         "--max_text_length", "8", "--max_steps", "3", "--save_strategy", "no", "--output_dir", str(tmp_path / "run")]
    )  # fmt: skip
    collator = trainer.data_collator
    assert (collator.text_column, collator.image_id_column) == ("json.captions", "json.image_id")
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
