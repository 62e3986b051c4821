"""A Hugging Face ``LlavaForConditionalGeneration`` checkpoint (llava-hf layout) as a MultimodalLM.

  vision tower (CLIP / SigLIP, hf_vision.py)   -> MultimodalLM ``vision``
  multi_modal_projector.linear_1 / linear_2     -> ``projector/fc1`` / ``projector/fc2``
                                                   (LLaVA-1.5's mlp2x_gelu: exact GELU, biases)
  language model (Llama / Mistral / Qwen2 ...)  -> ``lm`` (hf_lm.py)

Tensor prefixes differ between writers and are found in the file: the hub's llava-hf
checkpoints and transformers' ``save_pretrained`` use ``language_model.model.``,
``language_model.lm_head.``, ``vision_tower.[vision_model.]`` and ``multi_modal_projector.``;
transformers 5's in-memory names are ``model.language_model.``, ``lm_head.``,
``model.vision_tower.`` and ``model.multi_modal_projector.``.

``vision_feature_layer`` (an int) becomes ``MultimodalConfig.vision_feature_layer`` and
``vision_feature_select_strategy`` "default" drops the CLS token, "full" keeps it
(``keep_cls_token``; a SigLIP tower has none, so "full" is every patch). The tower's
``post_layernorm`` is not used by LLaVA and is skipped (logged).
Image tokens: each image is ``tokens_per_image`` positions holding ``image_token_index``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh
from jax.typing import DTypeLike

from mllm_jax.checkpoint_conversion.hf_config import (
    ARCHITECTURES,
    HFLanguageModelConfig,
    lm_config_from_hf,
    read_hf_config,
)
from mllm_jax.checkpoint_conversion.hf_lm import hf_lm_sources
from mllm_jax.checkpoint_conversion.hf_vision import (
    find_tower_prefix,
    vision_model_type,
    vision_tower_ignored,
    vision_tower_sources,
    vit_config_from_hf,
)
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import Source, load_params, view
from mllm_jax.checkpoint_conversion.targets import nested, param_targets, renamed
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.sharding import LogicalRules

LLAVA_ARCHITECTURES = ("LlavaForConditionalGeneration",)
SELECT_STRATEGIES = {"default": False, "full": True}  # -> keep_cls_token
# (language-model body, output head, projector) prefixes, by writer.
_LAYOUTS = (
    ("language_model.model.", "language_model.lm_head.", "multi_modal_projector."),
    ("model.language_model.", "lm_head.", "model.multi_modal_projector."),
)
_ARCHITECTURE_OF_TYPE = {family: arch for arch, family in ARCHITECTURES.items()}
# transformers' config-class defaults of the text_config fields lm_config_from_hf reads.
_LLAMA_SIZES = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32,
)  # fmt: skip
_MISTRAL_SIZES = _LLAMA_SIZES | dict(
    intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072
)
_TEXT_CONFIG_DEFAULTS = {
    "llama": _LLAMA_SIZES | dict(max_position_embeddings=2048),
    "mistral": _MISTRAL_SIZES,
    "qwen2": _LLAMA_SIZES
    | dict(vocab_size=151936, intermediate_size=22016, max_position_embeddings=32768),
    "mixtral": _MISTRAL_SIZES | dict(num_local_experts=8, num_experts_per_tok=2),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFLlavaConfig:
    """What a LLaVA checkpoint's ``config.json`` says, in this library's terms.

    Attributes:
      multimodal: the MultimodalLM config (MLP projector, early fusion, frozen tower).
      language_model: the text half (``lm_config_from_hf`` of ``text_config``).
      image_token_id: ``image_token_index``: the id each image position holds.
      vision_model_type: "clip_vision_model" or "siglip_vision_model".
    """

    multimodal: MultimodalConfig
    language_model: HFLanguageModelConfig
    image_token_id: int
    vision_model_type: str


def llava_config_from_hf(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
    max_length: int | None = None,
) -> HFLlavaConfig:
    """Reads a LLaVA ``config.json`` (dict, file or directory); arguments as
    ``lm_config_from_hf``.

    Raises:
      ValueError: naming the field, for another architecture, a list-valued
        ``vision_feature_layer``, an unknown ``vision_feature_select_strategy``, a projector
        activation other than exact GELU, or a projector without biases.
    """
    config = read_hf_config(config)
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in LLAVA_ARCHITECTURES:
        raise ValueError(
            f"config.json architectures={architectures} is not a LLaVA model; supported: "
            f"{LLAVA_ARCHITECTURES} (a text-only model loads with load_hf_lm)"
        )
    text = dict(config.get("text_config") or {})
    model_type = text.get("model_type", "llama")
    if not text.get("architectures"):
        if model_type not in _ARCHITECTURE_OF_TYPE:
            raise ValueError(
                f"config.json text_config.model_type={model_type!r} is not supported; "
                f"supported: {sorted(_ARCHITECTURE_OF_TYPE)}"
            )
        text["architectures"] = [_ARCHITECTURE_OF_TYPE[model_type]]
    # A nested text_config is saved as a diff from its class's defaults (llava-1.5-7b-hf's
    # has no hidden_size): put the defaults back.
    text = _TEXT_CONFIG_DEFAULTS.get(ARCHITECTURES.get(text["architectures"][0]), {}) | text
    language_model = lm_config_from_hf(
        text, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, max_length=max_length
    )
    feature_layer = config.get("vision_feature_layer", -2)
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"config.json vision_feature_layer={feature_layer!r}: only a single layer index is "
            "supported (not a list of layers to concatenate)"
        )
    strategy = config.get("vision_feature_select_strategy", "default")
    if strategy not in SELECT_STRATEGIES:
        raise ValueError(
            f"config.json vision_feature_select_strategy={strategy!r} is not one of "
            f"{sorted(SELECT_STRATEGIES)}"
        )
    if config.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(
            f"config.json projector_hidden_act={config['projector_hidden_act']!r}: the projector "
            "is LLaVA's mlp2x_gelu (exact GELU)"
        )
    if not config.get("multimodal_projector_bias", True):
        raise ValueError("config.json multimodal_projector_bias=false: the projector has biases")
    vision_type, _ = vision_model_type(config)
    vision = vit_config_from_hf(config, dtype=dtype, param_dtype=param_dtype)
    if strategy == "default" and not vision.use_cls_token:
        raise ValueError(
            "config.json vision_feature_select_strategy='default' drops the first token, but "
            f"this {vision_type} tower has no CLS token: that would drop a patch (use 'full')"
        )
    multimodal = MultimodalConfig(
        vocab_size=language_model.vocab_size,
        embed_dim=language_model.embed_dim,
        transformer=language_model.transformer,
        vision=vision,
        tie_embeddings=language_model.tie_embeddings,
        projector="mlp",
        vision_feature_layer=feature_layer,
        fusion="early",
        freeze_vision=True,
        keep_cls_token=SELECT_STRATEGIES[strategy] and vision.use_cls_token,
    )
    return HFLlavaConfig(
        multimodal=multimodal,
        language_model=language_model,
        image_token_id=int(config.get("image_token_index", config.get("image_token_id", -1))),
        vision_model_type=vision_type,
    )


def _layout(directory: SafetensorsDirectory) -> tuple[str, str, str]:
    for body, head, projector in _LAYOUTS:
        if f"{body}embed_tokens.weight" in directory:
            return body, head, projector
    raise ValueError(
        f"{directory.path}: no language-model embedding under any known LLaVA prefix "
        f"({[f'{body}embed_tokens.weight' for body, _, _ in _LAYOUTS]})"
    )


def hf_llava_sources(
    cfg: HFLlavaConfig, directory: SafetensorsDirectory
) -> tuple[dict[str, Source], list[str]]:
    """(MultimodalLM parameter path -> Source, ignored tensor regexes) for this checkpoint."""
    body, head, projector = _layout(directory)
    fused = f"{body}layers.0.mlp.experts.gate_up_proj" in directory
    lm_sources, lm_ignored = hf_lm_sources(cfg.language_model, fused_experts=fused)

    def rename(name: str) -> str:
        if name.startswith("model."):
            return body + name[len("model.") :]
        if name.startswith("lm_head."):
            return head + name[len("lm_head.") :]
        raise ValueError(f"unexpected language-model tensor name {name!r}")

    def rename_pattern(pattern: str) -> str:
        for old, new in ((r"model\.", body), (r"lm_head\.", head)):
            if pattern.startswith(old):
                return re.escape(new) + pattern[len(old) :]
        return pattern

    sources = nested("lm", renamed(lm_sources, rename))
    ignored = [rename_pattern(pattern) for pattern in lm_ignored]
    tower = find_tower_prefix(directory)
    sources |= nested("vision", vision_tower_sources(cfg.multimodal.vision, tower))
    ignored += vision_tower_ignored(tower, post_norm=False)
    for ours, theirs in (("fc1", "linear_1"), ("fc2", "linear_2")):
        sources[f"projector/{ours}/kernel"] = view(f"{projector}{theirs}.weight", permute=(1, 0))
        sources[f"projector/{ours}/bias"] = view(f"{projector}{theirs}.bias")
    return sources, ignored


def abstract_llava_params(model: MultimodalLM) -> Any:
    """``jax.eval_shape`` of the model's init (boxed with logical axes): nothing is allocated."""
    cfg = model.config
    size = cfg.vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    tokens = jnp.zeros((1, cfg.tokens_per_image), jnp.int32)
    fields = dict(
        segment_ids=jnp.ones_like(tokens),
        positions=jnp.arange(cfg.tokens_per_image)[None],
        images=jnp.zeros((1, 1, height, width, 3), cfg.transformer.dtype),
        image_slot=jnp.zeros_like(tokens),
        image_patch=jnp.arange(cfg.tokens_per_image)[None],
    )
    return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, **fields))["params"]


def load_hf_llava(
    hf_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
    max_length: int | None = None,
) -> tuple[MultimodalLM, dict[str, Any], HFLlavaConfig]:
    """Imports a LLaVA checkpoint directory: (MultimodalLM, nested params, config).

    Every parameter is read straight onto ``mesh`` (sharded by the logical ``rules``), each
    device reading only its slice; without a mesh, onto one device. Arguments otherwise as
    ``load_hf_lm``.

    Raises:
      ValueError: an unsupported config field, or tensors missing, unexpected or misshapen
        (all listed before anything is read).
    """
    cfg = llava_config_from_hf(
        hf_dir, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, max_length=max_length
    )
    directory = SafetensorsDirectory(hf_dir)
    sources, ignored = hf_llava_sources(cfg, directory)
    model = MultimodalLM(cfg.multimodal)
    targets = param_targets(abstract_llava_params(model), mesh, rules)
    flat = load_params(directory, sources, targets, ignored=ignored)
    return model, traverse_util.unflatten_dict(flat, sep="/"), cfg
