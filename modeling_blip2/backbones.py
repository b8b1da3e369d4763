"""Any transformers vision model as BLIP-2's frozen image encoder.

`Blip2VisionBackbone` wraps the model that `AutoModel.from_config(vision_config)` builds (CLIP / SigLIP / DINOv2 /
ViT / ConvNeXt ...) and turns it into what the Q-Former reads: the hidden state at `vision_feature_layer` as a
`(batch, tokens, channels)` sequence (a convolutional `(B, C, H, W)` map becomes `H * W` tokens), without the class
token under `vision_feature_select_strategy="default"`, followed by the paper's trainable post-encoder LayerNorm.
It offers the same interface as this package's own `Blip2VisionModel` (`forward`, `forward_features`,
`apply_post_layernorm`, `post_layernorm`), so nothing downstream branches on the encoder family.

Every encoder takes `(B, C, H, W)` images, as every path of the package passes them (forward, generate,
`encode_images`, the feature cache, the pipelines). SigLIP2's NaFlex `Siglip2VisionModel` reads patch sequences
instead (`Siglip2ImageProcessor`: `(B, num_patches, C * p * p)` plus `pixel_attention_mask` and `spatial_shapes`); the
backbone cuts the images into those itself, on the fixed `H / p x W / p` grid with every patch valid, in the
processor's order. That is exactly what the processor makes of a square image at `isqrt(max_num_patches) * p`
pixels, the fixed resolution `Blip2ImageTextProcessor.from_unimodal_pretrained` prepares SigLIP2 images at.
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
# Encoders whose forward reads patch sequences (NaFlex) rather than images: `images_to_patch_sequence` feeds them.
PATCH_SEQUENCE_ENCODERS = ("siglip2_vision_model",)


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


def images_to_patch_sequence(pixel_values: torch.Tensor, patch_size: int) -> dict[str, torch.Tensor]:
    """The NaFlex inputs (`Siglip2VisionModel`) of `(B, C, H, W)` images on the fixed `H / p x W / p` grid.

    Patches are in row-major order, each flattened as `(p, p, C)`, as `Siglip2ImageProcessor`'s
    `convert_image_to_patches` does; every patch is valid (no padding), so `pixel_attention_mask` is all ones.
    """
    batch, channels, height, width = pixel_values.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"pixel_values of {height}x{width} pixels do not split into {patch_size}x{patch_size} patches: the "
            f"encoder reads patch sequences, so height and width must be multiples of its patch_size ({patch_size})"
        )
    rows, columns = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch, channels, rows, patch_size, columns, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # (B, rows, columns, p, p, C)
    patches = patches.reshape(batch, rows * columns, patch_size * patch_size * channels)  # (B, N, p*p*C)
    device = pixel_values.device
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(batch, rows * columns, dtype=torch.int32, device=device),
        "spatial_shapes": torch.tensor([[rows, columns]] * batch, dtype=torch.long, device=device),
    }


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
        self._reads_patch_sequences = getattr(vision_config, "model_type", None) in PATCH_SEQUENCE_ENCODERS
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
        if self._reads_patch_sequences:
            self._refuse_patch_sequences(pixel_values)
        check_pixel_values(pixel_values, getattr(self.config, "num_channels", pixel_values.shape[1]))
        kwargs: dict[str, Any] = {"output_hidden_states": True, "return_dict": True}
        if output_attentions:
            kwargs["output_attentions"] = True
        if interpolate_pos_encoding and self._takes_interpolate_pos_encoding:
            kwargs["interpolate_pos_encoding"] = True
        pixel_values = pixel_values.to(self.dtype)
        if self._reads_patch_sequences:  # its position embeddings are resized to any grid: no interpolation flag
            return self.backbone(**images_to_patch_sequence(pixel_values, self.config.patch_size), **kwargs)
        return self.backbone(pixel_values=pixel_values, **kwargs)

    def _refuse_patch_sequences(self, pixel_values: Any) -> None:
        if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 3:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)} look like the patch sequences of "
                f"{type(self.backbone).__name__}'s own image processor (NaFlex: pixel_values, pixel_attention_mask, "
                "spatial_shapes); BLIP-2 takes (batch, channels, height, width) images and cuts the patches itself. "
                "Prepare the images with Blip2ImageTextProcessor.from_unimodal_pretrained(...) or "
                "modeling_blip2.processing.fixed_resolution_image_processor(image_processor)"
            )

    def _select(self, outputs: Any, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden_state = outputs.hidden_states[self.feature_layer]
        num_patches = num_patch_tokens(pixel_values, getattr(self.config, "patch_size", None))
        return select_image_features(hidden_state, self.select_strategy, num_patches)
