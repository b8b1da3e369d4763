"""The processor: image conversion and validation, image tokens, padding sides, Q-Former tokenizer, save/load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_RANDOM, tiny_checkpoint_parts, tiny_qformer_tokenizer
from transformers import AutoTokenizer, BertTokenizerFast

from modeling_blip2 import Blip2ImageTextProcessor, blip2_image_processor, to_rgb_image
from modeling_blip2.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QFORMER_START_TOKEN

QUERIES = 4


@pytest.fixture(scope="module")
def processor() -> Blip2ImageTextProcessor:
    return tiny_checkpoint_parts()[1]


def _bert_tokenizer(tmp_path) -> BertTokenizerFast:
    return tiny_qformer_tokenizer()


def test_image_modes_become_rgb() -> None:
    white_rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))  # fully transparent -> composited over white
    assert to_rgb_image(white_rgba).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb_image(Image.new("L", (3, 2), 77)).getpixel((1, 1)) == (77, 77, 77)
    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0] * 256)
    assert to_rgb_image(palette).getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert to_rgb_image(sixteen).getpixel((0, 0)) == (255, 255, 255)
    mid = Image.fromarray(np.full((4, 5), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    assert to_rgb_image(mid).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb_image(np.zeros((3, 6, 5), dtype=np.float32)).size == (5, 6)  # channels-first float
    assert to_rgb_image(torch.ones(6, 5, 3)).getpixel((0, 0)) == (255, 255, 255)  # floats in [0, 1]
    assert to_rgb_image(Image.new("CMYK", (2, 2))).mode == "RGB"
    assert to_rgb_image(Image.new("RGB", (1, 1))).size == (1, 1)  # 1x1 is fine


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (None, "got None"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "non-empty image"),
        (Image.new("RGB", (0, 5)), "non-empty image"),
        (np.zeros((5, 5, 7)), "image array of shape"),
        (3.5, "got float"),
        ("/no/such/file.png", "no such file"),
    ],
)
def test_bad_images_are_clear_errors(bad, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        to_rgb_image(bad)


def test_text_file_and_unreachable_url_are_clear_errors(tmp_path, processor) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="is not a readable image"):
        processor(images=str(text_file))
    with pytest.raises(ValueError, match="could not fetch the image at http://127.0.0.1:9/"):
        processor(images="http://127.0.0.1:9/cat.png", timeout=2)
    with pytest.raises(ValueError, match="empty list"):
        processor(images=[])


def test_images_from_paths_follow_the_blip2_transform(tmp_path, processor) -> None:
    path = tmp_path / "red.png"
    Image.new("RGB", (50, 20), (255, 0, 0)).save(path)
    pixel_values = processor(images=str(path)).pixel_values
    assert pixel_values.shape == (1, 3, 28, 28)
    expected = [(1.0 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0], -OPENAI_CLIP_MEAN[1] / OPENAI_CLIP_STD[1]]
    assert torch.allclose(pixel_values[0, :2, 10, 10], torch.tensor(expected), atol=1e-4)
    image_processor = blip2_image_processor()
    assert image_processor.size == {"height": 224, "width": 224} and image_processor.resample == 3


def test_image_tokens_padding_sides_and_labels(processor) -> None:
    image = Image.new("RGB", (8, 8))
    generation = processor(images=[image, image], text=["a photo of a cat", "a cat"])
    image_id = processor.image_token_id
    ids, mask = generation.input_ids, generation.attention_mask
    assert [int((row == image_id).sum()) for row in ids] == [QUERIES, QUERIES]
    assert mask[1, 0] == 0 and mask[1, -1] == 1  # left padding for generation
    assert (ids[0, :QUERIES] == image_id).all()
    training = processor(images=[image, image], text=["a photo of a cat", "a cat"], for_training=True)
    assert training.attention_mask[1, -1] == 0 and training.attention_mask[1, 0] == 1  # right padding
    labels = training.labels
    assert (labels[:, :QUERIES] == -100).all()
    assert (labels[training.attention_mask == 0] == -100).all()
    real = training.attention_mask.bool()
    real[:, : QUERIES + 1] = False  # image tokens and BOS are not predicted
    assert torch.equal(labels[real], training.input_ids[real])
    captioning = processor(images=image)  # no text: an empty prompt per image
    assert captioning.input_ids.shape[0] == 1 and (captioning.input_ids[0, :QUERIES] == image_id).all()


def test_max_length_counts_the_image_tokens(processor) -> None:
    image = Image.new("RGB", (8, 8))
    encoded = processor(images=image, text="a photo of a cat on the left", max_length=QUERIES + 3)
    assert encoded.input_ids.shape == (1, QUERIES + 3)
    assert int((encoded.input_ids == processor.image_token_id).sum()) == QUERIES  # never truncated
    padded = processor(images=image, text="a cat", max_length=QUERIES + 6, padding="max_length")
    assert padded.input_ids.shape == (1, QUERIES + 6)
    with pytest.raises(ValueError, match=r"max_length \(4\) must exceed the 4 image tokens"):
        processor(images=image, text="a cat", max_length=QUERIES)


def test_text_and_image_counts_must_match(processor) -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="got 2 images but 3 texts"):
        processor(images=[image, image], text=["a", "b", "c"])
    with pytest.raises(ValueError, match="string or a list of strings"):
        processor(images=image, text=5)


def test_qformer_tokenizer_inputs_and_round_trip(tmp_path, processor) -> None:
    qformer_tokenizer = _bert_tokenizer(tmp_path)
    assert qformer_tokenizer.bos_token == QFORMER_START_TOKEN
    with_qformer = Blip2ImageTextProcessor(
        processor.image_processor, processor.tokenizer, num_query_tokens=QUERIES, qformer_tokenizer=qformer_tokenizer
    )
    image = Image.new("RGB", (8, 8))
    encoded = with_qformer(images=[image, image], text=["a", "a cat"], qformer_text=["what is this ?", "cat"])
    assert encoded.qformer_input_ids.shape[0] == 2
    assert encoded.qformer_attention_mask[1, -1] == 0  # right-padded
    with pytest.raises(ValueError, match="needs a qformer_tokenizer"):
        processor(images=image, qformer_text="what is this ?")

    with_qformer.save_pretrained(tmp_path / "saved")
    reloaded = Blip2ImageTextProcessor.from_pretrained(tmp_path / "saved")
    assert reloaded.num_query_tokens == QUERIES
    assert reloaded.qformer_tokenizer is not None and reloaded.qformer_tokenizer.bos_token == QFORMER_START_TOKEN
    again = reloaded(images=[image, image], text=["a", "a cat"], qformer_text=["what is this ?", "cat"])
    for key in encoded:
        assert torch.equal(encoded[key], again[key]), key
    assert "qformer_tokenizer" not in json.loads((tmp_path / "saved" / "processor_config.json").read_text())


def test_official_processor_folder_layout_loads(tmp_path) -> None:
    """preprocessor_config.json + processor_config.json (processor_class Blip2Processor) + tokenizer + added tokens."""
    folder = tmp_path / "official"
    tokenizer = AutoTokenizer.from_pretrained(TINY_RANDOM)
    tokenizer.save_pretrained(folder)
    blip2_image_processor(28).save_pretrained(folder)
    (folder / "processor_config.json").write_text(
        json.dumps({"processor_class": "Blip2Processor", "num_query_tokens": 4})
    )
    (folder / "added_tokens.json").write_text(json.dumps({"<image>": tokenizer.convert_tokens_to_ids("<image>")}))
    assert (folder / "preprocessor_config.json").is_file()
    processor = Blip2ImageTextProcessor.from_pretrained(folder)
    assert processor.num_query_tokens == 4
    encoded = processor(images=Image.new("RGB", (9, 9)), text="a cat")
    assert encoded.pixel_values.shape == (1, 3, 28, 28)
    assert int((encoded.input_ids == processor.image_token_id).sum()) == 4


def test_processor_output_drives_the_model(processor) -> None:
    model = tiny_checkpoint_parts()[0]
    image = Image.new("RGB", (8, 8), (0, 120, 255))
    inputs = processor(images=[image, image], text=["a photo of", "a"])
    generated = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3)
    assert generated.shape == (2, inputs.input_ids.shape[1] + 3)
    assert len(processor.decode_generated(generated)) == 2
    # The output object of return_dict_in_generate=True decodes to the same texts.
    as_object = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
    assert processor.decode_generated(as_object) == processor.decode_generated(generated)
    with pytest.raises(ValueError, match=r"\(batch, length\) token ids"):
        processor.decode_generated(generated[0])
    training = processor(images=[image, image], text=["a photo of", "a"], for_training=True)
    loss = model(**training).loss
    assert torch.isfinite(loss)


# -- issue 11 bad inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bad",
    [
        np.full((8, 8, 3), np.nan, dtype=np.float32),
        np.where(np.eye(8)[..., None] > 0, np.inf, 0.5).repeat(3, axis=2),
        torch.full((3, 8, 8), float("nan")),
        torch.tensor(float("nan")).expand(3, 8, 8).to(torch.bfloat16),
    ],
    ids=["numpy-nan", "numpy-inf", "tensor-nan", "bf16-nan"],
)
def test_non_finite_image_arrays_are_refused(processor, bad) -> None:
    with pytest.raises(ValueError, match=r"^images: expected an image of finite pixel values, got .* NaN or inf"):
        processor(images=bad)
    with pytest.raises(ValueError, match=r"^images\[1\]: expected an image of finite pixel values"):
        processor(images=[np.zeros((8, 8, 3), dtype=np.float32), bad], text=["a", "b"])


def test_non_finite_pil_float_image_is_refused() -> None:
    image = Image.fromarray(np.array([[0.5, np.nan], [0.1, 0.2]], dtype=np.float32), mode="F")
    with pytest.raises(ValueError, match="finite pixel values"):
        to_rgb_image(image)


def test_bfloat16_image_tensors_are_accepted(processor) -> None:
    image = torch.rand(3, 8, 8)
    expected = processor(images=image).pixel_values
    assert torch.allclose(processor(images=image.to(torch.bfloat16)).pixel_values, expected, atol=0.05)


@pytest.mark.parametrize(("text", "index", "kind"), [([None], 0, "NoneType"), (["a", 3], 1, "int")])
def test_a_text_list_holding_a_non_string_names_the_index(processor, text, index: int, kind: str) -> None:
    images = [Image.new("RGB", (8, 8))] * len(text)
    with pytest.raises(ValueError, match=rf"text\[{index}\] must be a string, got {kind}"):
        processor(images=images, text=text)
    with pytest.raises(ValueError, match=rf"text\[{index}\] must be a string"):
        processor(text=text)


# -- issue 12: an <image> placeholder in the prompt -------------------------------------------------------------------
PLACED = "question : <image> what is this ? answer :"


def test_a_placeholder_in_the_text_expands_in_place(processor) -> None:
    image = Image.new("RGB", (8, 8))
    image_id = processor.image_token_id
    before, after = (processor.tokenizer(part, add_special_tokens=False).input_ids for part in PLACED.split("<image>"))
    bos = [processor.tokenizer.bos_token_id]
    encoded = processor(images=image, text=PLACED)
    assert encoded.input_ids[0].tolist() == bos + before + [image_id] * QUERIES + after  # not prefixed as well
    # Without images too (pixel_values may come separately), and mixed with a prompt that has no placeholder.
    assert torch.equal(processor(text=PLACED).input_ids, encoded.input_ids)
    mixed = processor(images=[image, image], text=[PLACED, "a photo of"])
    assert [int((row == image_id).sum()) for row in mixed.input_ids] == [QUERIES, QUERIES]
    assert mixed.input_ids[1, -QUERIES - 4 : -4].tolist() == [image_id] * QUERIES  # the other: image, BOS, text
    training = processor(images=[image, image], text=[PLACED, "a photo of"], for_training=True)
    labels, ids = training.labels[0], training.input_ids[0]
    start = 1 + len(before)
    assert (labels[start : start + QUERIES] == -100).all() and labels[0] == -100  # image tokens and BOS
    real = training.attention_mask[0].bool()
    real[0], real[start : start + QUERIES] = False, False
    assert torch.equal(labels[real], ids[real])


def test_placeholder_errors_are_clear(processor) -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match=r"text\[1\] holds 2 <image> placeholders"):
        processor(images=[image, image], text=["a", "<image> a <image>"])
    # max_length counts the expanded block: a placeholder late in a long prompt would be cut off.
    with pytest.raises(ValueError, match=r"text\[0\] holds the <image> placeholder .* truncation to max_length=8"):
        processor(images=image, text="a photo of a cat on the left <image>", max_length=QUERIES + 4)
    fits = processor(images=image, text="<image> a photo of a cat on the left", max_length=QUERIES + 4)
    assert fits.input_ids.shape == (1, QUERIES + 4)
    assert int((fits.input_ids == processor.image_token_id).sum()) == QUERIES


def test_an_image_block_inside_the_prompt_drives_the_model(processor) -> None:
    """The model takes the image tokens where the prompt has them: the same as writing the soft prompts into the
    LLM's input embeddings at those positions by hand."""
    model = tiny_checkpoint_parts()[0]
    images = [Image.new("RGB", (8, 8), (0, 120, 255)), Image.new("RGB", (8, 8), (200, 10, 0))]
    inputs = processor(images=images, text=[PLACED, "a photo of <image> on the left"])
    image_mask = inputs.input_ids == processor.image_token_id
    assert not image_mask[:, :2].any()  # the blocks are inside the prompts, not at their starts
    with torch.no_grad():
        soft_prompts = model.encode_images(inputs.pixel_values).language_model_inputs
        embeddings = model.get_input_embeddings()(inputs.input_ids)
        embeddings[image_mask] = soft_prompts.reshape(-1, soft_prompts.shape[-1])
        expected = model.language_model(inputs_embeds=embeddings, attention_mask=inputs.attention_mask).logits
        assert torch.allclose(model(**inputs).logits, expected, atol=1e-5)
        options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "num_beams": 1}
        by_hand = model.language_model.generate(
            inputs_embeds=embeddings, attention_mask=inputs.attention_mask, **options
        )
        generated = model.generate(**inputs, **options)
    assert torch.equal(generated[:, : inputs.input_ids.shape[1]], inputs.input_ids)
    assert torch.equal(generated[:, inputs.input_ids.shape[1] :], by_hand)


def test_transformers_image_text_to_text_pipeline_takes_a_chat() -> None:
    """transformers' pipeline renders a chat through `processor.apply_chat_template` (tokenize=True, return_dict)."""
    from transformers import pipeline

    model, processor = tiny_checkpoint_parts()
    processor.tokenizer.chat_template = (
        "{% for message in messages %}{{ 'question : ' + message['content'] + ' \\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'answer :' }}{% endif %}"
    )
    image = Image.new("RGB", (8, 8), (0, 120, 255))
    chat = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is this ?"}]}
    ]
    options = {"max_new_tokens": 3, "min_new_tokens": 3}
    answer = pipeline("image-text-to-text", model=model, processor=processor)(text=chat, **options)
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)
    new_tokens = model.generate(**inputs, **options)[:, inputs.input_ids.shape[1] :]
    reply = answer[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == processor.decode(new_tokens[0]).strip()
