"""Configurations of the BLIP-2 vision encoder, Q-Former and composite model.

The classes carry `model_type`s of this package so that they never collide with transformers' built-in BLIP-2, but
they read the official Salesforce `config.json` files (`model_type: "blip-2"` and its sub-configs) unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .checkpoint_io import check_local_checkpoint

VISION_ARCHITECTURES = ("eva", "clip")
# transformers' names (LLaVA): "full" keeps every token of the chosen layer, "default" drops the class token (and any
# other tokens before the patch tokens, e.g. DINOv2's registers).
VISION_FEATURE_SELECT_STRATEGIES = ("full", "default")
# Width of EVA ViT-g, the encoder of every official checkpoint: the cross-attention width of a stand-alone Q-Former
# whose config does not say otherwise (the stock default, which stock configs therefore never write out).
DEFAULT_ENCODER_HIDDEN_SIZE = 1408
# Ours and the stock one: a vision or Q-Former config can be read out of either.
COMPOSITE_MODEL_TYPES = ("modeling_blip2", "blip-2")


class _ReadsOfficialConfigs:
    """Maps the `model_type` of the transformers-layout checkpoint onto ours while a config dict is read."""

    official_model_type: ClassVar[str] = ""

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        if not kwargs.get("gguf_file"):
            # transformers reads a weights file as if it were JSON, and answers a local folder without config.json
            # with a default config (from which a model class then builds a full-size model): say what is wrong.
            check_local_checkpoint(
                pretrained_model_name_or_path,
                f"{cls.__name__}.from_pretrained",
                (kwargs.get("_configuration_file") or "config.json",),
                subfolder=kwargs.get("subfolder") or "",
                allow_json_file=True,
            )
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls._normalise_official(config_dict), kwargs

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PreTrainedConfig:
        return super().from_dict(cls._normalise_official(dict(config_dict)), **kwargs)

    @classmethod
    def _normalise_official(cls, config_dict: dict[str, Any]) -> dict[str, Any]:
        model_type = config_dict.get("model_type")
        if model_type == cls.official_model_type:
            return {**config_dict, "model_type": cls.model_type}
        # A sub-config may be read from its composite's config.json (`base_config_key` picks it out later).
        accepted = {cls.model_type, *(COMPOSITE_MODEL_TYPES if cls.base_config_key else ())}
        if model_type is not None and model_type not in accepted:
            raise ValueError(
                f"{cls.__name__} expects a BLIP-2 config (model_type {cls.model_type!r} or "
                f"{cls.official_model_type!r}), got model_type {model_type!r}"
            )
        return config_dict


class Blip2VisionConfig(_ReadsOfficialConfigs, PreTrainedConfig):
    """Configuration of the frozen image encoder.

    Defaults describe EVA ViT-g/14 with its last layer removed (39 of 40 layers, the paper's "penultimate layer"
    features), as in every official checkpoint.

    Args:
        hidden_size: Width of the encoder.
        intermediate_size: Width of the feed-forward layers.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Attention heads per block.
        num_channels: Channels of the input images.
        image_size: Side of the (square) input images in pixels.
        patch_size: Side of the (square) patches in pixels.
        hidden_act: Activation of the feed-forward layers (`"gelu"` for EVA, `"quick_gelu"` for CLIP).
        layer_norm_eps: Epsilon of the LayerNorms inside the blocks.
        post_layernorm_eps: Epsilon of the LayerNorm after the encoder (LAVIS `ln_vision`). `None` uses
            `layer_norm_eps`, which reproduces the stock transformers model; LAVIS itself uses 1e-5 there.
        attention_dropout: Dropout on the attention probabilities.
        initializer_range: Standard deviation of the weight initialisation. The stock default (1e-10) makes a
            freshly initialised encoder output almost nothing, so ours is 0.02.
        qkv_bias: Whether the fused qkv projection has a bias.
        vision_architecture: `"eva"` (EVA ViT-g: post-LN-free pre-norm blocks, no key bias, biased patch
            embedding) or `"clip"` (OpenAI CLIP ViT-L: a LayerNorm before the blocks, full qkv bias, patch
            embedding without bias).
    """

    model_type = "modeling_blip2_vision_model"
    official_model_type = "blip_2_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    post_layernorm_eps: float | None = None
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    qkv_bias: bool = True
    vision_architecture: str = "eva"

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.image_size = _square_side("image_size", self.image_size)
        self.patch_size = _square_side("patch_size", self.patch_size)
        if self.vision_architecture not in VISION_ARCHITECTURES:
            raise ValueError(
                f"vision_architecture must be one of {VISION_ARCHITECTURES}, got {self.vision_architecture!r}"
            )
        _check_divisible("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")

    @property
    def resolved_post_layernorm_eps(self) -> float:
        """Epsilon of the post-encoder LayerNorm after applying the `None` default."""
        return self.layer_norm_eps if self.post_layernorm_eps is None else self.post_layernorm_eps

    @property
    def num_patches(self) -> int:
        """Number of patch tokens at the configured image size."""
        return (self.image_size // self.patch_size) ** 2


class Blip2QFormerConfig(_ReadsOfficialConfigs, PreTrainedConfig):
    """Configuration of the Querying Transformer, a BERT-style encoder whose queries cross-attend to the image.

    Args:
        vocab_size: Size of the Q-Former's text vocabulary (30522 for BERT, 30523 with `[DEC]`).
        hidden_size, num_hidden_layers, num_attention_heads, intermediate_size: BERT dimensions.
        hidden_act: Activation of the feed-forward layers.
        hidden_dropout_prob: Dropout after embeddings and residual branches.
        attention_probs_dropout_prob: Dropout on attention probabilities.
        max_position_embeddings: Longest text the Q-Former's position embeddings cover.
        initializer_range: Standard deviation of the weight initialisation.
        layer_norm_eps: Epsilon of every Q-Former LayerNorm.
        pad_token_id: Padding id of the Q-Former tokenizer.
        cross_attention_frequency: Layers `i` with `i % cross_attention_frequency == 0` cross-attend to the image.
        encoder_hidden_size: Width of the image features. `None` means "the vision width" inside a composite
            config and 1408 (EVA ViT-g) for a stand-alone Q-Former.
        use_qformer_text_input: Whether the layers have the text feed-forward path (needed for stage-1 training,
            retrieval and question-conditioned queries).
        bos_token_id: Id of `[DEC]`, the start token of image-grounded text generation (30522 with the official
            BERT vocabulary plus `[DEC]`).
    """

    model_type = "modeling_blip2_qformer"
    official_model_type = "blip_2_qformer"
    base_config_key = "qformer_config"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    cross_attention_frequency: int = 2
    encoder_hidden_size: int | None = None
    use_qformer_text_input: bool = False
    bos_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        # Stock configs carry a `position_embedding_type` that only ever held "absolute".
        kwargs.pop("position_embedding_type", None)
        super().__post_init__(**kwargs)
        _check_divisible("hidden_size", self.hidden_size, "num_attention_heads", self.num_attention_heads)
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")

    @property
    def resolved_encoder_hidden_size(self) -> int:
        """Width of the image features the cross-attention layers read."""
        return DEFAULT_ENCODER_HIDDEN_SIZE if self.encoder_hidden_size is None else self.encoder_hidden_size

    def has_cross_attention(self, layer_index: int) -> bool:
        """Whether layer `layer_index` cross-attends to the image features."""
        return layer_index % self.cross_attention_frequency == 0


class Blip2Config(_ReadsOfficialConfigs, PreTrainedConfig):
    """Configuration of a BLIP-2 model: vision encoder, Q-Former, query tokens and (optionally used) LLM.

    Args:
        vision_config: The frozen image encoder: a `Blip2VisionConfig` (our EVA / CLIP ViT, the official
            checkpoints' encoder) or its dict, or the config of any transformers vision model (a config object, or a
            dict with its `model_type`: `clip_vision_model`, `siglip_vision_model`, `siglip2_vision_model`, `dinov2`,
            `vit`, `convnext` ...), as `LlavaConfig` takes it. A dual encoder's config (`clip`, `siglip`) gives its
            vision tower's.
        qformer_config: A `Blip2QFormerConfig` or its dict. Its `encoder_hidden_size` is filled in from the width
            of the image features when unset; a value that disagrees with that width is an error.
        text_config: Config (or dict with a `model_type`) of the LLM, resolved through `AutoConfig`
            (OPT, Llama-family, T5 ...). Defaults to OPT.
        num_query_tokens: Number of learned queries (32 in the paper).
        image_text_hidden_size: Width of the contrastive embedding space (256).
        image_token_index: Id of the `<image>` placeholder token in the LLM vocabulary, if the tokenizer has one.
        initializer_factor: Kept for compatibility with stock configs.
        initializer_range: Standard deviation for the weights owned by the composite model (projection, heads).
        tie_word_embeddings: Tie the Q-Former LM head (ITG) decoder to the Q-Former word embeddings, as BERT and
            LAVIS do (stage-1 models). The LLM's own tying follows its `text_config`.
        vision_feature_layer: Hidden state of the image encoder the Q-Former reads (transformers' indexing of
            `hidden_states`: 0 is the embedding output, -1 the last layer's output, -2 the second-last, which the
            paper uses). A convolutional encoder's `(B, C, H, W)` map of that stage becomes `H * W` tokens.
        vision_feature_select_strategy: `"full"` keeps every token, `"default"` drops the class token (and the other
            tokens before the patch tokens).
    """

    model_type = "modeling_blip2"
    official_model_type = "blip-2"
    attribute_map: ClassVar[dict[str, str]] = {"image_token_id": "image_token_index"}
    # Trainer's evaluation keeps only the logits (the nested outputs hold the LLM's cache object).
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["vision_outputs", "qformer_outputs", "language_model_outputs"]
    sub_configs_defaults: ClassVar[dict[str, Any]] = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt"),
        "vision_config": Blip2VisionConfig,
        "qformer_config": Blip2QFormerConfig,
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_text_hidden_size: int = 256
    image_token_index: int | None = None
    initializer_factor: float = 1.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"

    def __post_init__(self, **kwargs: Any) -> None:
        # Derived from the LLM below; stock configs store them.
        kwargs.pop("use_decoder_only_language_model", None)
        self.vision_config = resolve_vision_config(self.vision_config)
        self.qformer_config = _without_model_type(self.qformer_config, Blip2QFormerConfig)
        super().__post_init__(**kwargs)
        if self.vision_feature_select_strategy not in VISION_FEATURE_SELECT_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy must be one of {VISION_FEATURE_SELECT_STRATEGIES}, got "
                f"{self.vision_feature_select_strategy!r}"
            )
        vision_width = vision_feature_width(self.vision_config, self.vision_feature_layer)
        if self.qformer_config.encoder_hidden_size is None:
            self.qformer_config.encoder_hidden_size = vision_width
        elif self.qformer_config.encoder_hidden_size != vision_width:
            raise ValueError(
                f"qformer_config.encoder_hidden_size ({self.qformer_config.encoder_hidden_size}) must equal the "
                f"width of the image features ({vision_width}, vision_config at vision_feature_layer "
                f"{self.vision_feature_layer}): the Q-Former cross-attends to them"
            )
        if self.num_query_tokens < 1:
            raise ValueError(f"num_query_tokens must be >= 1, got {self.num_query_tokens}")
        check_image_token_index(self.image_token_index, getattr(self.text_config, "vocab_size", None))
        self.is_encoder_decoder = bool(self.text_config.is_encoder_decoder)

    @property
    def has_own_vision_encoder(self) -> bool:
        """True for this package's EVA / CLIP encoder (`Blip2VisionConfig`), False for another transformers model."""
        return isinstance(self.vision_config, Blip2VisionConfig)

    @property
    def vision_feature_size(self) -> int:
        """Width of the image features the Q-Former reads (`qformer_config.encoder_hidden_size`)."""
        return self.qformer_config.encoder_hidden_size

    @property
    def use_decoder_only_language_model(self) -> bool:
        """True for decoder-only LLMs (OPT, Llama ...), False for encoder-decoder LLMs (T5)."""
        return not self.text_config.is_encoder_decoder

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Written for tools that read the stock layout (e.g. serving engines).
        output["use_decoder_only_language_model"] = self.use_decoder_only_language_model
        return output


def check_image_token_index(image_token_index: int | None, vocab_size: int | None) -> None:
    """Raises a `ValueError` unless `image_token_index` is None or an id of the LLM's `vocab_size`-token vocabulary.

    An id outside it would only fail later, as an index error deep in the LLM's embedding lookup.
    """
    if image_token_index is None or vocab_size is None:
        return
    if not isinstance(image_token_index, int) or isinstance(image_token_index, bool):
        raise ValueError(f"image_token_index must be an int token id or None, got {image_token_index!r}")
    if not 0 <= image_token_index < vocab_size:
        raise ValueError(
            f"image_token_index ({image_token_index}) is outside the LLM vocabulary of {vocab_size} tokens "
            f"(text_config.vocab_size; ids 0..{vocab_size - 1}): add the <image> token to the tokenizer and resize "
            "the LLM's embeddings (language_model.resize_token_embeddings(len(tokenizer))) before building the "
            "config, or set image_token_index to the tokenizer's <image> id"
        )


def resolve_vision_config(vision_config: Any) -> Any:
    """The image encoder's config: ours (kept a dict without `model_type`, for the sub-config machinery) or any
    transformers vision model's config object; a dual encoder's config gives its vision tower's."""
    if vision_config is None or isinstance(vision_config, Blip2VisionConfig):
        return vision_config
    if isinstance(vision_config, dict):
        model_type = vision_config.get("model_type")
        if model_type is None or model_type in (Blip2VisionConfig.model_type, Blip2VisionConfig.official_model_type):
            return _without_model_type(vision_config, Blip2VisionConfig)
        fields = {key: value for key, value in vision_config.items() if key != "model_type"}
        try:
            vision_config = AutoConfig.for_model(model_type, **fields)
        except ValueError as error:
            raise ValueError(
                f"vision_config has model_type {model_type!r}, which this transformers version does not know: "
                "expected the config of a transformers vision model (e.g. clip_vision_model, siglip_vision_model, "
                "dinov2, vit, convnext) or of BLIP-2's own encoder"
            ) from error
    elif not isinstance(vision_config, PreTrainedConfig):
        raise TypeError(f"vision_config must be a config or a dict, got {type(vision_config).__name__}")
    if vision_config.model_type == Blip2VisionConfig.official_model_type:  # the stock class, by value
        return _without_model_type(vision_config, Blip2VisionConfig)
    tower = getattr(vision_config, "vision_config", None)
    if isinstance(tower, PreTrainedConfig):  # a dual encoder (CLIP, SigLIP ...): its vision tower
        vision_config = tower
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    model_class = MODEL_MAPPING.get(type(vision_config), None)
    if model_class is None or getattr(model_class, "main_input_name", None) != "pixel_values":
        found = "no transformers model class" if model_class is None else f"{model_class.__name__}, which does not"
        raise ValueError(
            f"vision_config of model_type {vision_config.model_type!r} has {found} read images (pixel_values): "
            "expected the config of a vision model (clip_vision_model, siglip_vision_model, dinov2, vit, convnext "
            "...) or of BLIP-2's own encoder"
        )
    return vision_config


def vision_feature_width(vision_config: Any, feature_layer: int) -> int:
    """Channels of the image features at `feature_layer` (for convolutional encoders, of that stage's map)."""
    hidden_sizes = getattr(vision_config, "hidden_sizes", None)
    num_states = (len(hidden_sizes) if hidden_sizes else _num_layers(vision_config)) + 1  # embeddings + layers
    if num_states > 1 and not -num_states <= feature_layer < num_states:
        raise ValueError(
            f"vision_feature_layer ({feature_layer}) is outside the encoder's {num_states} hidden states "
            f"(-{num_states}..{num_states - 1}: 0 is the embedding output, -1 the last layer)"
        )
    if not hidden_sizes:
        return vision_config.hidden_size
    index = feature_layer % num_states
    return hidden_sizes[max(index - 1, 0)]  # the stem's output has the first stage's width


def _num_layers(vision_config: Any) -> int:
    layers = getattr(vision_config, "num_hidden_layers", None)
    return int(layers) if isinstance(layers, int) else 0


def _without_model_type(sub_config: Any, config_class: type[PreTrainedConfig]) -> Any:
    """Drops the stock or our own `model_type` from a sub-config dict; refuses another model type."""
    if isinstance(sub_config, dict) and sub_config.get("model_type") in (
        config_class.model_type,
        config_class.official_model_type,
    ):
        sub_config = {key: value for key, value in sub_config.items() if key != "model_type"}
    elif isinstance(sub_config, dict) and "model_type" in sub_config:
        raise ValueError(
            f"expected a {config_class.__name__} dict (model_type {config_class.model_type!r} or "
            f"{config_class.official_model_type!r}), got model_type {sub_config['model_type']!r}"
        )
    elif isinstance(sub_config, PreTrainedConfig) and not isinstance(sub_config, config_class):
        # Accept a stock or foreign config object by value, so long as it has the fields we know.
        sub_config = _without_model_type(sub_config.to_dict(), config_class)
        known = set(config_class.__dataclass_fields__)
        sub_config = {key: value for key, value in sub_config.items() if key in known}
    return sub_config


def _square_side(name: str, value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} must be an int or a square [side, side] pair, got {value!r}")
        value = value[0]
    return int(value)


def _check_divisible(name: str, value: int, divisor_name: str, divisor: int) -> None:
    if divisor < 1 or value % divisor:
        raise ValueError(f"{name} ({value}) must be a multiple of {divisor_name} ({divisor})")
