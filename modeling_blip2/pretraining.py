"""Stage-1 models: representation learning against a frozen image encoder (ITC, ITM, ITG) and retrieval.

State-dict keys: `Blip2ForImageTextRetrieval` has those of the official `blip2-itm-vit-g` checkpoints;
`Blip2ForPretraining` adds the temperature `temp` and the Q-Former LM head `qformer_lm_head.*`, which stock
transformers drops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, BaseModelOutputWithPoolingAndCrossAttentions
from transformers.utils import ModelOutput, logging

from .configuration import Blip2Config
from .losses import (
    Stage1Losses,
    gather_no_grad,
    gather_with_grad,
    itc_loss,
    itg_inputs_and_labels,
    itg_loss,
    itg_loss_on_predicted_positions,
    itm_loss,
    itm_negatives_exist,
    rank_and_world_size,
    sample_hard_negatives,
)
from .modeling import (
    QFORMER_TEXT_EMBEDDINGS_PATTERN,
    Blip2ImageFeaturesOutput,
    Blip2PreTrainedModel,
    Blip2QFormerModel,
    _wants_dict,
    build_vision_model,
)
from .qformer import Blip2QFormerKeyValues, Blip2QFormerLMHead, Blip2TextEmbeddings
from .vision import check_frozen_image_features

STAGE1_LOSSES = ("itc", "itm", "itg")
ITM_WITHOUT_NEGATIVES = ("raise", "skip")
logger = logging.get_logger(__name__)
# LAVIS initialises the temperature at 0.07 and clamps it; out of this range the contrastive loss degenerates.
TEMPERATURE_INIT = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)


@dataclass
class Blip2ImageTextMatchingOutput(ModelOutput):
    """Output of `Blip2ForImageTextRetrieval` (field names as transformers' class).

    Args:
        loss: Unused (always None); stage-1 losses live in `Blip2ForPretraining`.
        logits_per_image: ITC mode: `(num_images, num_texts)` cosine similarities (max over queries). ITM mode:
            `(batch, 2)` logits of (no match, match) for each image-text pair.
        logits_per_text: The transpose of `logits_per_image`.
        text_embeds: ITC mode: `(num_texts, embed_dim)` normalised text embeddings. ITM mode: `(batch, Q + T,
            hidden)` Q-Former outputs of the pair.
        image_embeds: ITC mode: `(num_images, num_query_tokens, embed_dim)` normalised query embeddings. ITM mode:
            `(batch, 1 + num_patches, vision_hidden)` image features.
        text_model_output: The Q-Former output.
        vision_model_output: The vision model output.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    vision_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value.to_tuple() if isinstance(value, ModelOutput) else value for value in self.values())


@dataclass
class Blip2PretrainingOutput(ModelOutput):
    """Output of `Blip2ForPretraining.forward`.

    Args:
        loss: Scalar sum of the computed terms (the paper's total); `Blip2Trainer` re-weights the terms itself.
        loss_itc, loss_itm, loss_itg: Scalar loss terms (None when not computed).
        image_features: `(batch, num_query_tokens, embed_dim)` L2-normalised projected query outputs.
        text_features: `(batch, embed_dim)` L2-normalised projected `[CLS]` outputs.
        similarity_image_to_text: `(batch, global_batch)` local images against all ranks' texts, over `temp`.
        similarity_text_to_image: `(batch, global_batch)` local texts against all ranks' images, over `temp`.
        itm_logits: `(3 * batch, 2)` for `[positives; (hard negative image, text); (image, hard negative text)]`.
        itg_logits: `(batch, text_length, qformer_vocab)` next-token logits of image-grounded generation.
        temperature: The clamped temperature used.
    """

    loss: torch.FloatTensor | None = None
    loss_itc: torch.FloatTensor | None = None
    loss_itm: torch.FloatTensor | None = None
    loss_itg: torch.FloatTensor | None = None
    image_features: torch.FloatTensor | None = None
    text_features: torch.FloatTensor | None = None
    similarity_image_to_text: torch.FloatTensor | None = None
    similarity_text_to_image: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    itg_logits: torch.FloatTensor | None = None
    temperature: torch.FloatTensor | None = None


class _Blip2Stage1Model(Blip2PreTrainedModel):
    """Frozen-encoder side of BLIP-2: vision encoder, queries, Q-Former with text input, ITC projections, ITM head."""

    # Under fp16/bf16 loading only the frozen ViT body changes dtype; what stage 1 trains stays fp32 (the paper's
    # recipe, as in the generative classes).
    _keep_in_fp32_modules_strict = [
        "query_tokens",
        "qformer",
        QFORMER_TEXT_EMBEDDINGS_PATTERN,
        "vision_model.post_layernorm",
        "vision_projection",
        "text_projection",
        "itm_head",
    ]

    def __init__(self, config: Blip2Config) -> None:
        if not config.qformer_config.use_qformer_text_input:
            raise ValueError(
                f"{type(self).__name__} reads text with the Q-Former: set qformer_config.use_qformer_text_input=True"
            )
        super().__init__(config)
        hidden = config.qformer_config.hidden_size
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, hidden))
        self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.vision_projection = nn.Linear(hidden, config.image_text_hidden_size)
        self.text_projection = nn.Linear(hidden, config.image_text_hidden_size)
        self.itm_head = nn.Linear(hidden, 2)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embeddings.word_embeddings = value

    # -- building blocks, shared by the losses, retrieval and the evaluator ---------------------------------------
    def image_embeddings(
        self,
        pixel_values: torch.Tensor | None = None,
        frozen_image_features: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        """`(B, 1 + num_patches, vision_hidden)` post-LayerNorm image features, from pixels or cached features.

        `frozen_image_features` are `vision_model.forward_features(pixel_values)` (the frozen encoder's output before
        the trainable post-LayerNorm), e.g. from a feature cache.
        """
        if (pixel_values is None) == (frozen_image_features is None):
            raise ValueError("pass exactly one of pixel_values and frozen_image_features")
        if frozen_image_features is None:
            frozen_image_features = self.vision_model.forward_features(pixel_values, interpolate_pos_encoding)
        else:
            check_frozen_image_features(frozen_image_features, self.config.vision_feature_size)
        return self.vision_model.apply_post_layernorm(frozen_image_features)

    def project_image(self, query_output: torch.Tensor) -> torch.Tensor:
        """`(B, Q, hidden)` -> `(B, Q, embed_dim)` L2-normalised contrastive image embeddings."""
        return F.normalize(self.vision_projection(query_output.to(self.vision_projection.weight.dtype)), dim=-1)

    def text_outputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, **qformer_kwargs: Any
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """The text alone through the Q-Former (the unimodal text pass): `(B, T, hidden)`."""
        return self.qformer(
            self.embeddings(input_ids),
            query_length=0,
            attention_mask=attention_mask,
            return_dict=True,
            **qformer_kwargs,
        )

    def project_text(self, text_output: torch.Tensor) -> torch.Tensor:
        """`(B, T, hidden)` -> `(B, embed_dim)` L2-normalised contrastive embedding of the `[CLS]` position."""
        return F.normalize(self.text_projection(text_output[:, 0].to(self.text_projection.weight.dtype)), dim=-1)

    def matching_outputs(
        self,
        image_embeds: torch.Tensor | Blip2QFormerKeyValues,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **qformer_kwargs: Any,
    ) -> tuple[torch.Tensor, BaseModelOutputWithPoolingAndCrossAttentions]:
        """ITM: `[queries; text]` with the bidirectional mask, queries cross-attending to the image: `(B, S,
        vision_hidden)` features, or their `qformer.image_key_values` (e.g. one image's, repeated for k texts).

        Returns the `(B, 2)` logits (the ITM head averaged over the query outputs) and the Q-Former output.
        """
        num_queries = self.config.num_query_tokens
        outputs = self._queries_with_text(image_embeds, input_ids, attention_mask, "bidirectional", **qformer_kwargs)
        query_part = outputs.last_hidden_state[:, :num_queries].to(self.itm_head.weight.dtype)
        return self.itm_head(query_part).mean(dim=1), outputs

    # -- public feature API (transformers 5's dual-encoder getters) ----------------------------------------------
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> Blip2ImageFeaturesOutput | tuple:
        """Contrastive image embeddings: `pooler_output` is `(B, num_query_tokens, embed_dim)`, L2-normalised (one
        per query; ITC takes the best-matching one); `last_hidden_state` is the vision encoder output, and
        `vision_outputs` / `qformer_outputs` the full outputs. Gradients flow."""
        wanted = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        vision_outputs = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **wanted
        )
        qformer_outputs = self.query_outputs(vision_outputs.last_hidden_state, **wanted)
        features = Blip2ImageFeaturesOutput(
            last_hidden_state=vision_outputs.last_hidden_state,
            pooler_output=self.project_image(qformer_outputs.last_hidden_state),
            hidden_states=vision_outputs.hidden_states,
            attentions=vision_outputs.attentions,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )
        return features if _wants_dict(return_dict, self.config) else features.to_tuple()

    def get_text_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """Contrastive text embeddings: `pooler_output` is `(B, embed_dim)`, the L2-normalised projection of the
        `[CLS]` output of the unimodal text pass; `last_hidden_state` is that pass's `(B, T, qformer_hidden)`
        output. Gradients flow.

        `Blip2ForPretraining.get_text_features` is this. `Blip2ForImageTextRetrieval` has no `get_text_features`,
        as transformers' class has none: its common tests read that getter as the LLM's text features (of
        `text_config`'s width), which a retrieval model does not have.
        """
        outputs = self.text_outputs(
            input_ids, attention_mask, output_attentions=output_attentions, output_hidden_states=output_hidden_states
        )
        features = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=self.project_text(outputs.last_hidden_state),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return features if _wants_dict(return_dict, self.config) else features.to_tuple()

    def _strip_image_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drops `num_query_tokens` leading `<image>` placeholders (the stock processor's layout), if present."""
        image_token, num_queries = self.config.image_token_index, self.config.num_query_tokens
        if image_token is None or input_ids.shape[1] < num_queries:
            return input_ids, attention_mask
        if bool((input_ids[:, :num_queries] == image_token).all()):
            input_ids = input_ids[:, num_queries:]
            attention_mask = None if attention_mask is None else attention_mask[:, num_queries:]
        return input_ids, attention_mask


class Blip2ForImageTextRetrieval(_Blip2Stage1Model):
    """Image-text retrieval and matching (the layout of the official `blip2-itm-vit-g` checkpoints).

    `use_image_text_matching_head=False` scores every image against every text by ITC cosine similarity;
    `True` scores each image-text pair with the ITM head. See `retrieval.evaluate_retrieval` for ITC + top-k ITM
    reranking.
    """

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        use_image_text_matching_head: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        interpolate_pos_encoding: bool = False,
        **kwargs: Any,
    ) -> Blip2ImageTextMatchingOutput | tuple:
        """Scores images against texts.

        Args:
            pixel_values: `(num_images, 3, H, W)`.
            input_ids: `(num_texts, T)` Q-Former (BERT) token ids; for ITM, one text per image.
            attention_mask: `(num_texts, T)`.
            use_image_text_matching_head: ITM pair scores instead of ITC all-pairs similarities.
        """
        wanted = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        vision_outputs = self.vision_model(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, return_dict=True, **wanted
        )
        image_embeds = vision_outputs.last_hidden_state
        input_ids, attention_mask = self._strip_image_tokens(input_ids, attention_mask)
        if use_image_text_matching_head:
            if input_ids.shape[0] != image_embeds.shape[0]:
                raise ValueError(
                    f"image-text matching scores pairs: got {image_embeds.shape[0]} images, {input_ids.shape[0]} texts"
                )
            logits, text_outputs = self.matching_outputs(image_embeds, input_ids, attention_mask, **wanted)
            output = Blip2ImageTextMatchingOutput(
                logits_per_image=logits,
                logits_per_text=logits.t(),
                text_embeds=text_outputs.last_hidden_state,
                image_embeds=image_embeds,
                text_model_output=text_outputs,
                vision_model_output=vision_outputs,
            )
        else:
            image_features = self.project_image(self.query_outputs(image_embeds).last_hidden_state)
            text_outputs = self.text_outputs(input_ids, attention_mask, **wanted)
            text_features = self.project_text(text_outputs.last_hidden_state)
            # (I, Q, E) x (E, T) -> (I, Q, T): the best-matching query decides.
            logits_per_image = torch.matmul(image_features, text_features.t()).max(dim=1).values
            output = Blip2ImageTextMatchingOutput(
                logits_per_image=logits_per_image,
                logits_per_text=logits_per_image.t(),
                text_embeds=text_features,
                image_embeds=image_features,
                text_model_output=text_outputs,
                vision_model_output=vision_outputs,
            )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class Blip2ForPretraining(_Blip2Stage1Model):
    """Stage 1 of BLIP-2: the Q-Former learns from a frozen image encoder with ITC, ITM and ITG.

    Adds to the retrieval layout the learnable temperature `temp` and the Q-Former LM head (ITG), whose decoder is
    tied to the Q-Former word embeddings. `generate` captions images through the ITG head.
    """

    _tied_weights_keys = {"qformer_lm_head.decoder.weight": "embeddings.word_embeddings.weight"}
    _keep_in_fp32_modules_strict = [*_Blip2Stage1Model._keep_in_fp32_modules_strict, "temp", "qformer_lm_head"]
    # The stage-1 terms are batch means: Trainer must divide them by the gradient-accumulation steps itself.
    accepts_loss_kwargs = False

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.temp = nn.Parameter(torch.tensor(TEMPERATURE_INIT))
        self.qformer_lm_head = Blip2QFormerLMHead(config.qformer_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self:
            init.constant_(self.temp, TEMPERATURE_INIT)

    @classmethod
    def from_unimodal_pretrained(
        cls,
        vision_model_name_or_path: str | os.PathLike,
        qformer_name_or_path: str | os.PathLike | None = None,
        num_query_tokens: int = 32,
        **config_overrides: Any,
    ) -> Blip2ForPretraining:
        """A stage-1 model composed from a vision checkpoint (any transformers vision model, or a dual encoder's
        vision tower; frozen but for the post-encoder LayerNorm) and a BERT for the Q-Former (random without one).
        See `composition.compose_from_unimodal`."""
        from .composition import compose_from_unimodal

        return compose_from_unimodal(
            cls, vision_model_name_or_path, None, qformer_name_or_path, num_query_tokens, **config_overrides
        )

    def get_output_embeddings(self) -> nn.Module:
        return self.qformer_lm_head.decoder

    def get_text_features(self, *args: Any, **kwargs: Any) -> BaseModelOutputWithPooling | tuple:
        """Contrastive text embeddings (see `get_text_embeddings`)."""
        return self.get_text_embeddings(*args, **kwargs)

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.qformer_lm_head.decoder = new_embeddings

    @property
    def temperature(self) -> torch.Tensor:
        """`temp` clamped to its working range (the gradient stops at the bounds)."""
        return self.temp.clamp(*TEMPERATURE_RANGE)

    def itg_logits(
        self,
        image_embeds: torch.Tensor | Blip2QFormerKeyValues | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        query_key_values: Blip2QFormerKeyValues | None = None,
    ) -> torch.Tensor:
        """ITG: `[queries; text]` with the multimodal causal mask -> `(B, T, vocab)` next-token logits for the text.

        Under that mask the queries see only queries, so their keys and values are those of the query pass alone:
        with `query_key_values` (`query_outputs(..., return_key_values=True).key_values`) the text attends to
        them and only the text runs (what LAVIS does; the same logits and gradients as running the queries again).
        Without, `[queries; text]` runs on `image_embeds` (features or their key/values).
        """
        if query_key_values is not None:
            return self.qformer_lm_head(self._text_after_queries(input_ids, attention_mask, query_key_values))
        num_queries = self.config.num_query_tokens
        outputs = self._queries_with_text(image_embeds, input_ids, attention_mask, "multimodal_causal")
        return self.qformer_lm_head(outputs.last_hidden_state[:, num_queries:])

    def _text_after_queries(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        prefix: Blip2QFormerKeyValues,
        position_ids: torch.Tensor | None = None,
        return_key_values: bool = False,
    ) -> torch.Tensor | BaseModelOutputWithPoolingAndCrossAttentions:
        """The text under the multimodal causal mask, attending to `prefix` (the queries' key/values, then any
        text already decoded): the `(B, T, hidden)` text outputs, or the whole output with `return_key_values`."""
        outputs = self.qformer(
            self.embeddings(input_ids, position_ids=position_ids),
            query_length=0,
            attention_mask=attention_mask,
            attention_type="multimodal_causal",
            prefix_key_values=prefix,
            return_key_values=return_key_values,
            return_dict=True,
        )
        return outputs if return_key_values else outputs.last_hidden_state

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        frozen_image_features: torch.Tensor | None = None,
        image_ids: torch.Tensor | None = None,
        losses: tuple[str, ...] = STAGE1_LOSSES,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        itm_without_negatives: str = "raise",
        return_itg_logits: bool = True,
        hard_negative_seed: int | None = None,
        **kwargs: Any,
    ) -> Blip2PretrainingOutput | tuple:
        """Computes the stage-1 losses on a batch of image-text pairs.

        Args:
            input_ids: `(B, T)` Q-Former (BERT) token ids starting with `[CLS]`; `[DEC]` replaces it for ITG.
            attention_mask: `(B, T)` padding mask.
            pixel_values: `(B, 3, H, W)` images, or instead
            frozen_image_features: `(B, 1 + num_patches, vision_hidden)` cached `vision_model.forward_features`.
            image_ids: `(B,)` ids of the images; captions of the same image are positives of each other (soft ITC
                targets, never drawn as ITM negatives).
            losses: Which of `"itc"`, `"itm"`, `"itg"` to compute (ITM needs ITC's similarities).
            hard_negatives: `(negative image per text, negative text per image)` indices into the (gathered)
                batch, to use instead of drawing them from the similarities (reproducibility, tests).
            itm_without_negatives: What to do when the global batch holds no hard negative for ITM (one image, or
                one image id throughout, e.g. the last batch of an epoch): `"raise"` a `ValueError`, or `"skip"`
                ITM for this batch (`loss_itm` is then a zero that keeps the ITM head in the graph, `itm_logits`
                None; warned once). `Blip2Trainer` skips, so that an epoch always finishes.
            return_itg_logits: Return the `(B, T, vocab)` ITG logits. False: the ITG head runs only on the positions
                that predict a token (not on padding), `itg_logits` is None and `loss_itg` the same; this saves the
                logits' memory and the head's work on padding. `Blip2Trainer` passes False.
            hard_negative_seed: Draw the ITM hard negatives with this seed over the whole gathered batch (see
                `sample_hard_negatives`; the same seed on every rank): the same distribution as the default draw from
                torch's global generator, but `W` processes of `B` samples draw what one process draws on `W * B`.
                `Blip2Trainer` passes one per step with `seeded_itm_negatives`.
        """
        if itm_without_negatives not in ITM_WITHOUT_NEGATIVES:
            raise ValueError(
                f"itm_without_negatives must be one of {ITM_WITHOUT_NEGATIVES}, got {itm_without_negatives!r}"
            )
        unknown = set(losses) - set(STAGE1_LOSSES)
        if unknown or not losses:
            raise ValueError(f"losses must be a non-empty subset of {STAGE1_LOSSES}, got {losses}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = self.image_embeddings(pixel_values, frozen_image_features, interpolate_pos_encoding)
        batch = image_embeds.shape[0]
        if input_ids.shape[0] != batch:
            raise ValueError(f"got {batch} images but {input_ids.shape[0]} texts: stage 1 trains on image-text pairs")
        if image_ids is not None and tuple(image_ids.shape) != (batch,):
            raise ValueError(f"image_ids must have one id per image, shape ({batch},); got {tuple(image_ids.shape)}")

        temperature = self.temperature
        output = Blip2PretrainingOutput(temperature=temperature)
        # Every pass of the step reads the same B images: their cross-attention keys and values are computed once
        # and shared (the ITM pairs select their rows), and ITG's text attends to the contrastive query pass's own
        # keys and values instead of running the queries again. Losses and gradients are those of separate passes.
        image = self.qformer.image_key_values(image_embeds)
        query_pass = self.query_outputs(image, return_key_values="itg" in losses)
        if "itc" in losses or "itm" in losses:
            output.image_features = self.project_image(query_pass.last_hidden_state)
            # Only [CLS] is projected: the last layer computes no other text position.
            text_pass = self.text_outputs(input_ids, attention_mask, output_positions=1)
            output.text_features = self.project_text(text_pass.last_hidden_state)
            itc = itc_loss(output.image_features, output.text_features, temperature, image_ids=image_ids)
            output.similarity_image_to_text = itc.similarity_image_to_text
            output.similarity_text_to_image = itc.similarity_text_to_image
            if "itc" in losses:
                output.loss_itc = itc.loss
        if "itm" in losses and self._skips_itm(output, image_ids, hard_negatives, itm_without_negatives):
            # No negative anywhere in the global batch (every rank sees the same): a zero that still reaches the
            # ITM head, so distributed data parallel finds every parameter used.
            output.loss_itm = sum(parameter.sum() for parameter in self.itm_head.parameters()) * 0.0
        elif "itm" in losses:
            output.itm_logits = self._itm_logits_with_hard_negatives(
                image_embeds, image, input_ids, attention_mask, image_ids, output, hard_negatives, hard_negative_seed
            )
            output.loss_itm = itm_loss(output.itm_logits)
        if "itg" in losses:
            decoder_input_ids, labels = itg_inputs_and_labels(
                input_ids, attention_mask, self._decoder_start_token_id(), self.config.qformer_config.pad_token_id or 0
            )
            if return_itg_logits:
                output.itg_logits = self.itg_logits(
                    None, decoder_input_ids, attention_mask, query_key_values=query_pass.key_values
                )
                output.loss_itg = itg_loss(output.itg_logits, labels)
            else:
                text = self._text_after_queries(decoder_input_ids, attention_mask, query_pass.key_values)
                output.loss_itg = itg_loss_on_predicted_positions(text, labels, self.qformer_lm_head)
        output.loss = Stage1Losses.combine(output.loss_itc, output.loss_itm, output.loss_itg).loss
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()

    def _skips_itm(
        self,
        itc: Blip2PretrainingOutput,
        image_ids: torch.Tensor | None,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None,
        itm_without_negatives: str,
    ) -> bool:
        if itm_without_negatives != "skip" or hard_negatives is not None:
            return False
        num_rows, num_columns = itc.similarity_image_to_text.shape
        if itm_negatives_exist(num_rows, num_columns, image_ids, itc.similarity_image_to_text.device):
            return False
        logger.warning_once(
            f"image-text matching skipped on a global batch of {num_columns} sample(s) with no hard negative (one "
            "image, or one image id throughout); ITC and ITG still train on it. Shown once."
        )
        return True

    def _itm_logits_with_hard_negatives(
        self,
        image_embeds: torch.Tensor,
        image: Blip2QFormerKeyValues,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None,
        itc: Blip2PretrainingOutput,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        hard_negative_seed: int | None = None,
    ) -> torch.Tensor:
        """`[positives; (hard negative image, text); (image, hard negative text)]` -> `(3B, 2)` ITM logits.

        `image` holds the local images' cross-attention keys and values; each pair selects its image's. Negatives
        come from every rank's batch: images are gathered with their gradient (and the negatives' keys and values
        computed from them), texts without.
        """
        if hard_negatives is None:
            hard_negatives = sample_hard_negatives(
                itc.similarity_image_to_text, itc.similarity_text_to_image, image_ids, seed=hard_negative_seed
            )
        negative_image, negative_text = hard_negatives
        negative_image = torch.as_tensor(negative_image, dtype=torch.long, device=image_embeds.device)
        batch = image_embeds.shape[0]
        _, world_size = rank_and_world_size()
        if world_size > 1:
            negatives = self.qformer.image_key_values(gather_with_grad(image_embeds)[negative_image])
            images = Blip2QFormerKeyValues.concatenate([image, negatives, image])
        else:
            local = torch.arange(batch, device=negative_image.device)
            images = image.select(torch.cat([local, negative_image, local]))
        all_ids = gather_no_grad(input_ids) if world_size > 1 else input_ids
        all_masks = gather_no_grad(attention_mask) if world_size > 1 else attention_mask
        texts = torch.cat([input_ids, input_ids, all_ids[negative_text]])  # (3B, T)
        masks = torch.cat([attention_mask, attention_mask, all_masks[negative_text]])
        # The ITM head reads the queries: the last layer computes no text position.
        return self.matching_outputs(images, texts, masks, output_positions=self.config.num_query_tokens)[0]

    def _decoder_start_token_id(self) -> int:
        start = self.config.qformer_config.bos_token_id
        if start is None:
            raise ValueError(
                "image-grounded generation starts from [DEC], but qformer_config.bos_token_id is not set: add [DEC] "
                "to the Q-Former tokenizer (load_qformer_tokenizer) and set its id in the config"
            )
        return start

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        frozen_image_features: torch.Tensor | None = None,
        max_new_tokens: int = 30,
        eos_token_id: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        num_return_sequences: int = 1,
    ) -> torch.LongTensor:
        """Captions images through the ITG head (Q-Former only, no LLM): `(B * num_return_sequences, 1 + n)` ids
        starting with `[DEC]`, each image's sequences side by side (as transformers' `generate` returns them).

        Greedy by default; `do_sample=True` samples, from the logits divided by `temperature`, restricted to the
        `top_k` most likely tokens and then to the nucleus of `top_p` (the smallest set of most likely tokens whose
        probability reaches `top_p`; BLIP's CapFilt samples with 0.9), in transformers' order. Rows that produced
        `eos_token_id` (BERT's `[SEP]`) are padded from then on. With `num_return_sequences`, the image encoder and
        the query pass run once per image and their keys and values are repeated for its sequences (CapFilt samples
        10 captions per image).
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_return_sequences < 1:
            raise ValueError(f"num_return_sequences must be >= 1, got {num_return_sequences}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 to sample, got {temperature}")
        if do_sample and top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None for no top-k filter), got {top_k}")
        if do_sample and top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filter), got {top_p}")
        image_embeds = self.image_embeddings(pixel_values, frozen_image_features)
        batch = image_embeds.shape[0] * num_return_sequences
        pad = self.config.qformer_config.pad_token_id or 0
        ids = torch.full((batch, 1), self._decoder_start_token_id(), dtype=torch.long, device=image_embeds.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        # The queries run once; each step feeds only the newest token, attending to the keys and values so far.
        prefix = self.query_outputs(image_embeds, return_key_values=True).key_values
        if num_return_sequences > 1:
            prefix = prefix.repeat_interleave(num_return_sequences)  # (B, ...) -> (B * n, ...)
        for position in range(min(max_new_tokens, self.config.qformer_config.max_position_embeddings - 1)):
            step = self._text_after_queries(
                ids[:, -1:],
                None,
                prefix,
                position_ids=torch.tensor([position], device=ids.device),
                return_key_values=True,
            )
            prefix = step.key_values
            logits = self.qformer_lm_head(step.last_hidden_state[:, -1]).float()  # (B, vocab)
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    threshold = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < threshold, float("-inf"))
                if top_p is not None and top_p < 1:
                    # Nucleus: drop a token once the tokens ranked above it hold top_p of the probability (the
                    # most likely token always stays); the set transformers' TopPLogitsWarper keeps. Sorting the
                    # whole vocabulary is the slow part: rows whose nucleus lies within their top 256 tokens (a
                    # trained model's, mostly) rank only those; the others sort everything.
                    probabilities = logits.softmax(dim=-1)
                    outside = torch.ones_like(logits, dtype=torch.bool)  # (B, vocab)
                    top, order = probabilities.topk(min(256, logits.shape[-1]), dim=-1)  # descending
                    covered = top.sum(dim=-1) >= top_p
                    if not bool(covered.all()):
                        rest = (~covered).nonzero().squeeze(1)
                        ranked, ranked_order = probabilities[rest].sort(dim=-1, descending=True)
                        ranked_outside = ranked.cumsum(dim=-1) - ranked >= top_p
                        outside[rest] = outside[rest].scatter(1, ranked_order, ranked_outside)
                    rows = covered.nonzero().squeeze(1)
                    top, order = top[rows], order[rows]
                    outside[rows] = outside[rows].scatter(1, order, top.cumsum(dim=-1) - top >= top_p)
                    logits = logits.masked_fill(outside, float("-inf"))
                next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                next_ids = logits.argmax(dim=-1)
            next_ids = next_ids.masked_fill(finished, pad)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if eos_token_id is not None:
                finished |= next_ids == eos_token_id
                if bool(finished.all()):
                    break
        return ids
