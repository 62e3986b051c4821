"""Hugging Face CLIP and SigLIP vision towers -> ``ViTConfig`` + ``PooledVisionTransformer`` params.

Reads ``CLIPVisionModel`` / ``SiglipVisionModel`` checkpoints and the vision half of full
``CLIPModel`` / ``SiglipModel`` ones (safetensors directories with their ``config.json``).
Tensor names, after the tower's prefix (``vision_model.`` in full models and older standalone
ones, none in standalone ones saved by transformers 5, ``model.vision_tower.vision_model.`` in
llava-hf checkpoints), map to our parameters as:

  embeddings.patch_embedding.weight [D, C, p, p]   -> patch_embedding/kernel [p·p·C, D]
  embeddings.patch_embedding.bias (SigLIP)          -> patch_embedding/bias
  embeddings.class_embedding (CLIP)                 -> cls_token
  embeddings.position_embedding.weight              -> position_embedding
  pre_layrnorm (CLIP)                               -> pre_norm
  encoder.layers.i.layer_norm1, layer_norm2         -> layers_i/pre_attention_norm, pre_mlp_norm
  encoder.layers.i.self_attn.q_proj [H·Dh, D]       -> layers_i/attention/query [D, H, Dh]
    (k_proj, v_proj likewise; out_proj [D, H·Dh]    -> layers_i/attention/out [H, Dh, D])
  encoder.layers.i.mlp.fc1, fc2 [out, in]           -> layers_i/mlp/wi, wo [in, out]
  post_layernorm                                    -> final_norm
(LayerNorm weight -> scale; biases keep their name, split into heads like their kernels.)

Left out by design (logged by the loader): SigLIP's attention-pooling ``head.*``, ``position_ids``
buffers, and a full model's text tower, projections and logit scale/bias. Any other tensor is
an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh

from mllm_jax.checkpoint_conversion.hf_config import read_hf_config
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import Source, load_params, view
from mllm_jax.checkpoint_conversion.targets import param_targets
from mllm_jax.layers.vit import PooledVisionTransformer, ViTConfig
from mllm_jax.sharding import LogicalRules

# transformers' config defaults per tower: config.json files saved as a diff omit these.
_DEFAULTS = {
    "clip_vision_model": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=32,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    ),
    "siglip_vision_model": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_channels=3,
        image_size=224,
        patch_size=16,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    ),
}
_VISION_TYPE_OF_FULL_MODEL = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}
# Hugging Face hidden_act -> our MLP activation ("gelu_new" is the same tanh approximation).
HIDDEN_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu": "gelu",
}
# Tensors of a full model outside its vision tower, left out of an import (full-match regexes).
_OUTSIDE_THE_TOWER = {
    "clip": (
        r"text_model\..*",
        r"text_projection\.weight",
        r"visual_projection\.weight",
        "logit_scale",
    ),
    "siglip": (r"text_model\..*", "logit_scale", "logit_bias"),
}
_PATCH_WEIGHT = "embeddings.patch_embedding.weight"


def vision_model_type(hf_config: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """("clip_vision_model" | "siglip_vision_model", the tower's config dict) of a config.json.

    ``hf_config`` is a vision model's config or one with a ``vision_config`` (CLIPModel,
    SiglipModel, LLaVA). Raises a ValueError naming ``model_type`` for any other tower.
    """
    model_type = hf_config.get("model_type")
    if "vision_config" in hf_config and model_type not in _DEFAULTS:
        vision = hf_config["vision_config"]
        model_type = vision.get("model_type", _VISION_TYPE_OF_FULL_MODEL.get(model_type))
    else:
        vision = hf_config
    if model_type not in _DEFAULTS:
        raise ValueError(
            f"unsupported vision tower model_type {model_type!r}: expected one of "
            f"{sorted(_DEFAULTS)} (or a full model {sorted(_VISION_TYPE_OF_FULL_MODEL)})"
        )
    return model_type, vision


def _square(value: Any, field: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"vision config field {field}={value!r}: only square sizes import")
        value = value[0]
    return int(value)


def vit_config_from_hf(
    hf_config: Mapping[str, Any], *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32
) -> ViTConfig:
    """The ``ViTConfig`` of a CLIP or SigLIP tower's config.json dict (see ``vision_model_type``).

    Raises:
      ValueError: an unsupported ``model_type`` or ``hidden_act``, or sizes ``ViTConfig``
        rejects; the message names the field.
    """
    model_type, vision = vision_model_type(hf_config)
    fields = {**_DEFAULTS[model_type], **vision}
    act = fields["hidden_act"]
    if act not in HIDDEN_ACTIVATIONS:
        raise ValueError(
            f"vision config field hidden_act={act!r} is not supported; expected one of "
            f"{sorted(HIDDEN_ACTIVATIONS)}"
        )
    is_clip = model_type == "clip_vision_model"
    return ViTConfig(
        image_size=_square(fields["image_size"], "image_size"),
        patch_size=_square(fields["patch_size"], "patch_size"),
        width=int(fields["hidden_size"]),
        num_layers=int(fields["num_hidden_layers"]),
        num_heads=int(fields["num_attention_heads"]),
        mlp_dim=int(fields["intermediate_size"]),
        use_cls_token=is_clip,
        norm_epsilon=float(fields["layer_norm_eps"]),
        mlp_activation=HIDDEN_ACTIVATIONS[act],
        attention_bias="all",
        mlp_bias=True,
        patch_bias=not is_clip,
        pre_norm=is_clip,
        dtype=dtype,
        param_dtype=param_dtype,
    )


def _layer_norm(name: str) -> dict[str, Source]:
    return {"scale": view(f"{name}.weight"), "bias": view(f"{name}.bias")}


def _nest(prefix: str, sources: Mapping[str, Source]) -> dict[str, Source]:
    return {f"{prefix}/{path}": source for path, source in sources.items()}


def vision_tower_sources(
    config: ViTConfig, prefix: str, num_channels: int = 3
) -> dict[str, Source]:
    """``VisionTransformer`` parameter path ("layers_0/attention/query/kernel") -> Source.

    ``prefix`` starts every tensor name of the tower ("vision_model.", "" or
    "model.vision_tower.vision_model."); ``config`` is the tower's (``vit_config_from_hf``).
    """
    p, width = config.patch_size, config.width
    heads, head_dim = config.num_heads, config.width // config.num_heads
    sources = {
        "patch_embedding/kernel": view(
            f"{prefix}{_PATCH_WEIGHT}",
            split=((width,), (num_channels,), (p,), (p,)),
            permute=(2, 3, 1, 0),
            merge=(p * p * num_channels, width),
        ),
        "position_embedding": view(f"{prefix}embeddings.position_embedding.weight"),
    }
    if config.patch_bias:
        sources["patch_embedding/bias"] = view(f"{prefix}embeddings.patch_embedding.bias")
    if config.use_cls_token:
        sources["cls_token"] = view(f"{prefix}embeddings.class_embedding")
    if config.pre_norm:
        sources |= _nest("pre_norm", _layer_norm(f"{prefix}pre_layrnorm"))
    for i in range(config.num_layers):
        hf = f"{prefix}encoder.layers.{i}."
        layer = _nest("pre_attention_norm", _layer_norm(f"{hf}layer_norm1"))
        layer |= _nest("pre_mlp_norm", _layer_norm(f"{hf}layer_norm2"))
        for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            weight = f"{hf}self_attn.{theirs}"
            layer[f"attention/{ours}/kernel"] = view(
                f"{weight}.weight", split=((heads, head_dim), (width,)), permute=(2, 0, 1)
            )
            layer[f"attention/{ours}/bias"] = view(f"{weight}.bias", split=((heads, head_dim),))
        layer["attention/out/kernel"] = view(
            f"{hf}self_attn.out_proj.weight", split=((width,), (heads, head_dim)), permute=(1, 2, 0)
        )
        layer["attention/out/bias"] = view(f"{hf}self_attn.out_proj.bias")
        for ours, theirs in (("wi", "fc1"), ("wo", "fc2")):
            layer[f"mlp/{ours}/kernel"] = view(f"{hf}mlp.{theirs}.weight", permute=(1, 0))
            layer[f"mlp/{ours}/bias"] = view(f"{hf}mlp.{theirs}.bias")
        sources |= _nest(f"layers_{i}", layer)
    return sources


def post_norm_sources(prefix: str) -> dict[str, Source]:
    """``final_norm`` parameter path ("scale", "bias") -> Source: the tower's ``post_layernorm``."""
    return _layer_norm(f"{prefix}post_layernorm")


def vision_tower_ignored(prefix: str, *, post_norm: bool = True) -> list[str]:
    """Regexes of the tower's tensors that are not imported: SigLIP's attention-pooling head,
    ``position_ids`` buffers, and ``post_layernorm`` when ``post_norm`` is False (LLaVA reads
    hidden states before it)."""
    quoted = re.escape(prefix)
    ignored = [rf"{quoted}head\..*", rf"{quoted}embeddings\.position_ids"]
    if not post_norm:
        ignored.append(rf"{quoted}post_layernorm\.(weight|bias)")
    return ignored


def find_tower_prefix(directory: SafetensorsDirectory) -> str:
    """The prefix before ``embeddings.patch_embedding.weight``; it must be unique."""
    found = [n[: -len(_PATCH_WEIGHT)] for n in directory.names() if n.endswith(_PATCH_WEIGHT)]
    if len(found) != 1:
        raise ValueError(
            f"{directory.path}: cannot tell the vision tower's tensor prefix: {len(found)} "
            f"tensors end with {_PATCH_WEIGHT!r} ({found[:4]}); pass prefix="
        )
    return found[0]


def load_hf_vision(
    hf_dir: str | os.PathLike,
    *,
    prefix: str | None = None,
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> tuple[ViTConfig, PooledVisionTransformer, dict]:
    """Imports a CLIP or SigLIP vision tower (standalone or the vision half of a full model).

    Args:
      hf_dir: a Hugging Face checkpoint directory (config.json + safetensors).
      prefix: what starts the tower's tensor names; None finds it (the one name ending with
        ``embeddings.patch_embedding.weight``).
      mesh, rules: place each parameter by its logical axes (``rules`` None: replicated);
        without a mesh everything goes to the first device.
      dtype, param_dtype: compute and parameter dtypes of the returned config.

    Returns:
      (config, ``PooledVisionTransformer(config)``, params ``{"vit": ..., "final_norm": ...}``).
      ``module.apply({"params": params}, images, method="encode")`` gives HF's
      ``output_hidden_states`` numbering; ``params["vit"]`` is a ``VisionTransformer``'s.

    Raises:
      ValueError: an unsupported config field, or tensors missing, unexpected or misshapen
        (all named, before any tensor is read).
    """
    hf_config = read_hf_config(hf_dir)
    config = vit_config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    model_type, vision = vision_model_type(hf_config)
    num_channels = int(vision.get("num_channels", _DEFAULTS[model_type]["num_channels"]))
    directory = SafetensorsDirectory(hf_dir)
    prefix = find_tower_prefix(directory) if prefix is None else prefix
    sources = _nest("vit", vision_tower_sources(config, prefix, num_channels))
    sources |= _nest("final_norm", post_norm_sources(prefix))
    family = "clip" if model_type == "clip_vision_model" else "siglip"
    ignored = vision_tower_ignored(prefix) + list(_OUTSIDE_THE_TOWER[family])
    module = PooledVisionTransformer(config)
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, num_channels), dtype)
    targets = param_targets(
        jax.eval_shape(module.init, jax.random.key(0), images)["params"], mesh, rules
    )
    flat = load_params(directory, sources, targets, ignored=ignored)
    return config, module, traverse_util.unflatten_dict(flat, sep="/")
