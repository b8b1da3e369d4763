"""Stage 1 in one pass over the image features: shared cross-attention keys/values and ITG from the query pass.

The reference is the path of separate passes: each pass projects its own image features, ITG runs `[queries; text]`
again. Both must give the same losses and every gradient (fp32, dropout off).
"""

from __future__ import annotations

import pytest
import torch
from test_pretraining import DEC, _model, _texts
from tiny import NUM_QUERY_TOKENS, pixels

from modeling_blip2 import Blip2QFormerKeyValues
from modeling_blip2.losses import itc_loss, itg_inputs_and_labels, itg_loss, itm_loss

TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
NEGATIVES = (torch.tensor([2, 0, 3, 1]), torch.tensor([1, 3, 0, 2]))


def _training_model(implementation: str = "sdpa") -> torch.nn.Module:
    model = _model().train()
    for module in model.modules():  # dropout off: both paths must be deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.config.qformer_config.attention_probs_dropout_prob = 0.0
    model.freeze_vision_encoder()
    model.set_attn_implementation(implementation)
    return model


def _separate_passes(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, images: torch.Tensor) -> dict:
    """The three losses with every pass on its own image features and ITG re-running the queries."""
    image_embeds = model.image_embeddings(images)
    image_features = model.project_image(model.query_outputs(image_embeds).last_hidden_state)
    text_features = model.project_text(model.text_outputs(ids, mask).last_hidden_state)
    loss_itc = itc_loss(image_features, text_features, model.temperature).loss
    negative_image, negative_text = NEGATIVES
    pair_images = torch.cat([image_embeds, image_embeds[negative_image], image_embeds])
    pair_texts = torch.cat([ids, ids, ids[negative_text]])
    pair_masks = torch.cat([mask, mask, mask[negative_text]])
    loss_itm = itm_loss(model.matching_outputs(pair_images, pair_texts, pair_masks)[0])
    decoder_ids, labels = itg_inputs_and_labels(ids, mask, DEC, model.config.qformer_config.pad_token_id or 0)
    loss_itg = itg_loss(model.itg_logits(image_embeds, decoder_ids, mask), labels)
    return {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_itg": loss_itg}


def _losses_and_gradients(model: torch.nn.Module, shared: bool) -> tuple[dict, dict]:
    ids, mask = _texts()
    images = pixels(batch=4)
    model.zero_grad()
    if shared:
        output = model(ids, mask, pixel_values=images, hard_negatives=NEGATIVES)
        losses = {name: getattr(output, name) for name in ("loss_itc", "loss_itm", "loss_itg")}
    else:
        losses = _separate_passes(model, ids, mask, images)
    sum(losses.values()).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {name: loss.detach() for name, loss in losses.items()}, gradients


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_one_pass_stage1_equals_separate_passes(implementation: str) -> None:
    model = _training_model(implementation)
    separate_losses, separate_gradients = _losses_and_gradients(model, shared=False)
    shared_losses, shared_gradients = _losses_and_gradients(model, shared=True)
    for name, loss in separate_losses.items():
        assert torch.allclose(shared_losses[name], loss, **TOLERANCE), name
    assert shared_gradients.keys() == separate_gradients.keys()
    # the shared projections and the query pass get gradients from every objective
    for name in (
        "qformer.encoder.layer.0.crossattention.attention.key.weight",
        "qformer.encoder.layer.0.crossattention.attention.value.weight",
        "vision_model.post_layernorm.weight",
        "query_tokens",
        "qformer_lm_head.transform.dense.weight",
    ):
        assert separate_gradients[name].abs().sum() > 0, name
    for name, gradient in separate_gradients.items():
        assert torch.allclose(shared_gradients[name], gradient, **TOLERANCE), name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_keeps_the_shared_gradients(use_reentrant: bool) -> None:
    _, plain = _losses_and_gradients(_training_model(), shared=True)
    model = _training_model()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.qformer.encoder.layer[0].gradient_checkpointing
    _, checkpointed = _losses_and_gradients(model, shared=True)
    assert checkpointed.keys() == plain.keys()
    for name, gradient in plain.items():
        assert torch.allclose(checkpointed[name], gradient, **TOLERANCE), name


def test_image_key_values_serve_every_row_selection() -> None:
    model = _training_model()
    ids, mask = _texts()
    image_embeds = model.image_embeddings(pixels(batch=4)).detach().requires_grad_(True)
    rows = torch.tensor([3, 3, 0, 1, 3])
    by_features = model.matching_outputs(image_embeds[rows], ids[[0, 1, 2, 3, 0]], mask[[0, 1, 2, 3, 0]])[0]
    (gradient_features,) = torch.autograd.grad(by_features.sum(), image_embeds)
    shared = model.qformer.image_key_values(image_embeds)
    assert shared.batch_size == 4 and shared.length == image_embeds.shape[1]
    by_key_values = model.matching_outputs(shared.select(rows), ids[[0, 1, 2, 3, 0]], mask[[0, 1, 2, 3, 0]])[0]
    (gradient_key_values,) = torch.autograd.grad(by_key_values.sum(), image_embeds)
    assert torch.allclose(by_key_values, by_features, **TOLERANCE)
    assert torch.allclose(gradient_key_values, gradient_features, **TOLERANCE)
    # repeat_interleave: k texts per image
    repeated = model.query_outputs(shared.repeat_interleave(2)).last_hidden_state
    assert torch.allclose(repeated, model.query_outputs(image_embeds.repeat_interleave(2, 0)).last_hidden_state)


def test_text_after_the_query_pass_equals_the_multimodal_causal_pass() -> None:
    model = _training_model().eval()
    ids, mask = _texts()  # row 1 is padded
    with torch.no_grad():
        image_embeds = model.image_embeddings(pixels(batch=4))
        full = model.itg_logits(image_embeds, ids, mask)
        query_pass = model.query_outputs(image_embeds, return_key_values=True)
        cached = query_pass.key_values
        assert isinstance(cached, Blip2QFormerKeyValues)
        assert cached.query_length == NUM_QUERY_TOKENS and cached.length == NUM_QUERY_TOKENS
        from_cache = model.itg_logits(None, ids, mask, query_key_values=cached)
    real = mask.bool()
    assert torch.allclose(from_cache[real], full[real], **TOLERANCE)


def test_generate_decodes_incrementally_as_the_full_recomputation() -> None:
    model = _model()
    images = pixels(batch=2)
    generated = model.generate(pixel_values=images, max_new_tokens=6)
    with torch.no_grad():
        image_embeds = model.image_embeddings(images)
        ids = torch.full((2, 1), DEC)
        for _ in range(6):  # greedy, re-running queries and the whole text every step
            next_ids = model.itg_logits(image_embeds, ids, torch.ones_like(ids))[:, -1].argmax(-1)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
    assert torch.equal(generated, ids)


def test_bad_key_values_are_refused() -> None:
    model = _model()
    ids, mask = _texts()
    with torch.no_grad():
        image_embeds = model.image_embeddings(pixels(batch=4))
        shared = model.qformer.image_key_values(image_embeds)
        queries = model.query_tokens.expand(4, -1, -1)
        with pytest.raises(ValueError, match="not both"):
            model.qformer(queries, encoder_hidden_states=image_embeds, encoder_key_values=shared)
        with pytest.raises(ValueError, match="batch size 2, the queries 4"):
            model.qformer(queries, encoder_key_values=shared.select([0, 1]))
        with pytest.raises(TypeError, match="image_key_values"):
            model.qformer(queries, encoder_key_values=(image_embeds, image_embeds))
        with pytest.raises(ValueError, match="width"):
            model.qformer.image_key_values(image_embeds[..., :-1])
        prefix = model.query_outputs(shared, return_key_values=True).key_values
        with pytest.raises(ValueError, match="text only"):
            model.qformer(queries, prefix_key_values=prefix, encoder_key_values=shared)
        with pytest.raises(ValueError, match="all 2 layers|all \\d+ layers"):
            model.qformer(model.embeddings(ids), query_length=0, prefix_key_values=shared)
        with pytest.raises(ValueError, match="attention_mask must have shape"):
            model.qformer(model.embeddings(ids), query_length=0, prefix_key_values=prefix, attention_mask=mask[:, 1:])
        with pytest.raises(ValueError, match="same layers"):
            Blip2QFormerKeyValues.concatenate([shared, prefix])


def test_a_stage1_step_projects_each_image_once_and_runs_the_queries_once_for_itc_and_itg() -> None:
    model = _training_model()
    ids, mask = _texts()
    key_rows, query_rows = [], []
    layers = [layer for layer in model.qformer.encoder.layer if layer.has_cross_attention]
    hooks = [
        layer.crossattention.attention.key.register_forward_hook(lambda m, i, o: key_rows.append(i[0].shape[0]))
        for layer in layers
    ] + [
        model.qformer.encoder.layer[0].intermediate_query.register_forward_hook(
            lambda m, i, o: query_rows.append(i[0].shape[0])
        )
    ]
    model(ids, mask, pixel_values=pixels(batch=4), hard_negatives=NEGATIVES)
    for hook in hooks:
        hook.remove()
    assert key_rows == [4] * len(layers)  # the 4 images, once per cross-attention layer (not 4 + 12 + 4 rows)
    assert query_rows == [4, 12]  # the contrastive query pass, then the 3 x 4 matching pairs; ITG adds none


def test_itg_on_the_predicted_positions_only_gives_the_same_loss_and_gradients() -> None:
    model = _training_model()
    ids, mask = _texts()  # row 1 is padded: its last two positions predict nothing
    images = pixels(batch=4)
    results = []
    for return_itg_logits in (True, False):
        model.zero_grad()
        output = model(ids, mask, pixel_values=images, losses=("itg",), return_itg_logits=return_itg_logits)
        assert (output.itg_logits is None) != return_itg_logits
        output.loss.backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((output.loss_itg.detach(), gradients))
    (full_loss, full_gradients), (predicted_loss, predicted_gradients) = results
    assert torch.allclose(predicted_loss, full_loss, **TOLERANCE)
    assert predicted_gradients.keys() == full_gradients.keys()
    for name, gradient in full_gradients.items():
        assert torch.allclose(predicted_gradients[name], gradient, **TOLERANCE), name


@pytest.mark.parametrize("attention_type", ["bidirectional", "unimodal", "multimodal_causal"])
def test_output_positions_computes_the_same_leading_outputs(attention_type: str) -> None:
    model = _training_model()
    ids, mask = _texts()
    image_embeds = model.image_embeddings(pixels(batch=4)).detach()
    runs = []
    for output_positions in (None, NUM_QUERY_TOKENS, NUM_QUERY_TOKENS + 2):
        model.zero_grad()
        states = model._queries_with_text(
            image_embeds, ids, mask, attention_type, output_positions=output_positions
        ).last_hidden_state
        kept = states[:, : output_positions or NUM_QUERY_TOKENS + 2]
        assert states.shape[1] == (output_positions or NUM_QUERY_TOKENS + ids.shape[1])
        kept.pow(2).sum().backward()
        runs.append(
            (kept.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
        )
    (full, full_gradients), *others = runs
    for kept, _ in others:
        assert torch.allclose(kept, full[:, : kept.shape[1]], **TOLERANCE)
    # the same gradients where the same outputs are used
    _, last_gradients = others[-1]
    for name, gradient in full_gradients.items():
        assert torch.allclose(last_gradients[name], gradient, **TOLERANCE), name
    text_only = model.text_outputs(ids, mask, output_positions=1).last_hidden_state
    assert torch.allclose(text_only[:, 0], model.text_outputs(ids, mask).last_hidden_state[:, 0], **TOLERANCE)
    with pytest.raises(ValueError, match="output_positions"):
        model.text_outputs(ids, mask, output_positions=0)
