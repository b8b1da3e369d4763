"""What a user types: pipeline("image-to-text" | "visual-question-answering" | "image-text-to-text", model=...)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny import tiny_checkpoint_parts
from transformers import pipeline

from modeling_blip2 import Blip2ImageTextProcessor, Blip2ImageToTextPipeline, blip2_image_processor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    model, processor = tiny_checkpoint_parts()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return pipeline("image-to-text", model=str(checkpoint), trust_remote_code=True)


def _image(color=(200, 30, 30)) -> Image.Image:
    return Image.new("RGB", (40, 30), color)


def test_image_to_text_captions_a_pil_image_a_path_and_a_list(captioner, checkpoint, tmp_path) -> None:
    result = captioner(_image(), max_new_tokens=4)
    assert isinstance(result, list) and len(result) == 1 and isinstance(result[0]["generated_text"], str)
    path = tmp_path / "image.png"
    _image().save(path)
    assert captioner(str(path), max_new_tokens=4)[0]["generated_text"] == result[0]["generated_text"]
    batch = captioner([_image(), str(path), _image((0, 0, 255))], max_new_tokens=4, batch_size=2)
    assert len(batch) == 3 and all(len(item) == 1 for item in batch)
    assert batch[0][0]["generated_text"] == result[0]["generated_text"]


def test_prompt_and_max_new_tokens(captioner) -> None:
    prompted = captioner(_image(), text="a photo of", max_new_tokens=2)[0]["generated_text"]
    assert prompted.startswith("a photo of")
    lengths = [
        len(
            captioner(_image(), max_new_tokens=n, generate_kwargs={"min_new_tokens": n}, return_tensors=True)[0][
                "generated_token_ids"
            ]
        )
        for n in (1, 6)
    ]
    assert lengths[1] - lengths[0] == 5


def test_same_caption_as_calling_the_model(captioner) -> None:
    model, processor = tiny_checkpoint_parts()
    inputs = processor(images=_image(), return_tensors="pt")
    expected = processor.decode_generated(model.generate(**inputs, max_new_tokens=4))[0]
    assert captioner(_image(), max_new_tokens=4)[0]["generated_text"].strip() == expected


def test_without_remote_code_pipeline_class_works_and_plain_call_says_what_to_do(checkpoint) -> None:
    plain = pipeline("image-to-text", model=str(checkpoint), pipeline_class=Blip2ImageToTextPipeline)
    assert isinstance(plain(_image(), max_new_tokens=2)[0]["generated_text"], str)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("image-to-text", model=str(checkpoint))


def test_visual_question_answering(checkpoint) -> None:
    vqa = pipeline("visual-question-answering", model=str(checkpoint), trust_remote_code=True)
    answer = vqa(_image(), question="what color is it?", max_new_tokens=3)
    assert list(answer[0]) == ["answer"] and isinstance(answer[0]["answer"], str)
    answers = vqa([_image(), _image()], question=["what is it?", "where?"], max_new_tokens=2)
    assert len(answers) == 2
    with pytest.raises(ValueError, match="question 0 is empty"):
        vqa(_image(), question="  ")


def test_image_text_to_text(checkpoint) -> None:
    pipe = pipeline("image-text-to-text", model=str(checkpoint))
    assert pipe(images=_image(), text="a photo of", max_new_tokens=2)[0]["generated_text"].startswith("a photo of")


def test_bad_pipeline_inputs(captioner, tmp_path) -> None:
    with pytest.raises(ValueError, match="got None"):
        captioner(None)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    with pytest.raises(ValueError, match="is not a readable image"):
        captioner(str(text_file))
    with pytest.raises(ValueError, match="empty list"):
        captioner([])
    with pytest.raises(ValueError, match="non-empty image"):
        captioner(Image.new("RGB", (0, 3)))
    with pytest.raises(ValueError, match="could not fetch the image"):
        captioner("http://127.0.0.1:9/image.png", timeout=2)
    with pytest.raises(ValueError, match="got 2 images but 3 texts"):
        captioner([_image(), _image()], text=["a", "b", "c"])
    assert captioner(Image.new("RGB", (1, 1)), max_new_tokens=1)  # 1x1 is fine


def test_processor_with_another_query_count_is_refused(checkpoint) -> None:
    processor = Blip2ImageTextProcessor.from_pretrained(checkpoint)
    mismatched = Blip2ImageTextProcessor(blip2_image_processor(28), processor.tokenizer, num_query_tokens=8)
    with pytest.raises(ValueError, match="inserts 8 image tokens per prompt but the model has num_query_tokens=4"):
        pipeline("image-to-text", model=str(checkpoint), processor=mismatched, trust_remote_code=True)


def test_pipeline_code_files_hold_everything_the_pipelines_import() -> None:
    from pathlib import Path

    from transformers.dynamic_module_utils import get_relative_import_files

    from modeling_blip2.modeling import PIPELINE_CODE_FILES

    package = Path(__file__).resolve().parents[1] / "modeling_blip2"
    needed = {Path(path).name for path in get_relative_import_files(str(package / "pipelines.py"))}
    assert needed | {"pipelines.py"} == set(PIPELINE_CODE_FILES)


def test_vqa_pipeline_feeds_the_question_to_a_question_conditioned_qformer() -> None:
    from tiny import tiny_qformer_tokenizer

    from modeling_blip2 import Blip2VisualQuestionAnsweringPipeline, predict_answers

    model, processor = tiny_checkpoint_parts()
    assert model.has_qformer_text_input  # tiny-random's Q-Former reads text
    with_questions = Blip2ImageTextProcessor(
        processor.image_processor, processor.tokenizer, num_query_tokens=4, qformer_tokenizer=tiny_qformer_tokenizer()
    )
    vqa = Blip2VisualQuestionAnsweringPipeline(model=model, processor=with_questions)
    seen = []
    model.qformer.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state.shape[1]))
    questions = ["what is this ?", "what is the cat ?"]
    answers = vqa([_image(), _image()], question=questions, max_new_tokens=3, generate_kwargs={"num_beams": 1})
    expected = predict_answers(
        model, with_questions, [_image(), _image()], questions, num_beams=1, max_new_tokens=3, use_qformer_text=True
    )
    assert [item[0]["answer"] for item in answers] == expected
    assert seen and all(length > 4 for length in seen)  # [queries; question] went through the Q-Former


# -- issue 11: transformers' call forms -----------------------------------------------------------------------------
def _captions(outputs) -> list[str]:
    return [item[0]["generated_text"] for item in outputs]


def test_captioner_takes_transformers_call_forms(captioner) -> None:
    expected = captioner(_image(), max_new_tokens=3)
    prompted = captioner(_image(), text="a photo of", max_new_tokens=3)
    assert captioner(image=_image(), max_new_tokens=3) == expected
    assert captioner(images=_image(), max_new_tokens=3) == expected
    assert captioner(inputs=_image(), max_new_tokens=3) == expected
    assert captioner({"image": _image()}, max_new_tokens=3) == expected
    assert captioner({"images": _image(), "text": "a photo of"}, max_new_tokens=3) == prompted
    assert captioner({"image": _image(), "prompt": "a photo of"}, max_new_tokens=3) == prompted
    pairs = [{"image": _image()}, {"images": _image(), "text": "a photo of"}]
    assert captioner(pairs, max_new_tokens=3, batch_size=2) == [expected, prompted]
    streamed = captioner((image for image in [_image(), _image()]), max_new_tokens=3)
    assert not isinstance(streamed, list) and list(streamed) == [expected, expected]
    batch = np.stack([np.asarray(_image())] * 3)  # (3, H, W, C): a batch of three images
    assert captioner(batch, max_new_tokens=3) == [expected] * 3
    with pytest.raises(ValueError, match="give images once: got images= and image="):
        captioner(_image(), image=_image())
    with pytest.raises(ValueError, match=r"images\[1\]: unknown key\(s\) \['question'\]"):
        captioner([{"image": _image()}, {"image": _image(), "question": "what?"}])
    with pytest.raises(ValueError, match=r"images\[0\]: expected an image of finite pixel values"):
        captioner([np.full((8, 8, 3), np.nan)])


def test_generation_options_as_call_arguments(captioner) -> None:
    model, processor = tiny_checkpoint_parts()
    inputs = processor(images=_image(), return_tensors="pt")
    beams = processor.decode_generated(model.generate(**inputs, num_beams=3, max_new_tokens=4))[0]
    assert captioner(_image(), num_beams=3, max_new_tokens=4)[0]["generated_text"].strip() == beams
    assert captioner(_image(), generate_kwargs={"num_beams": 3}, max_new_tokens=4) == captioner(
        _image(), num_beams=3, max_new_tokens=4
    )
    tokens = captioner(_image(), min_new_tokens=6, max_new_tokens=6, return_tensors=True)[0]["generated_token_ids"]
    assert len(tokens) == inputs.input_ids.shape[1] + 6
    with pytest.raises(ValueError, match="'num_beams' was given twice"):
        captioner(_image(), num_beams=2, generate_kwargs={"num_beams": 3})


def test_vqa_takes_transformers_call_forms(checkpoint) -> None:
    vqa = pipeline("visual-question-answering", model=str(checkpoint), trust_remote_code=True)
    answer = vqa(_image(), question="what color is it?", max_new_tokens=3)
    assert vqa(image=_image(), question="what color is it?", max_new_tokens=3) == answer
    assert vqa({"image": _image(), "question": "what color is it?"}, max_new_tokens=3) == answer
    assert vqa([{"image": _image(), "question": "what color is it?"}], max_new_tokens=3) == [answer]
    streamed = vqa(({"image": _image(), "question": q} for q in ["what color is it?"] * 2), max_new_tokens=3)
    assert list(streamed) == [answer, answer]
    # One image, several questions: each question about that image.
    assert vqa(_image(), question=["what color is it?", "what color is it?"], max_new_tokens=3) == [answer, answer]
    # The paper's 5 beams by default; a call argument replaces them.
    greedy = vqa(_image(), question="what color is it?", num_beams=1, max_new_tokens=3)
    assert greedy == vqa(_image(), question="what color is it?", generate_kwargs={"num_beams": 1}, max_new_tokens=3)
    model, processor = tiny_checkpoint_parts()
    prompt = processor(images=_image(), text="Question: what color is it? Answer:", return_tensors="pt")
    generated = model.generate(**prompt, num_beams=5, max_new_tokens=3)[:, prompt.input_ids.shape[1] :]
    assert answer[0]["answer"] == processor.decode_generated(generated)[0]
    with pytest.raises(ValueError, match="question 0 is missing"):
        vqa({"image": _image()})
    with pytest.raises(ValueError, match="question 1 must be a non-empty string, got int"):
        vqa([_image(), _image()], question=["what?", 3])


def test_tiny_random_checkpoint_built_as_its_readme_says_captions_without_arguments(tmp_path) -> None:
    # hub_configs/README.md: the model is built from the config (random weights), the processor files are there.
    from tiny import TINY_RANDOM

    from modeling_blip2 import Blip2Config, Blip2ForConditionalGeneration

    Blip2ForConditionalGeneration(Blip2Config.from_pretrained(TINY_RANDOM)).save_pretrained(tmp_path)
    Blip2ImageTextProcessor.from_pretrained(TINY_RANDOM).save_pretrained(tmp_path)
    captioner = pipeline("image-to-text", model=str(tmp_path), trust_remote_code=True)
    tokens = captioner(_image(), return_tensors=True)[0]["generated_token_ids"]
    # No length anywhere: the pipeline's 30 new tokens (transformers' 256 would overrun the LLM's 128 positions).
    assert len(tokens) <= 4 + 1 + 30
    assert isinstance(captioner(_image())[0]["generated_text"], str)
