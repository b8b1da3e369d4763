"""Building blocks of the image encoder: EVA ViT-g (the official checkpoints) and CLIP ViT-L style variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import attend
from .configuration import Blip2VisionConfig

PROCESSOR_HINT = (
    "pass the images through the processor (processor(images=...) or blip2_image_processor(...)), which resizes "
    "them, rescales them to [0, 1] and normalizes them"
)


def check_pixel_values(pixel_values: torch.Tensor | None, num_channels: int) -> None:
    """Raises a `ValueError` unless `pixel_values` are a `(batch >= 1, num_channels, H, W)` float tensor of finite
    values: the one check every path into the image encoder goes through (forward, generate, `encode_images`, the
    stage-1 models, retrieval, the feature cache).

    Integer images (e.g. uint8 0-255) are refused rather than cast: the encoder expects normalized floats, and a cast
    would silently give meaningless features. NaN / inf would spread into every output (a NaN loss, empty captions).
    """
    if pixel_values is None:
        raise ValueError("pixel_values are required: a (batch, channels, height, width) float tensor")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a 4-d tensor (batch, channels, height, width), got {shape}")
    if pixel_values.shape[1] != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} channels, got shape {tuple(pixel_values.shape)}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no image (batch size 0)")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be a floating-point tensor of normalized images, got dtype {pixel_values.dtype}: "
            f"{PROCESSOR_HINT}"
        )
    check_finite(pixel_values, "pixel_values", f"check the images or the code that made them, or {PROCESSOR_HINT}")


def check_frozen_image_features(features: torch.Tensor, hidden_size: int) -> None:
    """Raises a `ValueError` unless `features` are `(batch, tokens, hidden_size)` finite frozen-encoder outputs."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3 or features.shape[-1] != hidden_size:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(
            f"frozen_image_features must be (batch, tokens, vision hidden size {hidden_size}), got {shape}"
        )
    check_finite(features, "frozen_image_features", "rebuild the feature cache from finite images")


def check_finite(tensor: torch.Tensor, name: str, hint: str) -> None:
    """Raises a `ValueError` naming `name` when `tensor` holds NaN or inf (one reduction per call).

    Skipped under `torch.compile` (a compiled graph cannot branch on the data) and on the meta device (no data).
    """
    if torch.compiler.is_compiling() or tensor.device.type == "meta":
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int((~finite).sum())
    rows = torch.nonzero((~finite).flatten(1).any(dim=1)).flatten().tolist() if tensor.dim() > 1 else []
    where = f" in row(s) {rows[:8]}{' ...' if len(rows) > 8 else ''}" if rows else ""
    raise ValueError(
        f"{name} must hold finite values, got {bad} NaN or inf value(s) of {tensor.numel()}{where}; {hint}"
    )


class Blip2VisionEmbeddings(nn.Module):
    """Patch embedding + class token + learned absolute positions (optionally resized to another image size)."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.config = config
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, width))
        # CLIP's patch projection has no bias; EVA's has one.
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            width,
            kernel_size=config.patch_size,
            stride=config.patch_size,
            bias=config.vision_architecture == "eva",
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_patches + 1, width))

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        size = self.config.image_size
        if (height, width) != (size, size) and not interpolate_pos_encoding:
            raise ValueError(
                f"pixel_values must be {size}x{size} for this encoder, got {height}x{width}; resize the images "
                "or pass interpolate_pos_encoding=True to resize the position embeddings"
            )
        patch = self.config.patch_size
        if height < patch or width < patch:
            raise ValueError(f"pixel_values must be at least one patch ({patch}x{patch}), got {height}x{width}")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (B, D, gh, gw)
        grid = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        class_token = self.class_embedding.to(patches.dtype).expand(patches.shape[0], -1, -1)
        embeddings = torch.cat([class_token, patches], dim=1)
        return embeddings + self.position_embeddings_for_grid(*grid).to(embeddings.dtype)

    def position_embeddings_for_grid(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Position embeddings `(1, 1 + gh*gw, D)`, bicubically resized when the patch grid differs from training."""
        positions = self.position_embedding
        side = self.config.image_size // self.config.patch_size
        if (grid_height, grid_width) == (side, side):
            return positions
        class_position, patch_positions = positions[:, :1], positions[:, 1:]
        patch_positions = patch_positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        patch_positions = F.interpolate(
            patch_positions.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(positions.dtype)
        patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, -1)
        return torch.cat([class_position, patch_positions], dim=1)


class Blip2FusedQKV(nn.Linear):
    """The fused query-key-value projection (an `nn.Linear`: same state-dict keys).

    In the EVA layout (`key_bias_is_zero`) the key third of the bias is not a parameter of the original model: it is
    kept for checkpoint compatibility but left out of the computation, so it stays zero under training. Being a
    module called as one (not `F.linear` on its weight from outside) lets accelerate's offload hooks, PEFT and
    quantization wrappers see the call.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, key_bias_is_zero: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.key_bias_is_zero = key_bias_is_zero

    def fused_bias(self) -> torch.Tensor | None:
        """The bias as used in the forward pass (key third zeroed in the EVA layout)."""
        bias = self.bias
        if bias is None or not self.key_bias_is_zero:
            return bias
        query_bias, key_bias, value_bias = bias.chunk(3)
        return torch.cat([query_bias, torch.zeros_like(key_bias), value_bias])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.weight, self.fused_bias())


class Blip2VisionAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    In the EVA layout the bias of the key third is not a parameter of the original model; it is kept in the fused
    bias for checkpoint compatibility but excluded from the computation graph, so it stays zero under training.
    """

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.key_bias_is_zero = config.vision_architecture == "eva"
        self.qkv = Blip2FusedQKV(config.hidden_size, 3 * config.hidden_size, config.qkv_bias, self.key_bias_is_zero)
        self.projection = nn.Linear(config.hidden_size, config.hidden_size)

    def fused_bias(self) -> torch.Tensor | None:
        """The qkv bias as used in the forward pass (key third zeroed in the EVA layout)."""
        return self.qkv.fused_bias()

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, width = hidden_states.shape
        qkv = self.qkv(hidden_states)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)  # each (B, heads, T, head_dim)
        dropout = self.config.attention_dropout if self.training else 0.0
        attended, weights = attend(
            query, key, value, None, dropout, self.config._attn_implementation, need_weights=output_attentions
        )
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        return self.projection(attended), weights


class Blip2VisionMLP(nn.Module):
    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class Blip2VisionEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Blip2VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Blip2VisionMLP(config)

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.self_attn(self.layer_norm1(hidden_states), output_attentions=output_attentions)
        hidden_states = hidden_states + attended
        del attended  # one (B, T, D) activation less at the MLP's memory peak
        hidden_states = hidden_states + self.mlp(self.layer_norm2(hidden_states))
        return hidden_states, weights


class Blip2VisionEncoder(nn.Module):
    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Blip2VisionEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self, hidden_states: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, output_attentions=output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return hidden_states, all_hidden_states, all_attentions
