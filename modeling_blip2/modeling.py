"""PreTrainedModel classes of BLIP-2: vision model, Q-Former model, and the models bridging them to a frozen LLM.

State-dict keys follow the transformers layout of the official Salesforce checkpoints, so those load unchanged.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import EvalResult, HfApi
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.generation.utils import GenerateOutput
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    BaseModelOutputWithPoolingAndCrossAttentions,
)
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .attention import boolean_to_additive_mask, padding_to_additive_mask
from .backbones import Blip2VisionBackbone, num_patch_tokens, select_image_features
from .checkpoint_io import atomic_save, check_local_checkpoint, pop_hub_kwargs, push_files, relative_files
from .configuration import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, check_image_token_index
from .model_card import DEFAULT_LICENSE, build_model_card, require_hub_token
from .qformer import (
    ATTENTION_TYPES,
    Blip2QFormerEncoder,
    Blip2QFormerKeyValues,
    Blip2QFormerLayer,
    Blip2QFormerMultiHeadAttention,
    Blip2TextEmbeddings,
    build_qformer_attention_mask,
)
from .vision import (
    Blip2VisionAttention,
    Blip2VisionEmbeddings,
    Blip2VisionEncoder,
    Blip2VisionEncoderLayer,
    check_frozen_image_features,
    check_pixel_values,
)

IGNORE_INDEX = -100
# Modules trained in fp32 while the frozen encoder and LLM run in fp16/bf16 (the paper's precision recipe).
FP32_MODULES = ["query_tokens", "qformer", "language_projection", "vision_model.post_layernorm"]
# The Q-Former text embeddings (top-level `embeddings.*`). Loading searches these names as regular expressions anywhere
# in a key, and transformers' checks wrap them as `(?:^|\.)NAME(?:\.|$)`: the lookbehind keeps both to the top
# level, so `vision_model.embeddings` (and any LLM's embeddings) keep the dtype they were loaded in.
QFORMER_TEXT_EMBEDDINGS_PATTERN = r"(?<![\w.])embeddings"
# transformers consults `config.custom_pipelines` before redirecting "image-to-text" / refusing
# "visual-question-answering": saved checkpoints name our pipeline classes there and carry their code (pipelines.py
# and what it imports), so `pipeline(task, model=checkpoint, trust_remote_code=True)` runs them.
CUSTOM_PIPELINES = {
    task: {"impl": f"pipelines.{class_name}", "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}
    for task, class_name in (
        ("image-to-text", "Blip2ImageToTextPipeline"),
        ("visual-question-answering", "Blip2VisualQuestionAnsweringPipeline"),
    )
}
# bitsandbytes 0.50, measured on CPU: eval-mode 4-bit inference on CPUs with AVX512-BF16 repacks each weight in blocks
# of 64 input features and tiles of 32 output features, and fails (at the first forward) on any other width; other
# CPUs and training-mode forwards run any width (`check_4bit_layer_widths`).
FOUR_BIT_CPU_IN_MULTIPLE = 64
FOUR_BIT_CPU_OUT_MULTIPLE = 32
PIPELINE_CODE_FILES = (  # pipelines.py + what it imports
    "pipelines.py",
    "processing.py",
    "model_card.py",
    "configuration.py",
    "checkpoint_io.py",
)


@dataclass
class Blip2ImageEncodingOutput(ModelOutput):
    """Images encoded for the LLM.

    Args:
        image_embeds: `(batch, 1 + num_patches, vision_hidden)` post-LayerNorm image features.
        query_output: `(batch, num_query_tokens, qformer_hidden)` Q-Former outputs of the queries.
        language_model_inputs: `(batch, num_query_tokens, llm_hidden)` soft visual prompts (projected queries).
        vision_outputs: The full vision model output (None when the encoding started from `image_embeds`).
        qformer_outputs: The full Q-Former output; its `last_hidden_state` is `(batch, num_query_tokens + T,
            qformer_hidden)` when a `(batch, T)` question was fed to the Q-Former.
        image_key_values: The Q-Former's cross-attention keys and values of `image_embeds`, when the encoding
            was made from them (`encode_images(image_key_values=...)`): several questions about one image then
            share its projections.
    """

    image_embeds: torch.FloatTensor | None = None
    query_output: torch.FloatTensor | None = None
    language_model_inputs: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    image_key_values: Blip2QFormerKeyValues | None = None

    def select(self, index: torch.Tensor | list[int]) -> Blip2ImageEncodingOutput:
        """The rows `index` (e.g. the image of each question: one image encoding serving several prompts).

        `image_embeds`, `query_output`, `language_model_inputs` and `image_key_values` are indexed along the batch;
        the full `vision_outputs` / `qformer_outputs` are not carried over.
        """
        if self.language_model_inputs is None and self.image_embeds is None:
            raise ValueError("this image encoding holds neither image_embeds nor language_model_inputs")
        reference = self.language_model_inputs if self.language_model_inputs is not None else self.image_embeds
        index = torch.as_tensor(index, dtype=torch.long, device=reference.device)
        if index.dim() != 1:
            raise ValueError(f"index must be 1-d, got shape {tuple(index.shape)}")
        batch = reference.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
            raise ValueError(f"index must hold row numbers in [0, {batch}), got {index.tolist()}")

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.index_select(0, index.to(tensor.device))

        return Blip2ImageEncodingOutput(
            image_embeds=rows(self.image_embeds),
            query_output=rows(self.query_output),
            language_model_inputs=rows(self.language_model_inputs),
            image_key_values=None if self.image_key_values is None else self.image_key_values.select(index),
        )


@dataclass
class Blip2QFormerOutput(BaseModelOutputWithPoolingAndCrossAttentions):
    """Output of `Blip2QFormerModel`: transformers' BERT-style output, plus

    Args:
        key_values: With `return_key_values=True`, this pass's self-attention keys and values (an earlier pass's
            prefix included), a `Blip2QFormerKeyValues` to pass as a later pass's `prefix_key_values`.
    """

    key_values: Blip2QFormerKeyValues | None = None


@dataclass
class Blip2ConditionalGenerationOutput(ModelOutput):
    """Output of `Blip2Model` / `Blip2ForConditionalGeneration`.

    Args:
        loss: Scalar LM loss (decoder-only) or seq2seq loss (encoder-decoder) when `labels` are given.
        logits: `(batch, sequence_length, vocab)`; for decoder-only LLMs the sequence includes the query positions.
        vision_outputs: Vision model output (`last_hidden_state` `(batch, 1 + num_patches, vision_hidden)`).
        qformer_outputs: Q-Former output (`last_hidden_state` `(batch, num_query_tokens, qformer_hidden)`, or
            `(batch, num_query_tokens + T, qformer_hidden)` with a `(batch, T)` question in `qformer_input_ids`).
        language_model_outputs: The LLM's own output.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None
    language_model_outputs: ModelOutput | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            value.to_tuple() if isinstance(value, ModelOutput) else value
            for value in (
                self.loss,
                self.logits,
                self.vision_outputs,
                self.qformer_outputs,
                self.language_model_outputs,
            )
            if value is not None
        )


@dataclass
class Blip2ImageFeaturesOutput(BaseModelOutputWithPooling):
    """`get_image_features` output, in transformers 5's layout for models that bridge an image encoder to a text side.

    Args:
        last_hidden_state: `(batch, 1 + num_patches, vision_hidden)` vision encoder output (post-LayerNorm).
        pooler_output: The image features of the model: `(batch, num_query_tokens, llm_hidden)` soft visual prompts
            (`Blip2ForConditionalGeneration`), or `(batch, num_query_tokens, embed_dim)` normalised contrastive
            embeddings (the stage-1 models).
        hidden_states: The vision encoder's hidden states, when asked for (`output_hidden_states`).
        attentions: The vision encoder's attention weights, when asked for (`output_attentions`).
        vision_outputs: The full vision model output.
        qformer_outputs: The full Q-Former output (`last_hidden_state` `(batch, num_query_tokens [+ T],
            qformer_hidden)`).
    """

    vision_outputs: BaseModelOutputWithPooling | None = None
    qformer_outputs: BaseModelOutputWithPoolingAndCrossAttentions | None = None


@dataclass
class _LanguageModelInputs:
    """A prompt with exactly `num_query_tokens` image positions per row, and what goes with it."""

    input_ids: torch.Tensor | None  # (B, L + Q) when queries were inserted, else (B, L); None for embeddings only
    attention_mask: torch.Tensor
    labels: torch.Tensor | None
    image_positions: torch.Tensor  # (B, L'), bool
    inserted: bool
    inputs_embeds: torch.Tensor | None = None  # (B, L', llm_hidden) when the caller gave embeddings


class Blip2PreTrainedModel(PreTrainedModel):
    """Weight initialisation, capabilities, and the freezing / precision policy shared by every BLIP-2 model."""

    config_class = Blip2Config
    base_model_prefix = "blip2"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _no_split_modules = [
        "Blip2VisionEmbeddings",
        "Blip2VisionEncoderLayer",
        "Blip2QFormerLayer",
        "Blip2TextEmbeddings",
    ]

    # Modules that 8-/4-bit loading leaves unquantized unless `llm_int8_skip_modules` says otherwise.
    _quantization_skip_modules: tuple[str, ...] = ()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Blip2VisionEmbeddings):
            std = module.config.initializer_range
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
        elif isinstance(getattr(module, "query_tokens", None), nn.Parameter):
            # LAVIS draws the queries from N(0, 0.02); all-zero queries (the stock init) start out identical.
            init.normal_(module.query_tokens, mean=0.0, std=0.02)

    # -- loading ----------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args: Any,
        allow_pickle: bool = False,
        **kwargs: Any,
    ) -> Blip2PreTrainedModel:
        """`PreTrainedModel.from_pretrained`, reading safetensors weights only unless `allow_pickle=True`.

        Pickle checkpoints (`pytorch_model.bin`) can run code when loaded, so they are refused unless the caller
        opts in. Corrupt or truncated safetensors files, and configs of another model type, raise a `ValueError`
        that says so. A file given instead of a folder (e.g. `.../model.safetensors`) raises `NotADirectoryError`, and
        a local folder without `config.json` (unless `config=` is given) `FileNotFoundError`, before anything is built.
        """
        needs_config = kwargs.get("config") is None and kwargs.get("gguf_file") is None
        check_local_checkpoint(
            pretrained_model_name_or_path,
            f"{cls.__name__}.from_pretrained",
            ("config.json",) if needs_config else (),
            subfolder=kwargs.get("subfolder") or "",
        )
        if not allow_pickle:
            if kwargs.get("use_safetensors") is False:
                raise ValueError(
                    "use_safetensors=False reads pickle weights: pass allow_pickle=True as well to opt in"
                )
            kwargs["use_safetensors"] = True
        quantization_config = kwargs.get("quantization_config")
        if cls._quantization_skip_modules and getattr(quantization_config, "quant_method", None) == "bitsandbytes":
            # transformers' bitsandbytes quantizers would convert every nn.Linear but the LLM head: keep the image
            # encoder, query tokens, Q-Former and projection out of it (the LLM is what 8-/4-bit loading is for).
            # A caller's own skip list is kept, and these modules are always added to it.
            given = quantization_config.llm_int8_skip_modules
            skip = [*(given or []), *cls._quantization_skip_modules]
            quantization_config = copy.deepcopy(quantization_config)
            quantization_config.llm_int8_skip_modules = list(dict.fromkeys(skip))
            kwargs["quantization_config"] = quantization_config
            if getattr(quantization_config, "load_in_4bit", False) and _runs_on_cpu(kwargs.get("device_map")):
                cls._check_4bit_widths(pretrained_model_name_or_path, quantization_config, kwargs)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except SafetensorError as error:
            raise ValueError(
                f"the safetensors weights of {pretrained_model_name_or_path} are corrupt or truncated ({error}); "
                "download or save them again"
            ) from error
        except OSError as error:
            if allow_pickle or "safetensors" not in str(error):
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path} has no safetensors weights. If it only has pickle weights "
                "(pytorch_model.bin), loading them can run arbitrary code: pass allow_pickle=True only for a "
                "source you trust, or convert the checkpoint to safetensors"
            ) from error

    @classmethod
    def _check_4bit_widths(
        cls, pretrained_model_name_or_path: str | os.PathLike | None, quantization_config: Any, kwargs: dict
    ) -> None:
        """Refuses, before any weight is read, a 4-bit load whose quantized layers bitsandbytes cannot run on CPU
        (`check_4bit_layer_widths` on the model built on the meta device)."""
        config = kwargs.get("config")
        if not isinstance(config, cls.config_class):
            hub_kwargs = {
                key: kwargs[key]
                for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
                if key in kwargs
            }
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        with torch.device("meta"):
            skeleton = cls(config)
        check_4bit_layer_widths(skeleton, quantization_config)

    # -- Hub ------------------------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        token: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        max_shard_size: int | str = "5GB",
        create_pr: bool = False,
        revision: str | None = None,
        license: str | None = DEFAULT_LICENSE,
        base_model: str | list[str] | None = None,
        datasets: str | list[str] | None = None,
        eval_results: list[EvalResult] | None = None,
        training_hyperparameters: dict[str, Any] | None = None,
        tags: list[str] | None = None,
        description: str | None = None,
    ) -> Any:
        """Uploads the model (safetensors, sharded above `max_shard_size`) with a generated model card.

        The card (README.md) carries the Hub metadata (license, library, pipeline tag, tags, base models, datasets,
        evaluation results) and a usage snippet; see `model_card.build_model_card` for the arguments. Push the
        processor with `processor.push_to_hub(repo_id)` to the same repo. The push is one commit, which also deletes
        the weight files of an earlier push that this one no longer has (e.g. `model.safetensors` when the weights
        are now sharded), so the repo never serves old weights beside the new ones.
        """
        token = require_hub_token(token)
        repo_id = HfApi().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        card = build_model_card(
            self.config,
            type(self).__name__,
            repo_id,
            license=license,
            base_model=base_model,
            datasets=datasets,
            eval_results=eval_results,
            training_hyperparameters=training_hyperparameters,
            tags=tags,
            description=description,
        )
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            card.save(os.path.join(folder, "README.md"))
            return push_files(
                folder,
                repo_id,
                token=token,
                commit_message=commit_message or "Upload BLIP-2 model",
                create_pr=create_pr,
                revision=revision,
            )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """`PreTrainedModel.save_pretrained`, written atomically (see `checkpoint_io.atomic_save`).

        Everything is written into a staging folder beside `save_directory` and moved in only once complete: a
        failure (an exception, a full disk) leaves an existing checkpoint there as it was. Files of the folder that
        this save does not write (a processor's, a trainer's) are kept; weight files it supersedes (the old
        `model.safetensors` when the weights are now sharded, old shards, `pytorch_model*.bin`) are removed.
        With `push_to_hub=True` the files written are then pushed with a generated model card in one commit that
        deletes the repo's superseded weight files (`repo_id` defaults to the folder's name, as in transformers).
        Ranks other than the main one, and distributed (DCP) checkpoints, which every rank writes together, are
        written by transformers directly.
        """
        if not is_main_process or kwargs.get("distributed_checkpoint"):
            return super().save_pretrained(
                save_directory, is_main_process, state_dict=state_dict, push_to_hub=push_to_hub, **kwargs
            )
        hub_kwargs = pop_hub_kwargs(kwargs)
        if push_to_hub:
            # Before anything is written: a push that cannot happen should not leave a half-done job behind.
            hub_kwargs["token"] = require_hub_token(hub_kwargs.get("token"))
        with atomic_save(save_directory) as staging:
            self._write_files_saved_with_the_model(staging)
            super().save_pretrained(staging, state_dict=state_dict, **kwargs)
            written = relative_files(staging)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or Path(os.path.abspath(save_directory)).name
            card = build_model_card(self.config, type(self).__name__, repo_id)
            push_files(
                save_directory,
                repo_id,
                written,
                extra_files={"README.md": str(card).encode()},
                commit_message=hub_kwargs.pop("commit_message", None) or "Upload BLIP-2 model",
                **hub_kwargs,
            )

    def _write_files_saved_with_the_model(self, folder: Path) -> None:
        """Hook of `save_pretrained`: extra files a model class writes into its checkpoint folder."""

    # -- the Q-Former over queries and text (models that own query_tokens, embeddings and qformer) ---------------
    def query_outputs(
        self, image_embeds: torch.Tensor | Blip2QFormerKeyValues, **qformer_kwargs: Any
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """The queries after the Q-Former, cross-attending to the image: `(B, num_query_tokens, hidden)`.

        `image_embeds` are `(B, S, vision_hidden)` image features, or their cross-attention keys and values
        (`qformer.image_key_values(features)`), shared with other passes over the same images."""
        image = _image_inputs(image_embeds)
        queries = self.query_tokens.expand(_image_batch_size(image_embeds), -1, -1)
        return self.qformer(queries, return_dict=True, **image, **qformer_kwargs)

    def _queries_with_text(
        self,
        image_embeds: torch.Tensor | Blip2QFormerKeyValues,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attention_type: str,
        **qformer_kwargs: Any,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """`[queries; text]` through the Q-Former, the queries cross-attending to the image (features or their
        key/values, as in `query_outputs`): bidirectional for matching and question conditioning,
        multimodal-causal for image-grounded generation.

        Returns the Q-Former output `(B, num_query_tokens + T, hidden)`.
        """
        batch, num_queries = input_ids.shape[0], self.config.num_query_tokens
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        queries = self.query_tokens.expand(batch, -1, -1)
        return self.qformer(
            self.embeddings(input_ids, query_embeds=queries),
            query_length=num_queries,
            attention_mask=torch.cat([attention_mask.new_ones(batch, num_queries), attention_mask], dim=1),
            attention_type=attention_type,
            return_dict=True,
            **_image_inputs(image_embeds),
            **qformer_kwargs,
        )

    # -- frozen modules ------------------------------------------------------------------------------------------
    @property
    def frozen_module_names(self) -> tuple[str, ...]:
        """Submodules frozen by `freeze_vision_encoder` / `freeze_language_model`; they stay in eval mode."""
        return tuple(getattr(self, "_frozen_module_names", ()))

    def freeze_modules(self, *names: str) -> None:
        """Stops gradients to the named submodules and keeps them in eval mode (dropout off) from now on."""
        frozen = dict.fromkeys(self.frozen_module_names)
        for name in names:
            module = self.get_submodule(name)
            module.requires_grad_(False)
            module.eval()
            frozen[name] = None
        self._frozen_module_names = tuple(frozen)

    def unfreeze_modules(self, *names: str) -> None:
        """Makes the named submodules trainable again and lets them follow `train()` / `eval()`."""
        for name in names:
            self.get_submodule(name).requires_grad_(True)
        self._frozen_module_names = tuple(name for name in self.frozen_module_names if name not in names)
        self.train(self.training)

    def train(self, mode: bool = True) -> Blip2PreTrainedModel:
        super().train(mode)
        for name in self.frozen_module_names:
            self.get_submodule(name).eval()
        return self

    def freeze_vision_encoder(self, train_post_layernorm: bool = True) -> None:
        """Freezes the image encoder. Its post-encoder LayerNorm stays trainable by default, as in the paper."""
        vision = self._vision_model()
        prefix = "" if vision is self else "vision_model."
        names = [prefix + name for name, _ in vision.named_children() if name != "post_layernorm"]
        if not train_post_layernorm:
            names.append(prefix + "post_layernorm")
        self.freeze_modules(*names)

    def _vision_model(self) -> Blip2VisionModel:
        vision = self if isinstance(self, Blip2VisionModel) else getattr(self, "vision_model", None)
        if vision is None:
            raise AttributeError(f"{type(self).__name__} has no vision encoder")
        return vision


class Blip2VisionModel(Blip2PreTrainedModel):
    """The image encoder: patch embeddings, transformer blocks and the post-encoder LayerNorm (LAVIS `ln_vision`)."""

    config_class = Blip2VisionConfig
    # transformers' output capturing (`capture_outputs`): hooks collect these when `output_*` asks for them, also a
    # selection of hidden states (`output_hidden_states=[0, -1]`).
    _can_record_outputs = {
        "hidden_states": Blip2VisionEncoderLayer,
        "attentions": OutputRecorder(Blip2VisionAttention, index=1),
    }

    def __init__(self, config: Blip2VisionConfig) -> None:
        super().__init__(config)
        # Which hidden state the features are, and which of its tokens (`Blip2Config.vision_feature_layer` /
        # `vision_feature_select_strategy`; set by `build_vision_model`): the last layer's, all tokens, by default.
        self.feature_layer, self.select_strategy = -1, "full"
        self.embeddings = Blip2VisionEmbeddings(config)
        if config.vision_architecture == "clip":
            self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.resolved_post_layernorm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @capture_outputs(tie_last_hidden_states=False)  # the last hidden state is the one before the post-LayerNorm
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """Encodes `(batch, channels, height, width)` images into `(batch, 1 + num_patches, hidden)` features.

        `pooler_output` is the (post-LayerNorm) class token. Images of another size than `config.image_size` need
        `interpolate_pos_encoding=True`.
        """
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        features, all_hidden_states, all_attentions = self._encode(
            pixel_values, interpolate_pos_encoding, output_hidden_states, output_attentions
        )
        last_hidden_state = self.apply_post_layernorm(features)
        # `capture_outputs` makes the tuple when return_dict (or config.return_dict) is False.
        return BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )

    def resize_position_embeddings(self, image_size: int) -> None:
        """Changes the input size for good (e.g. 224 -> 364 for fine-tuning): the learned position embeddings are
        bicubically interpolated to the new patch grid and `config.image_size` is updated."""
        patch = self.config.patch_size
        if image_size % patch:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch})")
        side = image_size // patch
        with torch.no_grad():
            resized = self.embeddings.position_embeddings_for_grid(side, side).detach().clone()
        self.embeddings.position_embedding = nn.Parameter(
            resized, requires_grad=self.embeddings.position_embedding.requires_grad
        )
        self.config.image_size = image_size

    def forward_features(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """Encoder output *before* the post-encoder LayerNorm, `(batch, 1 + num_patches, hidden)`.

        This is all a frozen encoder contributes, so it is what a feature cache stores; the post-LayerNorm stays
        trainable and is applied by `apply_post_layernorm`. `forward` == `apply_post_layernorm(forward_features)`.
        """
        return self._encode(pixel_values, interpolate_pos_encoding, False, False)[0]

    def apply_post_layernorm(self, features: torch.Tensor) -> torch.Tensor:
        """The post-encoder LayerNorm (LAVIS `ln_vision`), in its own (fp32) dtype."""
        return self.post_layernorm(features.to(self.post_layernorm.weight.dtype))

    def _encode(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool,
        output_hidden_states: bool,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None, tuple[torch.Tensor, ...] | None]:
        self._check_pixel_values(pixel_values)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if self.config.vision_architecture == "clip":
            hidden_states = self.pre_layernorm(hidden_states)
        selects_a_layer = self.feature_layer != -1
        hidden_states, all_hidden_states, all_attentions = self.encoder(
            hidden_states,
            output_hidden_states=output_hidden_states or selects_a_layer,
            output_attentions=output_attentions,
        )
        if selects_a_layer:
            hidden_states = all_hidden_states[self.feature_layer]
        num_patches = num_patch_tokens(pixel_values, self.config.patch_size)
        features = select_image_features(hidden_states, self.select_strategy, num_patches)
        return features, all_hidden_states if output_hidden_states else None, all_attentions

    def _check_pixel_values(self, pixel_values: torch.Tensor | None) -> None:
        check_pixel_values(pixel_values, self.config.num_channels)


class Blip2QFormerModel(Blip2PreTrainedModel):
    """The Querying Transformer.

    It reads embeddings prepared by its owner (query tokens, optionally followed by Q-Former text embeddings) and
    lets the first `query_length` positions cross-attend to the image features.
    """

    config_class = Blip2QFormerConfig
    main_input_name = "query_embeds"
    _can_record_outputs = {
        "hidden_states": Blip2QFormerLayer,
        "attentions": OutputRecorder(Blip2QFormerMultiHeadAttention, index=1, layer_name="attention.attention"),
        "cross_attentions": OutputRecorder(
            Blip2QFormerMultiHeadAttention, index=1, layer_name="crossattention.attention"
        ),
    }

    def __init__(self, config: Blip2QFormerConfig) -> None:
        super().__init__(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.encoder = Blip2QFormerEncoder(config)
        self.post_init()

    def get_input_embeddings(self) -> None:
        # The Q-Former owns no token embeddings: the query tokens and text embeddings belong to the composite model.
        return None

    @capture_outputs
    def forward(
        self,
        query_embeds: torch.Tensor,
        query_length: int | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_type: str = "bidirectional",
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        encoder_key_values: Blip2QFormerKeyValues | None = None,
        prefix_key_values: Blip2QFormerKeyValues | None = None,
        return_key_values: bool = False,
        output_positions: int | None = None,
        **kwargs: Any,
    ) -> Blip2QFormerOutput | tuple:
        """Runs the Q-Former.

        Args:
            query_embeds: `(batch, T, hidden)`: the queries, optionally followed by text embeddings (or text alone).
            query_length: How many leading positions are queries (default: all of them).
            attention_mask: `(batch, T)` padding mask (`(batch, P + T)` with a prefix of `P` positions), shaped into
                the mask of `attention_type`, or a ready `(batch, T, [P +] T)` 1/0 mask.
            encoder_hidden_states: `(batch, S, encoder_hidden_size)` image features (needed when queries are present).
            encoder_attention_mask: `(batch, S)` mask over the image features (default: all ones).
            attention_type: `"bidirectional"`, `"unimodal"` or `"multimodal_causal"` (see
                `build_qformer_attention_mask`).
            encoder_key_values: The image features' cross-attention keys and values (`image_key_values`), instead
                of `encoder_hidden_states`: passes over the same images then project them once.
            prefix_key_values: Self-attention keys and values of an earlier pass (`return_key_values=True`) that
                this text-only pass (`query_length=0`) attends to as if they preceded it, under `attention_type`'s
                mask over the whole sequence (e.g. image-grounded generation's text reading the queries of the
                contrastive pass).
            return_key_values: Put this pass's self-attention keys and values (the prefix's included) in the
                output's `key_values`, a `Blip2QFormerKeyValues`.
            output_positions: Only the first `n` positions' outputs are wanted (e.g. the queries of an image-text
                matching pair, or a text's `[CLS]`): the last layer computes no others (every position is still
                attended to), and `last_hidden_state` is `(batch, n, hidden)`. Default: all positions.
        """
        if query_embeds is None or query_embeds.dim() != 3:
            shape = None if query_embeds is None else tuple(query_embeds.shape)
            raise ValueError(f"query_embeds must be a (batch, length, hidden) tensor, got {shape}")
        batch, length, _ = query_embeds.shape
        query_length = length if query_length is None else query_length
        if query_length < length and not self.config.use_qformer_text_input:
            raise ValueError(
                f"query_embeds carries {length - query_length} text positions but this Q-Former has no text "
                "feed-forward (config.use_qformer_text_input=False)"
            )
        output_attentions = bool(output_attentions if output_attentions is not None else self.config.output_attentions)
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # The Q-Former keeps its own (fp32) dtype; inputs from fp16/bf16 parts are cast at the boundary.
        dtype = self.layernorm.weight.dtype
        hidden_states = self.dropout(self.layernorm(query_embeds.to(dtype)))
        if output_positions is not None and (
            isinstance(output_positions, bool) or not isinstance(output_positions, int) or output_positions < 1
        ):
            raise ValueError(
                f"output_positions must be a positive number of leading positions, got {output_positions!r}"
            )
        prefix = self._check_prefix(prefix_key_values, batch, query_length)
        prefix_length = 0 if prefix is None else prefix.length
        additive_mask = self._self_attention_mask(
            attention_mask,
            batch,
            length,
            query_length,
            attention_type,
            dtype,
            hidden_states.device,
            prefix_length,
            0 if prefix is None else prefix.query_length,
        )

        encoder_additive_mask = None
        encoder = None
        if query_length > 0 and self.config.num_hidden_layers > 0:
            encoder = self._image_key_values_for(encoder_hidden_states, encoder_key_values, batch)
            if encoder_attention_mask is not None:
                encoder_additive_mask = padding_to_additive_mask(encoder_attention_mask, dtype)
            encoder_hidden_states = None  # projected above, once for all layers

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        all_cross_attentions = () if output_attentions else None
        key_values = []
        last = len(self.encoder.layer) - 1
        for index, layer in enumerate(self.encoder.layer):
            encoder_key_value = (
                (None, None) if encoder is None or encoder.layers[index] is None else encoder.layers[index]
            )
            prefix_key_value = (None, None) if prefix is None else prefix.layers[index]
            hidden_states, self_weights, cross_weights, key, value = layer(
                hidden_states,
                additive_mask,
                encoder_hidden_states,
                encoder_additive_mask,
                query_length,
                output_attentions,
                *encoder_key_value,
                *prefix_key_value,
                output_positions if index == last else None,
            )
            if return_key_values:
                key_values.append((key, value))
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (self_weights,)
                all_cross_attentions += (cross_weights,)
        returned_key_values = None
        if return_key_values:
            total_queries = query_length if prefix is None else prefix.query_length
            returned_key_values = Blip2QFormerKeyValues(tuple(key_values), total_queries)
        # `capture_outputs` makes the tuple when return_dict (or config.return_dict) is False.
        return Blip2QFormerOutput(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states[:, 0],
            key_values=returned_key_values,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            cross_attentions=all_cross_attentions,
        )

    def image_key_values(self, encoder_hidden_states: torch.Tensor) -> Blip2QFormerKeyValues:
        """Every cross-attention layer's keys and values of `(batch, S, encoder_hidden_size)` image features.

        Pass them as `encoder_key_values` to every pass over the same images (with `select` /
        `repeat_interleave` to match the pass's rows): the image features are then projected once. Gradients reach
        the projections (and the features) through every pass that uses them.
        """
        self._check_image_features(encoder_hidden_states, None)
        states = encoder_hidden_states.to(self.layernorm.weight.dtype)
        layers = tuple(
            layer.crossattention.attention.key_value(states) if layer.has_cross_attention else None
            for layer in self.encoder.layer
        )
        return Blip2QFormerKeyValues(layers)

    def _image_key_values_for(
        self,
        encoder_hidden_states: torch.Tensor | None,
        encoder_key_values: Blip2QFormerKeyValues | None,
        batch: int,
    ) -> Blip2QFormerKeyValues:
        if encoder_hidden_states is not None and encoder_key_values is not None:
            raise ValueError("pass either encoder_hidden_states or their encoder_key_values, not both")
        if encoder_key_values is None:
            if encoder_hidden_states is None:
                raise ValueError(
                    "encoder_hidden_states (the image features) or their encoder_key_values are required when "
                    "queries are present"
                )
            self._check_image_features(encoder_hidden_states, batch)
            return self.image_key_values(encoder_hidden_states)
        if not isinstance(encoder_key_values, Blip2QFormerKeyValues):
            raise TypeError(
                "encoder_key_values must be the Blip2QFormerKeyValues of image_key_values(image_features), got "
                f"{type(encoder_key_values).__name__}"
            )
        expected = [layer.has_cross_attention for layer in self.encoder.layer]
        if [entry is not None for entry in encoder_key_values.layers] != expected:
            raise ValueError(
                "encoder_key_values do not fit this Q-Former's cross-attention layers: make them with its "
                "image_key_values"
            )
        if encoder_key_values.batch_size != batch:
            raise ValueError(
                f"encoder_key_values have batch size {encoder_key_values.batch_size}, the queries {batch}: select "
                "or repeat their rows to match"
            )
        return encoder_key_values

    def _check_image_features(self, encoder_hidden_states: torch.Tensor, batch: int | None) -> None:
        if encoder_hidden_states.dim() != 3:
            raise ValueError(
                "encoder_hidden_states must be (batch, tokens, width) image features, got shape "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        if batch is not None and encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"encoder_hidden_states has batch size {encoder_hidden_states.shape[0]}, the queries {batch}"
            )
        if encoder_hidden_states.shape[-1] != self.config.resolved_encoder_hidden_size:
            raise ValueError(
                f"encoder_hidden_states must have width {self.config.resolved_encoder_hidden_size} "
                f"(config.encoder_hidden_size), got {encoder_hidden_states.shape[-1]}"
            )

    def _check_prefix(
        self, prefix_key_values: Blip2QFormerKeyValues | None, batch: int, query_length: int
    ) -> Blip2QFormerKeyValues | None:
        if prefix_key_values is None:
            return None
        if not isinstance(prefix_key_values, Blip2QFormerKeyValues):
            raise TypeError(
                "prefix_key_values must be the Blip2QFormerKeyValues of an earlier pass (return_key_values=True), "
                f"got {type(prefix_key_values).__name__}"
            )
        if query_length != 0:
            raise ValueError(
                f"a pass after prefix_key_values reads text only (query_length=0), got query_length={query_length}"
            )
        if len(prefix_key_values.layers) != len(self.encoder.layer) or any(
            entry is None for entry in prefix_key_values.layers
        ):
            raise ValueError(
                f"prefix_key_values must hold keys and values for all {len(self.encoder.layer)} layers of this "
                "Q-Former (from a pass with return_key_values=True)"
            )
        if prefix_key_values.batch_size != batch:
            raise ValueError(
                f"prefix_key_values have batch size {prefix_key_values.batch_size}, this pass {batch}: select or "
                "repeat their rows to match"
            )
        return prefix_key_values

    @staticmethod
    def _self_attention_mask(
        attention_mask: torch.Tensor | None,
        batch: int,
        length: int,
        query_length: int,
        attention_type: str,
        dtype: torch.dtype,
        device: torch.device,
        prefix_length: int = 0,
        prefix_query_length: int = 0,
    ) -> torch.Tensor | None:
        """The additive `(batch, 1, length, prefix_length + length)` self-attention mask (None: attend to all).

        With a prefix, the mask of `attention_type` is built over the whole sequence (the prefix's first
        `prefix_query_length` positions being queries) and its rows of this pass are kept.
        """
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got {attention_type!r}")
        total = prefix_length + length
        if attention_mask is None:
            if attention_type == "bidirectional":
                return None
            attention_mask = torch.ones(batch, total, dtype=torch.long, device=device)
        if attention_mask.dim() == 2:
            if prefix_length and tuple(attention_mask.shape) == (batch, length):
                attention_mask = torch.cat([attention_mask.new_ones(batch, prefix_length), attention_mask], dim=1)
            if tuple(attention_mask.shape) != (batch, total):
                expected = "query + text length" if not prefix_length else f"prefix {prefix_length} + {length}"
                raise ValueError(
                    f"attention_mask must have shape {(batch, total)} (batch, {expected}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            queries = prefix_query_length if prefix_length else query_length
            full = build_qformer_attention_mask(attention_mask, queries, attention_type, dtype)
            return full[:, :, prefix_length:]
        if attention_mask.dim() == 3 and tuple(attention_mask.shape) == (batch, length, total):
            return boolean_to_additive_mask(attention_mask[:, None], dtype)
        raise ValueError(
            f"attention_mask must be (batch, {total}) or (batch, {length}, {total}) with batch={batch}; got "
            f"{tuple(attention_mask.shape)}"
        )


class _Blip2WithLanguageModel(Blip2PreTrainedModel):
    """Vision encoder + query tokens + Q-Former + projection + LLM, and how their inputs are put together.

    With `config.qformer_config.use_qformer_text_input` the model also owns the Q-Former text embeddings
    (`embeddings.*`, the key layout of the retrieval checkpoints) and can condition the queries on a question
    (`qformer_input_ids`), as in the paper's VQA fine-tuning. Without it the state dict is that of the official
    checkpoints, unchanged.
    """

    # fp32 under fp16 *and* bf16 loading. transformers requires the strict and non-strict lists to be disjoint;
    # 8-/4-bit loading keeps these modules unquantized through `_quantization_skip_modules` (see `from_pretrained`).
    _keep_in_fp32_modules_strict = FP32_MODULES
    _quantization_skip_modules = ("vision_model", "query_tokens", "qformer", "language_projection", "lm_head")

    def __init__(self, config: Blip2Config) -> None:
        super().__init__(config)
        self.vision_model = build_vision_model(config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        if config.qformer_config.use_qformer_text_input:
            self.embeddings = Blip2TextEmbeddings(config.qformer_config)
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.language_projection = nn.Linear(config.qformer_config.hidden_size, config.text_config.hidden_size)
        if config.use_decoder_only_language_model:
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        else:
            self.language_model = AutoModelForSeq2SeqLM.from_config(config.text_config)
        self.post_init()
        if self.has_qformer_text_input:
            self._keep_in_fp32_modules_strict.add(QFORMER_TEXT_EMBEDDINGS_PATTERN)
        # Blip2Config checks this too; a config edited after construction is caught here.
        check_image_token_index(config.image_token_index, _vocabulary_size(self.get_input_embeddings()))

    @classmethod
    def from_unimodal_pretrained(
        cls,
        vision_model_name_or_path: str | os.PathLike,
        language_model_name_or_path: str | os.PathLike,
        qformer_name_or_path: str | os.PathLike | None = None,
        num_query_tokens: int = 32,
        **config_overrides: Any,
    ) -> _Blip2WithLanguageModel:
        """BLIP-2 composed from unimodal checkpoints: any transformers vision model (or a dual encoder's vision
        tower), any causal or encoder-decoder LLM, and a BERT for the Q-Former (random without one). The vision
        encoder and the LLM are frozen; the Q-Former, queries, projection and post-encoder LayerNorm train. See
        `composition.compose_from_unimodal`; `Blip2ImageTextProcessor.from_unimodal_pretrained` builds its
        processor from the same folders."""
        from .composition import compose_from_unimodal

        return compose_from_unimodal(
            cls,
            vision_model_name_or_path,
            language_model_name_or_path,
            qformer_name_or_path,
            num_query_tokens,
            **config_overrides,
        )

    @property
    def has_qformer_text_input(self) -> bool:
        """Whether the Q-Former can read a question (`qformer_input_ids`) next to its queries."""
        return isinstance(getattr(self, "embeddings", None), Blip2TextEmbeddings)

    # -- embeddings plumbing for resize_token_embeddings, generate, PEFT -------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings: nn.Module) -> None:
        self.language_model.set_output_embeddings(new_embeddings)

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        if modality is None:
            return self.language_model.get_encoder()
        return super().get_encoder(modality=modality)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # -- freezing and precision -----------------------------------------------------------------------------------
    def freeze_language_model(self) -> None:
        """Freezes the LLM and keeps it in eval mode (stage 2 and fine-tuning recipes of the paper)."""
        self.freeze_modules("language_model")

    def apply_precision_policy(self, dtype: torch.dtype) -> _Blip2WithLanguageModel:
        """Puts the vision encoder and LLM in `dtype` (e.g. bf16) and keeps the trained parts in fp32.

        fp32 parts: query tokens, Q-Former, language projection and the post-encoder LayerNorm. Tensors are cast
        where they cross from one part to the other. `from_pretrained(..., dtype=torch.bfloat16)` applies the same
        policy.
        """
        self.vision_model.to(dtype)
        self.language_model.to(dtype)
        own_parameters = dict(self.named_parameters(recurse=False))
        for name in FP32_MODULES:
            if name in own_parameters:
                own_parameters[name].data = own_parameters[name].data.float()
            else:
                self.get_submodule(name).float()
        if self.has_qformer_text_input:
            self.embeddings.float()
        return self

    # -- images -> soft prompts -----------------------------------------------------------------------------------
    def encode_images(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        frozen_image_features: torch.Tensor | None = None,
        image_key_values: Blip2QFormerKeyValues | None = None,
    ) -> Blip2ImageEncodingOutput:
        """Images -> vision features -> Q-Former query outputs -> soft visual prompts in the LLM's width.

        Args:
            pixel_values: `(batch, 3, H, W)` images.
            qformer_input_ids: `(batch, T)` Q-Former token ids of a question (needs a Q-Former with text input).
                The Q-Former then reads `[queries; question]` with the bidirectional mask (queries and question see
                each other, only the queries cross-attend to the image) and only the query outputs are projected.
            qformer_attention_mask: `(batch, T)` padding mask of `qformer_input_ids` (default: all ones).
            image_embeds: `(batch, 1 + num_patches, vision_hidden)` post-LayerNorm image features of an earlier
                encoding (its `image_embeds`), instead of `pixel_values`: the vision encoder is skipped, e.g. to ask
                several questions about one image.
            frozen_image_features: `(batch, 1 + num_patches, vision_hidden)` outputs of the frozen encoder before the
                post-LayerNorm (`vision_model.forward_features`, e.g. from `FrozenFeatureDataset`); the trainable
                post-LayerNorm is applied here.
            image_key_values: With `image_embeds`, their `qformer.image_key_values`, which the Q-Former then reads
                instead of projecting the features again (several questions about one image, selected per row).
        """
        if frozen_image_features is not None:
            if pixel_values is not None or image_embeds is not None:
                raise ValueError("pass one of pixel_values, image_embeds and frozen_image_features")
            check_frozen_image_features(frozen_image_features, self.config.vision_feature_size)
            image_embeds = self.vision_model.apply_post_layernorm(frozen_image_features)
        if pixel_values is None and image_embeds is None:
            raise ValueError(
                "pixel_values are required: a (batch, channels, height, width) float tensor (or image_embeds, the "
                "vision features of an earlier encoding)"
            )
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass pixel_values or image_embeds (the vision features), not both")
        vision_outputs = None
        if pixel_values is not None:
            vision_outputs = self.vision_model(
                pixel_values,
                interpolate_pos_encoding=interpolate_pos_encoding,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            image_embeds = vision_outputs.last_hidden_state
        elif image_embeds.dim() != 3 or image_embeds.shape[-1] != self.config.vision_feature_size:
            raise ValueError(
                "image_embeds must be (batch, tokens, vision feature size "
                f"{self.config.vision_feature_size}), got {tuple(image_embeds.shape)}"
            )
        batch, num_queries = image_embeds.shape[0], self.config.num_query_tokens
        image = image_embeds
        if image_key_values is not None:
            if pixel_values is not None or frozen_image_features is not None:
                raise ValueError("image_key_values go with image_embeds (the features they were computed from)")
            if not isinstance(image_key_values, Blip2QFormerKeyValues) or image_key_values.batch_size != batch:
                raise ValueError(
                    f"image_key_values must be the qformer.image_key_values of the {batch} image_embeds rows"
                )
            image = image_key_values
        outputs_wanted = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        if qformer_input_ids is None:
            if qformer_attention_mask is not None:
                raise ValueError("qformer_attention_mask was given without qformer_input_ids")
            qformer_outputs = self.query_outputs(image, **outputs_wanted)
        else:
            qformer_attention_mask = self._check_qformer_text(qformer_input_ids, qformer_attention_mask, batch)
            qformer_outputs = self._queries_with_text(
                image, qformer_input_ids, qformer_attention_mask, "bidirectional", **outputs_wanted
            )
        query_output = qformer_outputs.last_hidden_state[:, :num_queries]  # only the queries reach the LLM
        language_model_inputs = self.language_projection(query_output.to(self.language_projection.weight.dtype))
        return Blip2ImageEncodingOutput(
            image_embeds=image_embeds,
            query_output=query_output,
            language_model_inputs=language_model_inputs,
            vision_outputs=vision_outputs,
            qformer_outputs=qformer_outputs,
        )

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Blip2ImageFeaturesOutput | tuple:
        """Images encoded for the LLM, in transformers 5's layout: `last_hidden_state` is the vision encoder output
        `(batch, 1 + num_patches, vision_hidden)` and `pooler_output` the soft visual prompts `(batch,
        num_query_tokens, llm_hidden)`; `vision_outputs` and `qformer_outputs` hold both parts' full outputs.

        Gradients flow (nothing is detached). `qformer_input_ids` / `qformer_attention_mask` condition the queries
        on a question (see `encode_images`, the reuse API that also takes cached features).
        """
        encoding = self.encode_images(
            pixel_values,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
        )
        vision = encoding.vision_outputs
        features = Blip2ImageFeaturesOutput(
            last_hidden_state=vision.last_hidden_state,
            pooler_output=encoding.language_model_inputs,
            hidden_states=vision.hidden_states,
            attentions=vision.attentions,
            vision_outputs=vision,
            qformer_outputs=encoding.qformer_outputs,
        )
        return features if _wants_dict(return_dict, self.config) else features.to_tuple()

    def _check_qformer_text(
        self, qformer_input_ids: torch.Tensor, qformer_attention_mask: torch.Tensor | None, batch: int
    ) -> torch.Tensor:
        """Validates a Q-Former question and returns its `(batch, T)` padding mask."""
        if not self.has_qformer_text_input:
            raise ValueError(
                "qformer_input_ids were given but this model's Q-Former reads no text "
                "(config.qformer_config.use_qformer_text_input=False): drop them, or build the model with "
                "use_qformer_text_input=True (which adds the Q-Former text embeddings)"
            )
        if qformer_input_ids.dim() != 2:
            raise ValueError(f"qformer_input_ids must be (batch, length), got shape {tuple(qformer_input_ids.shape)}")
        if qformer_input_ids.shape[0] != batch:
            raise ValueError(
                f"qformer_input_ids have batch size {qformer_input_ids.shape[0]} but there are {batch} images: "
                "pass one Q-Former text per image"
            )
        if qformer_attention_mask is None:
            return torch.ones_like(qformer_input_ids)
        if qformer_attention_mask.shape != qformer_input_ids.shape:
            raise ValueError(
                f"qformer_attention_mask must have the shape of qformer_input_ids {tuple(qformer_input_ids.shape)}, "
                f"got {tuple(qformer_attention_mask.shape)}"
            )
        return qformer_attention_mask

    # -- prompts ----------------------------------------------------------------------------------------------------
    def _default_prompt(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Prompt ids when none are given: the LLM's BOS (T5: its start id, else EOS, as LAVIS feeds `</s>`)."""
        text_config = self.config.text_config
        start = text_config.bos_token_id
        if start is None and not self.config.use_decoder_only_language_model:
            start = text_config.eos_token_id
        if start is None:
            return torch.zeros(batch_size, 0, dtype=torch.long, device=device)
        return torch.full((batch_size, 1), start, dtype=torch.long, device=device)

    def _place_image_tokens(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> _LanguageModelInputs:
        """Finds the `num_query_tokens` image positions of every row, inserting them if the prompt has none.

        The positions are the image tokens of `input_ids`, or (embeddings alone) the rows of `inputs_embeds` equal to
        the image token's embedding. Inserted positions go right after any left padding, so a left-padded batch lays
        out exactly like one prompt at a time.
        """
        num_queries = self.config.num_query_tokens
        image_token = self.config.image_token_index
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=reference.device)
        if tuple(attention_mask.shape) != (batch, length):
            what = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(
                f"attention_mask must have the shape of {what} {(batch, length)}, got {tuple(attention_mask.shape)}"
            )
        image_mask = self._image_token_mask(input_ids, inputs_embeds)
        counts = image_mask.sum(dim=1)
        # Compiled graphs cannot branch on the data: they take the processor layout as given.
        if torch.compiler.is_compiling() or bool((counts == num_queries).all()):
            if labels is not None:
                labels = labels.masked_fill(image_mask, IGNORE_INDEX)
            return _LanguageModelInputs(input_ids, attention_mask, labels, image_mask, False, inputs_embeds)
        if bool((counts != 0).any()):
            row = int(torch.nonzero(counts != num_queries)[0])
            if bool((counts == num_queries).any()):
                row = int(torch.nonzero(counts == 0)[0]) if bool((counts == 0).any()) else row
            where = "input_ids" if input_ids is not None else "inputs_embeds (rows equal to the image token embedding)"
            raise ValueError(
                f"row {row} of {where} has {int(counts[row])} image tokens (id {image_token}); every row must hold "
                f"exactly num_query_tokens={num_queries} of them, or none (then the queries are prepended). "
                f"Counts per row: {counts.tolist()}"
            )

        # (B, L) -> (B, L + Q): the queries go after each row's leading padding.
        offsets = (attention_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)  # (B, 1)
        positions = torch.arange(length + num_queries, device=reference.device)[None]  # (1, L + Q)
        image_positions = (positions >= offsets) & (positions < offsets + num_queries)  # (B, L + Q)
        source = torch.where(positions < offsets, positions, positions - num_queries).clamp(0, max(length - 1, 0))

        def spread(values: torch.Tensor | None, image_value: int) -> torch.Tensor | None:
            if values is None:
                return None
            width = values.shape[2:]
            if length == 0:
                return values.new_full((batch, num_queries, *width), image_value)
            index = source.expand(batch, -1).reshape(batch, -1, *([1] * len(width))).expand(-1, -1, *width)
            mask = image_positions.reshape(batch, -1, *([1] * len(width)))
            return torch.gather(values, 1, index).masked_fill(mask, image_value)

        placeholder = image_token if image_token is not None else 0
        return _LanguageModelInputs(
            input_ids=spread(input_ids, placeholder),
            attention_mask=spread(attention_mask, 1),
            labels=spread(labels, IGNORE_INDEX),
            image_positions=image_positions,
            inserted=True,
            inputs_embeds=spread(inputs_embeds, 0),
        )

    def _image_token_mask(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        """`(B, L)` bool: where the prompt holds the image token (by id, or by its embedding when only embeddings
        are given)."""
        image_token = self.config.image_token_index
        if input_ids is not None:
            if image_token is None:
                return torch.zeros_like(input_ids, dtype=torch.bool)
            return input_ids == image_token
        if image_token is None:
            return torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        image_embedding = self.get_input_embeddings()(torch.tensor(image_token, device=inputs_embeds.device))
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(dim=-1)

    def _embed_prompt(self, prepared: _LanguageModelInputs, language_model_inputs: torch.Tensor) -> torch.Tensor:
        if prepared.inputs_embeds is not None:
            embeddings = prepared.inputs_embeds
        else:
            embeddings = self.get_input_embeddings()(prepared.input_ids)
        soft_prompts = language_model_inputs.to(embeddings.device, embeddings.dtype)
        return embeddings.masked_scatter(prepared.image_positions[..., None].to(embeddings.device), soft_prompts)

    def _check_sequence_fits(self, length: int, what: str) -> None:
        limit = getattr(self.config.text_config, "max_position_embeddings", None)
        if self.config.use_decoder_only_language_model and limit is not None and length > limit:
            raise ValueError(
                f"{what} is {length} positions ({self.config.num_query_tokens} query tokens included), more than the "
                f"LLM's max_position_embeddings ({limit}); shorten the prompt"
            )

    def _prepare_prompt(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        encoding: Blip2ImageEncodingOutput,
        inputs_embeds: torch.Tensor | None = None,
    ) -> _LanguageModelInputs:
        batch = encoding.language_model_inputs.shape[0]
        if inputs_embeds is not None:
            width = self.config.text_config.hidden_size
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
                raise ValueError(
                    f"inputs_embeds must be (batch, length, {width}) (the LLM's hidden size), "
                    f"got shape {tuple(inputs_embeds.shape)}"
                )
            if input_ids is not None and tuple(input_ids.shape) != tuple(inputs_embeds.shape[:2]):
                raise ValueError(
                    f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} must "
                    "describe the same (batch, length)"
                )
        elif input_ids is None:
            if attention_mask is not None:
                raise ValueError("attention_mask was given without input_ids or inputs_embeds")
            input_ids = self._default_prompt(batch, encoding.language_model_inputs.device)
        reference = input_ids if input_ids is not None else inputs_embeds
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        if input_ids is not None and input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids is not None:
            self._check_token_ids(input_ids)
        if reference.shape[0] != batch:
            raise ValueError(
                f"got {batch} images but {reference.shape[0]} texts: pixel_values and {name} need one batch size"
            )
        if (
            labels is not None
            and self.config.use_decoder_only_language_model
            and tuple(labels.shape) != tuple(reference.shape[:2])
        ):
            raise ValueError(
                f"labels must have the shape of {name} {tuple(reference.shape[:2])}, got {tuple(labels.shape)}"
            )
        if labels is not None and labels.shape[0] != batch:
            raise ValueError(f"labels have batch size {labels.shape[0]}, the images {batch}")
        return self._place_image_tokens(
            input_ids, attention_mask, labels if self._labels_follow_prompt() else None, inputs_embeds
        )

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        """Ids outside the LLM vocabulary would fail deep in its embedding lookup (on CUDA as a device-side assert
        that ends the process): name them here. One min/max per call; skipped under torch.compile."""
        vocab_size = _vocabulary_size(self.get_input_embeddings())
        if vocab_size is None or torch.compiler.is_compiling() or input_ids.numel() == 0:
            return
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            row = int(torch.nonzero((input_ids == bad).any(dim=1))[0])
            raise ValueError(
                f"input_ids must be ids of the LLM vocabulary (0..{vocab_size - 1}), got {bad} in row {row}"
                + (": -100 marks ignored positions in labels, not in input_ids" if bad == IGNORE_INDEX else "")
            )

    def _labels_follow_prompt(self) -> bool:
        # Decoder-only labels align with the prompt; encoder-decoder labels are decoder targets.
        return self.config.use_decoder_only_language_model

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        frozen_image_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Blip2ConditionalGenerationOutput | tuple:
        """Runs images and prompts through the whole model.

        Args:
            pixel_values: `(batch, 3, H, W)` images.
            input_ids: `(batch, L)` LLM prompt ids holding `num_query_tokens` image tokens per row (the processor's
                layout) or none (the queries are then placed before the text, after any left padding).
            attention_mask: `(batch, L)` padding mask of `input_ids`.
            decoder_input_ids, decoder_attention_mask: Decoder inputs of encoder-decoder LLMs.
            inputs_embeds: `(batch, L, llm_hidden)` prompt embeddings instead of (or along with) `input_ids`; their
                image positions are those of `input_ids`, else the rows equal to the image token's embedding.
            labels: Decoder-only: `(batch, L)` like `input_ids`, -100 where no loss is taken (image positions are
                always ignored). Encoder-decoder: decoder target ids.
            qformer_input_ids, qformer_attention_mask: `(batch, T)` question for a Q-Former with text input (the
                processor's `qformer_text=`); the queries then attend to it (see `encode_images`).
            frozen_image_features: Cached frozen-encoder outputs instead of `pixel_values` (see `encode_images`).
        """
        encoding = self.encode_images(
            pixel_values,
            interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
            frozen_image_features=frozen_image_features,
        )
        prepared = self._prepare_prompt(input_ids, attention_mask, labels, encoding, inputs_embeds)
        self._check_sequence_fits(prepared.attention_mask.shape[1], "the prompt")
        if labels is not None:
            # Decoder-only: a position's label is predicted from the one before, so the first label never counts.
            targets = prepared.labels[:, 1:] if self.config.use_decoder_only_language_model else labels
            _check_labels_have_targets(targets, kwargs.get("num_items_in_batch"))
        inputs_embeds = self._embed_prompt(prepared, encoding.language_model_inputs)
        common = _given(output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        if self.config.use_decoder_only_language_model:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=prepared.attention_mask,
                labels=prepared.labels,
                return_dict=True,
                **common,
                **kwargs,
            )
        else:
            outputs = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=prepared.attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                labels=labels,
                return_dict=True,
                **common,
                **kwargs,
            )
        output = Blip2ConditionalGenerationOutput(
            loss=outputs.loss,
            logits=outputs.logits,
            vision_outputs=encoding.vision_outputs,
            qformer_outputs=encoding.qformer_outputs,
            language_model_outputs=outputs,
        )
        return output if _wants_dict(return_dict, self.config) else output.to_tuple()


class Blip2Model(_Blip2WithLanguageModel):
    """BLIP-2 with feature getters for each part: images, Q-Former queries and LLM text features."""

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """The vision encoder's output, as transformers' `Blip2Model` returns it: `last_hidden_state` `(batch, 1 +
        num_patches, vision_hidden)`, `pooler_output` the (post-LayerNorm) class token `(batch, vision_hidden)`.

        The soft prompts are `Blip2ForConditionalGeneration.get_image_features(...).pooler_output`, or
        `encode_images(...).language_model_inputs` here.
        """
        return self.vision_model(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=_wants_dict(return_dict, self.config),
        )

    def get_qformer_features(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool = False,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The Q-Former's last hidden states, `(batch, num_query_tokens, qformer_hidden)` (as transformers' class
        returns), or `(batch, num_query_tokens + T, qformer_hidden)` with a `(batch, T)` question in
        `qformer_input_ids`. The full outputs are in `get_image_features(...).qformer_outputs`."""
        return self.encode_images(
            pixel_values,
            interpolate_pos_encoding,
            qformer_input_ids=qformer_input_ids,
            qformer_attention_mask=qformer_attention_mask,
        ).qformer_outputs.last_hidden_state

    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling | tuple:
        """LLM hidden states of text alone (decoder-only: the decoder stack; encoder-decoder: the encoder).

        `last_hidden_state` is `(batch, length, llm_hidden)`; `pooler_output` is None (the LLM has no pooler).
        `decoder_input_ids`, `decoder_attention_mask` and `labels` are accepted for transformers' signature and not
        used: the text features are the encoder's.
        """
        text_model = (
            self.language_model.base_model
            if self.config.use_decoder_only_language_model
            else self.language_model.get_encoder()
        )
        outputs = text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            return_dict=True,
            **_given(output_attentions=output_attentions, output_hidden_states=output_hidden_states),
            **kwargs,
        )
        features = BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return features if _wants_dict(return_dict, self.config) else features.to_tuple()


class Blip2ForConditionalGeneration(_Blip2WithLanguageModel, GenerationMixin):
    """BLIP-2 for image-conditioned text generation (captioning, VQA) with a decoder-only or encoder-decoder LLM."""

    # The forward has no data-dependent branch under torch.compile (the processor layout is taken as given there);
    # whether decoding compiles is then the LLM's own `_can_compile_fullgraph`.
    _can_compile_fullgraph = True

    def _write_files_saved_with_the_model(self, folder: Path) -> None:
        """The pipeline code and `custom_pipelines` entries (see `CUSTOM_PIPELINES`) go with every checkpoint, so
        `pipeline(task, model=folder, trust_remote_code=True)` runs ours (and `push_to_hub=True` uploads them)."""
        package_folder = Path(__file__).resolve().parent
        for name in PIPELINE_CODE_FILES:
            # A model loaded as remote code may run from a folder without these files; then there is nothing to copy.
            if (package_folder / name).is_file():
                shutil.copyfile(package_folder / name, folder / name)
        self.config.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        image_encoding: Blip2ImageEncodingOutput | None = None,
        frozen_image_features: torch.Tensor | None = None,
        share_prompt_cache: bool = True,
        **generate_kwargs: Any,
    ) -> torch.LongTensor | GenerateOutput:
        """Generates text conditioned on images and optional prompts.

        Any `transformers` generation argument works (`max_new_tokens`, `num_beams`, `do_sample`, ...); the model's
        `generation_config` supplies the defaults. Batched prompts of different lengths must be left-padded.

        Args:
            pixel_values: `(batch, 3, H, W)` images (or give `image_encoding`).
            input_ids, attention_mask: `(batch, L)` prompts, left-padded, as in `forward`.
            inputs_embeds: `(batch, L, llm_hidden)` prompt embeddings instead of (or along with) `input_ids`, as in
                `forward`.
            qformer_input_ids, qformer_attention_mask: `(batch, T)` question for a Q-Former with text input.
            image_encoding: A precomputed `encode_images` output (e.g. `encoding.select(image_of_each_prompt)`),
                instead of `pixel_values`: its `language_model_inputs` `(batch, num_query_tokens, llm_hidden)` are
                used as they are, so a question for the Q-Former goes to `encode_images`, not here.
            share_prompt_cache: With several beams (or sequences per prompt) and a decoder-only LLM, run the LLM
                over each prompt once and give every beam a copy of its cache, instead of running the prompt once
                per beam (transformers' default). Same ids, a fraction of the prompt pass's cost.

        Returns, for decoder-only LLMs, the prompt ids as given followed by the new tokens (with no prompt: BOS
        and the new tokens; with `inputs_embeds` and no `input_ids`: the new tokens only, as transformers does); for
        encoder-decoder LLMs, the decoder ids.
        """
        if image_encoding is None:
            if pixel_values is None and frozen_image_features is None:
                raise ValueError(
                    "pixel_values are required: a (batch, channels, height, width) float tensor (or a precomputed "
                    "image_encoding, or cached frozen_image_features)"
                )
            encoding = self.encode_images(
                pixel_values,
                interpolate_pos_encoding,
                qformer_input_ids=qformer_input_ids,
                qformer_attention_mask=qformer_attention_mask,
                frozen_image_features=frozen_image_features,
            )
        else:
            if pixel_values is not None or frozen_image_features is not None:
                raise ValueError("pass pixel_values (or frozen_image_features) or image_encoding, not both")
            if qformer_input_ids is not None or qformer_attention_mask is not None:
                raise ValueError(
                    "image_encoding already holds the soft prompts: pass the Q-Former question to encode_images "
                    "(e.g. encode_images(image_embeds=..., qformer_input_ids=...)), not to generate"
                )
            if image_encoding.language_model_inputs is None:
                raise ValueError("image_encoding has no language_model_inputs: pass an encode_images output")
            encoding = image_encoding
        if self.config.use_decoder_only_language_model and attention_mask is not None:
            _check_left_padded(attention_mask)
        soft_prompts = encoding.language_model_inputs
        user_ids = input_ids
        if input_ids is None and inputs_embeds is None:
            user_ids = self._default_prompt(soft_prompts.shape[0], soft_prompts.device)
        prepared = self._prepare_prompt(user_ids, attention_mask, None, encoding, inputs_embeds)
        prompt_length = prepared.attention_mask.shape[1]
        self._check_sequence_fits(
            prompt_length + int(generate_kwargs.get("max_new_tokens") or 0), "prompt + new tokens"
        )
        inputs_embeds = self._embed_prompt(prepared, encoding.language_model_inputs)
        del encoding  # the image features are not needed while decoding
        generate_kwargs = _with_generation_defaults(self.generation_config, generate_kwargs)
        if not self.config.use_decoder_only_language_model:
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=prepared.attention_mask, **generate_kwargs
            )
        if share_prompt_cache:
            generate_kwargs = self._with_shared_prompt_cache(inputs_embeds, prepared, generate_kwargs)
        if prepared.input_ids is None:
            # Embeddings alone: transformers then returns the new tokens only.
            return self.language_model.generate(
                inputs_embeds=inputs_embeds, attention_mask=prepared.attention_mask, **generate_kwargs
            )
        outputs = self.language_model.generate(
            input_ids=prepared.input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=prepared.attention_mask,
            **generate_kwargs,
        )
        if not prepared.inserted:
            return outputs
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        # Give back the prompt as the caller wrote it: drop the query placeholders inserted above.
        sequences = torch.cat([user_ids.to(sequences.device), sequences[:, prompt_length:]], dim=1)
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs

    def _with_shared_prompt_cache(
        self, inputs_embeds: torch.Tensor, prepared: _LanguageModelInputs, generate_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """Pre-fills the LLM cache once per prompt and copies it to the prompt's beams (see `share_prompt_cache`).

        transformers expands every prompt to `num_beams` rows before its prompt pass; here the prompt but its last
        position runs once per prompt, and `generate` continues from the copied cache with that last position (a
        text token, whose embedding its ids give back). Left as is when there is nothing to share or transformers
        manages the cache itself (a given or static cache, no cache, a last position that is an image position).
        """
        config = generate_kwargs["generation_config"]
        # Beam search expands each prompt to num_beams rows; sampling and greedy to num_return_sequences.
        copies = config.num_beams if (config.num_beams or 1) > 1 else (config.num_return_sequences or 1)
        if (
            copies < 2
            or config.use_cache is False  # None: transformers' default, a cache
            # The prompt step's attentions and hidden states would then cover its last position only.
            or config.output_attentions
            or config.output_hidden_states
            or config.cache_implementation is not None
            or config.prefill_chunk_size is not None
            or any(generate_kwargs.get(key) is not None for key in ("cache", "past_key_values", "assistant_model"))
            or inputs_embeds.shape[1] < 2
            or bool(prepared.image_positions[:, -1].any())
        ):
            return generate_kwargs
        attention_mask = prepared.attention_mask[:, :-1]
        extra = {}
        if "position_ids" in inspect.signature(self.language_model.forward).parameters:
            # The positions generate gives a left-padded prompt (models that take them, e.g. Llama).
            extra["position_ids"] = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
        prefix = self.language_model(
            inputs_embeds=inputs_embeds[:, :-1],
            attention_mask=attention_mask,
            use_cache=True,
            return_dict=True,
            **extra,
        )
        cache = prefix.cache if "cache" in prefix else prefix.past_key_values
        cache.batch_repeat_interleave(copies)  # (B, ...) -> (B * copies, ...), each prompt's copies side by side
        return {**generate_kwargs, "cache": cache}


def linear_layers_to_quantize(model: nn.Module, quantization_config: Any) -> list[tuple[str, int, int]]:
    """`(name, in_features, out_features)` of the linear layers transformers' bitsandbytes quantizer replaces.

    Skipped are `llm_int8_skip_modules` (or, when that is None, the output embeddings, tied and last modules, as
    transformers does) and every `_keep_in_fp32_modules` entry of the model.
    """
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = quantization_config.llm_int8_skip_modules
    patterns = list(skip) if skip is not None else list(get_keys_to_not_convert(model))
    patterns += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    return [
        (name, module.in_features, module.out_features)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and should_convert_module(name, patterns)
    ]


def check_4bit_layer_widths(model: nn.Module, quantization_config: Any) -> None:
    """Raises a `ValueError` naming the layers that 4-bit loading would quantize to widths bitsandbytes' CPU
    inference cannot run (`in_features` a multiple of 64, `out_features` of 32; see `FOUR_BIT_CPU_IN_MULTIPLE`)."""
    bad = [
        (name, fan_in, fan_out)
        for name, fan_in, fan_out in linear_layers_to_quantize(model, quantization_config)
        if fan_in % FOUR_BIT_CPU_IN_MULTIPLE or fan_out % FOUR_BIT_CPU_OUT_MULTIPLE
    ]
    if bad:
        widths = sorted({width for _, fan_in, fan_out in bad for width in (fan_in, fan_out)})
        listed = ", ".join(f"{name} ({fan_in} -> {fan_out})" for name, fan_in, fan_out in bad[:4])
        raise ValueError(
            f"4-bit quantization cannot pack {len(bad)} layer(s) of width(s) {widths} for bitsandbytes' CPU "
            f"inference, which needs in_features a multiple of {FOUR_BIT_CPU_IN_MULTIPLE} and out_features a "
            f"multiple of {FOUR_BIT_CPU_OUT_MULTIPLE}. Offending: {listed}{' ...' if len(bad) > 4 else ''}. Load in "
            "8-bit (load_in_8bit=True), add these modules to llm_int8_skip_modules, or load on a GPU"
        )


def _image_inputs(image: torch.Tensor | Blip2QFormerKeyValues) -> dict[str, Any]:
    """The Q-Former keyword that carries `image`: its features, or their precomputed key/values."""
    if isinstance(image, Blip2QFormerKeyValues):
        return {"encoder_key_values": image}
    return {"encoder_hidden_states": image}


def _image_batch_size(image: torch.Tensor | Blip2QFormerKeyValues) -> int:
    return image.batch_size if isinstance(image, Blip2QFormerKeyValues) else image.shape[0]


def _check_left_padded(attention_mask: torch.Tensor) -> None:
    """Right-padded prompts make a decoder-only LLM continue from padding: refuse them for batched generation."""
    if attention_mask.dim() == 2 and bool((attention_mask[:, -1] == 0).any()):
        row = int(torch.nonzero(attention_mask[:, -1] == 0)[0])
        raise ValueError(
            f"row {row} of the prompt batch is right-padded; batched generation needs left padding "
            "(tokenizer.padding_side = 'left')"
        )


def _with_generation_defaults(defaults: GenerationConfig, generate_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Folds generation arguments into a copy of the model's generation config (unless one is passed)."""
    if "generation_config" in generate_kwargs:
        return generate_kwargs
    generation_config = copy.deepcopy(defaults)
    remaining = generation_config.update(**generate_kwargs)
    return {"generation_config": generation_config, **remaining}


def build_vision_model(config: Blip2Config) -> nn.Module:
    """The image encoder of `config`: this package's `Blip2VisionModel` for a `Blip2VisionConfig` (the official
    checkpoints' EVA / CLIP ViT), else `Blip2VisionBackbone` over the transformers model of `config.vision_config`;
    both give the features at `config.vision_feature_layer` with the same interface."""
    if not config.has_own_vision_encoder:
        return Blip2VisionBackbone(
            config.vision_config,
            config.vision_feature_layer,
            config.vision_feature_select_strategy,
            config.vision_feature_size,
        )
    vision = Blip2VisionModel._from_config(config.vision_config)
    vision.feature_layer, vision.select_strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    return vision


def _runs_on_cpu(device_map: Any) -> bool:
    """Whether `from_pretrained(..., device_map=device_map)` puts (some of) the model on the CPU."""
    if device_map is None:
        return True  # transformers loads on the CPU unless told otherwise
    if isinstance(device_map, dict):
        return any(str(device) == "cpu" for device in device_map.values())
    if isinstance(device_map, str) and device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return not torch.cuda.is_available()
    return torch.device(device_map).type == "cpu"


def _check_labels_have_targets(targets: torch.Tensor, num_items_in_batch: Any) -> None:
    """A batch whose labels ignore every position has a loss of 0/0 = NaN: refuse it, naming `labels`.

    Rows without targets are fine as long as another row has some; under gradient accumulation (`num_items_in_batch`
    counts the targets of all micro-batches) a micro-batch without targets adds 0, which is fine too.
    """
    if torch.compiler.is_compiling() or targets.device.type == "meta" or bool((targets != IGNORE_INDEX).any()):
        return
    if num_items_in_batch is not None and int(num_items_in_batch) > 0:
        return
    raise ValueError(
        f"labels of shape {tuple(targets.shape)} hold no target: every position is {IGNORE_INDEX} (ignored) once the "
        "image positions and, for decoder-only LLMs, the first position (which no token predicts) are left out, so "
        "the loss would be NaN. Give at least one target token id in the batch, or call without labels"
    )


def _vocabulary_size(embeddings: nn.Module | None) -> int | None:
    """Rows of the LLM's input embedding table (None when it is not a plain lookup table)."""
    size = getattr(embeddings, "num_embeddings", None)
    return int(size) if isinstance(size, int) else None


def _given(**flags: Any) -> dict[str, Any]:
    """The flags that were set: an explicit None would override the LLM's config where transformers reads it."""
    return {name: value for name, value in flags.items() if value is not None}


def _wants_dict(return_dict: bool | None, config: Any) -> bool:
    return bool(return_dict if return_dict is not None else getattr(config, "return_dict", True))
