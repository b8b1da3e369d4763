"""Any transformers vision model as BLIP-2's frozen image encoder.

`Blip2VisionBackbone` wraps the model that `AutoModel.from_config(vision_config)` builds (CLIP / SigLIP / DINOv2 /
ViT / ConvNeXt ...) and turns it into what the Q-Former reads: the hidden state at `vision_feature_layer` as a
`(batch, tokens, channels)` sequence (a convolutional `(B, C, H, W)` map becomes `H * W` tokens), without the class
token under `vision_feature_select_strategy="default"`, followed by the paper's trainable post-encoder LayerNorm.
It offers the same interface as this package's own `Blip2VisionModel` (`forward`, `forward_features`,
`apply_post_layernorm`, `post_layernorm`), so nothing downstream branches on the encoder family.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .vision import check_pixel_values

# LAVIS's `ln_vision` is a plain nn.LayerNorm; encoders that declare an epsilon of their own use it.
DEFAULT_POST_LAYERNORM_EPS = 1e-5


def select_image_features(hidden_state: torch.Tensor, strategy: str, num_patches: int | None) -> torch.Tensor:
    """`(batch, tokens, channels)` image features of one hidden state.

    A `(B, C, H, W)` feature map (convolutional encoders) becomes `H * W` tokens. With `strategy="default"`, the
    tokens before the `num_patches` patch tokens (class token, registers) are dropped.
    """
    if hidden_state.dim() == 4:
        return hidden_state.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, H*W, C)
    if strategy == "default" and num_patches is not None:
        prefix = hidden_state.shape[1] - num_patches
        if prefix > 0:
            return hidden_state[:, prefix:]
    return hidden_state


def num_patch_tokens(pixel_values: torch.Tensor, patch_size: Any) -> int | None:
    """Patch tokens a ViT-style encoder makes of `(B, C, H, W)` images (None when it has no patch size)."""
    if patch_size is None:
        return None
    height, width = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
    return (pixel_values.shape[-2] // height) * (pixel_values.shape[-1] // width)


class Blip2VisionBackbone(nn.Module):
    """A transformers vision model (frozen in BLIP-2) plus the trainable post-encoder LayerNorm.

    Args:
        vision_config: The config of any transformers vision model (`AutoModel.from_config` builds it).
        feature_layer: Index into the encoder's `hidden_states` (`Blip2Config.vision_feature_layer`).
        select_strategy: `"full"` or `"default"` (`Blip2Config.vision_feature_select_strategy`).
        feature_size: Channels of the features at `feature_layer` (`Blip2Config.vision_feature_size`).
    """

    def __init__(self, vision_config: Any, feature_layer: int, select_strategy: str, feature_size: int) -> None:
        super().__init__()
        self.config = vision_config
        self.feature_layer, self.select_strategy = feature_layer, select_strategy
        self.backbone = AutoModel.from_config(vision_config)
        eps = getattr(vision_config, "layer_norm_eps", None) or DEFAULT_POST_LAYERNORM_EPS
        self.post_layernorm = nn.LayerNorm(feature_size, eps=eps)
        accepted = inspect.signature(self.backbone.forward).parameters
        self._takes_interpolate_pos_encoding = "interpolate_pos_encoding" in accepted
        self._share_loading_rules()

    def _share_loading_rules(self) -> None:
        # transformers gathers these from a model's direct children when the composite is built (`post_init`), so
        # this plain wrapper hands its tower's on: blocks that must stay whole on one device (device_map="auto"
        # with offload), modules kept in fp32, tied weights and keys to ignore.
        for name in (
            "_no_split_modules",
            "_skip_keys_device_placement",
            "_keep_in_fp32_modules",
            "_keep_in_fp32_modules_strict",
            "_keys_to_ignore_on_load_unexpected",
            "_keys_to_ignore_on_load_missing",
        ):
            value = getattr(self.backbone, name, None)
            if value:
                setattr(self, name, set(value))
        tied = getattr(self.backbone, "all_tied_weights_keys", None) or {}
        self.all_tied_weights_keys = {f"backbone.{key}": f"backbone.{value}" for key, value in tied.items()}
        ignored_on_save = getattr(self.backbone, "_keys_to_ignore_on_save", None) or []
        self._keys_to_ignore_on_save = {f"backbone.{key}" for key in ignored_on_save}

    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encodes `(batch, channels, height, width)` images into `(batch, tokens, feature_size)` post-LayerNorm
        features (`last_hidden_state`); `pooler_output` is its first token, `hidden_states` / `attentions` the
        encoder's own when asked for."""
        outputs = self._run(pixel_values, interpolate_pos_encoding, bool(output_attentions))
        last_hidden_state = self.apply_post_layernorm(self._select(outputs, pixel_values))
        result = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            attentions=getattr(outputs, "attentions", None) if output_attentions else None,
        )
        return result if return_dict is not False else result.to_tuple()

    def forward_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """The encoder's features at `feature_layer`, *before* the post-encoder LayerNorm: what a frozen-feature
        cache stores. `forward(...).last_hidden_state == apply_post_layernorm(forward_features(...))`."""
        return self._select(self._run(pixel_values, interpolate_pos_encoding, False), pixel_values)

    def apply_post_layernorm(self, features: torch.Tensor) -> torch.Tensor:
        """The trainable post-encoder LayerNorm (LAVIS `ln_vision`), in its own (fp32) dtype."""
        return self.post_layernorm(features.to(self.post_layernorm.weight.dtype))

    def _run(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool, output_attentions: bool) -> Any:
        check_pixel_values(pixel_values, getattr(self.config, "num_channels", pixel_values.shape[1]))
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if output_attentions:
            kwargs["output_attentions"] = True
        if interpolate_pos_encoding and self._takes_interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        pixel_values = pixel_values.to(self.dtype)
        return self.backbone(pixel_values=pixel_values, **kwargs)

    def _select(self, outputs: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_state = outputs.hidden_states[self.feature_layer]
        num_patches = num_patch_tokens(pixel_values, getattr(self.config, "patch_size", None))
        return select_image_features(hidden_state, self.select_strategy, num_patches)
