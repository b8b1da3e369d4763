"""Stage-1 models: retrieval parity with the built-in class, the three losses end to end, ITG captioning."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny import NUM_QUERY_TOKENS, config_dict, pixels, randomise_

import modeling_blip2
from modeling_blip2 import Blip2Config, Blip2ForImageTextRetrieval, Blip2ForPretraining
from modeling_blip2.conversion import expected_state_dict_shapes

DEC = 99
SEP = 3
ATOL = 1e-5


def _stage1_dict(**qformer: object) -> dict:
    config = config_dict()
    config["qformer_config"].update({"use_qformer_text_input": True, "bos_token_id": DEC, **qformer})
    config["image_text_hidden_size"] = 16
    config["image_token_index"] = None  # as in the official ITM checkpoints (the stock class strips ids otherwise)
    return config


def _model(seed: int = 0) -> Blip2ForPretraining:
    torch.manual_seed(seed)
    model = randomise_(Blip2ForPretraining(Blip2Config(**_stage1_dict())), std=0.1, seed=seed).eval()
    with torch.no_grad():
        model.temp.fill_(0.07)  # inside the clamp range, so it gets a gradient
    return model


def _texts(batch: int = 4, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 90, (batch, length), generator=generator)
    ids[:, 0] = 2  # [CLS]
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ids[1, -2:] = 0
    return ids, mask


def test_layouts_match_the_converter_and_the_official_retrieval_checkpoint() -> None:
    config = Blip2Config(**_stage1_dict())
    with torch.device("meta"):
        pretraining, retrieval = Blip2ForPretraining(config), Blip2ForImageTextRetrieval(config)
    assert {k: tuple(v.shape) for k, v in pretraining.state_dict().items()} == expected_state_dict_shapes(
        config, "pretraining"
    )
    assert {k: tuple(v.shape) for k, v in retrieval.state_dict().items()} == expected_state_dict_shapes(
        config, "image_text_retrieval"
    )
    stock_config = transformers.Blip2Config(**_stage1_dict())
    with torch.device("meta"):
        stock = transformers.Blip2ForImageTextRetrieval(stock_config)
    assert set(stock.state_dict()) == set(retrieval.state_dict())


@pytest.mark.parametrize("use_itm", [False, True])
def test_retrieval_matches_the_builtin_class_both_ways(use_itm: bool, tmp_path) -> None:
    stock = randomise_(transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(**_stage1_dict())), std=0.1)
    stock.eval().save_pretrained(tmp_path)
    ours, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours.eval()
    ids, mask = _texts(batch=2)
    with torch.no_grad():
        expected = stock(pixels(), ids, mask, use_image_text_matching_head=use_itm)
        actual = ours(pixels(), ids, mask, use_image_text_matching_head=use_itm)
    assert torch.allclose(expected.logits_per_image, actual.logits_per_image, atol=ATOL)
    back = transformers.Blip2ForImageTextRetrieval(transformers.Blip2Config(**_stage1_dict())).eval()
    back.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        again = back(pixels(), ids, mask, use_image_text_matching_head=use_itm).logits_per_image
    assert torch.allclose(again, actual.logits_per_image, atol=ATOL)


def test_three_losses_train_the_right_parameters() -> None:
    model = _model().train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.freeze_vision_encoder()
    ids, mask = _texts()
    output = model(ids, mask, pixel_values=pixels(batch=4))
    for term in (output.loss_itc, output.loss_itm, output.loss_itg):
        assert term is not None and torch.isfinite(term)
    assert torch.allclose(output.loss, output.loss_itc + output.loss_itm + output.loss_itg)
    assert output.itm_logits.shape == (12, 2) and output.image_features.shape == (4, NUM_QUERY_TOKENS, 16)
    output.loss.backward()
    grads = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    for expected in (
        "temp",
        "query_tokens",
        "itm_head.weight",
        "vision_projection.weight",
        "text_projection.weight",
        "qformer_lm_head.transform.dense.weight",
        "vision_model.post_layernorm.weight",
        "qformer.encoder.layer.0.crossattention.attention.query.weight",
    ):
        assert expected in grads, expected
    assert not any(name.startswith("vision_model.encoder") for name in grads)


def test_each_loss_can_be_computed_alone_and_terms_are_consistent() -> None:
    model = _model()
    ids, mask = _texts()
    with torch.no_grad():
        full = model(ids, mask, pixel_values=pixels(batch=4))
        itc_only = model(ids, mask, pixel_values=pixels(batch=4), losses=("itc",))
        itg_only = model(ids, mask, pixel_values=pixels(batch=4), losses=("itg",))
    assert torch.allclose(itc_only.loss, full.loss_itc) and itc_only.loss_itm is None
    assert torch.allclose(itg_only.loss, full.loss_itg) and itg_only.image_features is None
    with pytest.raises(ValueError, match="non-empty subset"):
        model(ids, mask, pixel_values=pixels(batch=4), losses=("mlm",))


def test_itc_similarity_is_retrieval_similarity_over_temperature() -> None:
    model = _model()
    retrieval = Blip2ForImageTextRetrieval(model.config).eval()
    retrieval.load_state_dict(model.state_dict(), strict=False)
    ids, mask = _texts()
    with torch.no_grad():
        output = model(ids, mask, pixel_values=pixels(batch=4), losses=("itc",))
        cosine = retrieval(pixels(batch=4), ids, mask).logits_per_image
    assert torch.allclose(output.similarity_image_to_text, cosine / model.temperature, atol=1e-4)


def test_cached_frozen_features_give_the_same_losses() -> None:
    model = _model()
    ids, mask = _texts()
    images = pixels(batch=4)
    with torch.no_grad():
        features = model.vision_model.forward_features(images)
        torch.manual_seed(1)
        from_pixels = model(ids, mask, pixel_values=images)
        torch.manual_seed(1)  # same hard negatives
        from_cache = model(ids, mask, frozen_image_features=features)
    for name in ("loss_itc", "loss_itm", "loss_itg"):
        assert torch.allclose(getattr(from_pixels, name), getattr(from_cache, name), atol=1e-6), name


def test_itg_is_causal_over_the_text() -> None:
    model = _model()
    ids, mask = _texts(batch=2)
    with torch.no_grad():
        image_embeds = model.image_embeddings(pixels())
        before = model.itg_logits(image_embeds, ids, mask)
        changed = ids.clone()
        changed[:, 4] = 50
        after = model.itg_logits(image_embeds, changed, mask)
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)
    assert not torch.allclose(before[:, 4:], after[:, 4:])


def test_generate_captions_through_the_itg_head() -> None:
    model = _model()
    caption = model.generate(pixel_values=pixels(), max_new_tokens=5)
    assert caption.shape == (2, 6) and bool((caption[:, 0] == DEC).all())
    first = int(caption[0, 1])
    stopped = model.generate(pixel_values=pixels(), max_new_tokens=5, eos_token_id=first)
    assert stopped.shape[1] <= 6 and int(stopped[0, 1]) == first and bool((stopped[0, 2:] == 0).all())
    sampled = model.generate(pixel_values=pixels(), max_new_tokens=3, do_sample=True, top_k=5)
    assert sampled.shape == (2, 4)


def test_save_and_load_keeps_the_tied_itg_decoder(tmp_path) -> None:
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = Blip2ForPretraining.from_pretrained(tmp_path)
    assert loaded.qformer_lm_head.decoder.weight is loaded.embeddings.word_embeddings.weight
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert type(transformers.AutoModelForPreTraining.from_pretrained(tmp_path)) is Blip2ForPretraining
    retrieval = transformers.AutoModelForZeroShotImageClassification.from_pretrained(tmp_path)
    assert type(retrieval) is modeling_blip2.Blip2ForImageTextRetrieval


def test_stage1_bad_input() -> None:
    model = _model()
    ids, mask = _texts()
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        model(ids[:1], mask[:1], pixel_values=pixels(batch=1))
    assert torch.isfinite(model(ids[:1], mask[:1], pixel_values=pixels(batch=1), losses=("itc", "itg")).loss)
    with pytest.raises(ValueError, match=r"image_ids must have one id per image, shape \(4,\)"):
        model(ids, mask, pixel_values=pixels(batch=4), image_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="got 4 images but 2 texts"):
        model(ids[:2], mask[:2], pixel_values=pixels(batch=4))
    with pytest.raises(ValueError, match="exceeds its max_position_embeddings"):
        model(torch.ones(4, 65, dtype=torch.long), pixel_values=pixels(batch=4))
    with pytest.raises(ValueError, match="exactly one of pixel_values and frozen_image_features"):
        model(ids, mask)
    no_dec = Blip2ForPretraining(Blip2Config(**_stage1_dict(bos_token_id=None)))
    with pytest.raises(ValueError, match=r"\[DEC\].*bos_token_id is not set"):
        no_dec(ids, mask, pixel_values=pixels(batch=4), losses=("itg",))
    with pytest.raises(ValueError, match="use_qformer_text_input=True"):
        Blip2ForPretraining(Blip2Config(**config_dict()))
    duplicated = torch.tensor([0, 0, 0, 0])
    with pytest.raises(ValueError, match="at least 2 distinct images"):
        model(ids, mask, pixel_values=pixels(batch=4), image_ids=duplicated)


def test_itm_is_skipped_on_request_when_the_batch_has_no_negative() -> None:
    model = _model().train()
    ids, mask = _texts()
    for inputs in (
        {"input_ids": ids[:1], "attention_mask": mask[:1], "pixel_values": pixels(batch=1)},
        {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(batch=4), "image_ids": torch.zeros(4)},
    ):
        model.zero_grad()
        outputs = model(**inputs, itm_without_negatives="skip")
        assert outputs.itm_logits is None and outputs.loss_itm.item() == 0.0
        assert torch.isfinite(outputs.loss_itc) and torch.isfinite(outputs.loss_itg)
        outputs.loss.backward()
        # Still in the graph (distributed data parallel needs every parameter used), with a zero gradient.
        assert model.itm_head.weight.grad is not None and not model.itm_head.weight.grad.any()
    # A batch with negatives is not affected by the option.
    torch.manual_seed(0)
    skip = model(ids, mask, pixel_values=pixels(batch=4), itm_without_negatives="skip")
    torch.manual_seed(0)
    default = model(ids, mask, pixel_values=pixels(batch=4))
    assert skip.itm_logits is not None and torch.equal(skip.loss_itm, default.loss_itm)
    with pytest.raises(ValueError, match="itm_without_negatives must be one of"):
        model(ids, mask, pixel_values=pixels(batch=4), itm_without_negatives="ignore")
