"""Hugging Face causal-LM checkpoints (Llama, Mistral, Qwen2, Mixtral) loaded into ``DecoderLM``.

Tensor names (per block ``model.layers.{i}.``; ``[...]`` are the Hugging Face shapes, H query
heads, K key/value heads, D head dim, E hidden size, F MLP width, X experts, V vocabulary):

  model.embed_tokens.weight [V, E]              embedder/embedding [V, E]
  self_attn.q_proj.weight [H·D, E] (.bias)      attention/query/kernel [E, H, D] (bias [H, D])
  self_attn.k_proj / v_proj [K·D, E] (.bias)    attention/key, value/kernel [E, K, D]
  self_attn.o_proj.weight [E, H·D] (.bias)      attention/out/kernel [H, D, E] (bias [E])
  input_layernorm.weight [E]                    pre_attention_norm/scale
  post_attention_layernorm.weight [E]           pre_mlp_norm/scale
  mlp.gate_proj / up_proj.weight [F, E]         mlp/wi_gate, wi_up/kernel [E, F]
  mlp.down_proj.weight [E, F]                   mlp/wo/kernel [F, E]
  Mixtral, legacy layout (what save_pretrained writes):
  block_sparse_moe.gate.weight [X, E]           moe/router [E, X]
  block_sparse_moe.experts.{e}.w1 / w3 [F, E]   moe/wi_gate, wi_up [X, E, F]
  block_sparse_moe.experts.{e}.w2 [E, F]        moe/wo [X, F, E]
  Mixtral, fused transformers-5 layout:
  mlp.gate.weight [X, E]                        moe/router [E, X]
  mlp.experts.gate_up_proj [X, 2F, E]           moe/wi_gate (rows :F), wi_up (rows F:)
  mlp.experts.down_proj [X, E, F]               moe/wo [X, F, E]
  model.norm.weight [E]                         decoder/final_norm/scale
  lm_head.weight [V, E]                         lm_head/kernel [E, V] (untied only)

Blocks go to ``decoder/layers_{i}/...``, or stacked on a leading axis under ``decoder/layers``
when ``scan_layers``. Biases are present for Qwen2 (q, k, v) and Llama with ``attention_bias``
(all four) or ``mlp_bias``. Rotary ``inv_freq`` buffers of old checkpoints are ignored (the
frequencies come from the config), as is a stored ``lm_head.weight`` of a tied model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import Mesh
from jax.typing import DTypeLike

from mllm_jax.checkpoint_conversion.hf_config import HFLanguageModelConfig, lm_config_from_hf
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import (
    Source,
    TensorView,
    load_params,
    stacked,
)
from mllm_jax.checkpoint_conversion.targets import param_targets
from mllm_jax.models.decoder_lm import DecoderLM
from mllm_jax.sharding import (
    LogicalRules,
)

_TRANSPOSE = (1, 0)
IGNORED_TENSORS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\..*")


def _attention_views(cfg: HFLanguageModelConfig, prefix: str) -> dict[str, TensorView]:
    t = cfg.transformer
    heads = {"query": ("q", t.num_heads), "key": ("k", t.num_kv_heads)}
    heads["value"] = ("v", t.num_kv_heads)
    views = {}
    for name, (letter, count) in heads.items():
        tensor = f"{prefix}self_attn.{letter}_proj"
        views[f"attention/{name}/kernel"] = TensorView(
            f"{tensor}.weight", split=((count, t.head_dim), (cfg.embed_dim,)), permute=(2, 0, 1)
        )
        if t.attention_bias != "none":
            views[f"attention/{name}/bias"] = TensorView(
                f"{tensor}.bias", split=((count, t.head_dim),)
            )
    views["attention/out/kernel"] = TensorView(
        f"{prefix}self_attn.o_proj.weight",
        split=((cfg.embed_dim,), (t.num_heads, t.head_dim)),
        permute=(1, 2, 0),
    )
    if t.attention_bias == "all":
        views["attention/out/bias"] = TensorView(f"{prefix}self_attn.o_proj.bias")
    return views


def _mlp_views(cfg: HFLanguageModelConfig, prefix: str) -> dict[str, TensorView]:
    views = {}
    for ours, theirs in (("wi_gate", "gate_proj"), ("wi_up", "up_proj"), ("wo", "down_proj")):
        views[f"mlp/{ours}/kernel"] = TensorView(f"{prefix}mlp.{theirs}.weight", permute=_TRANSPOSE)
        if cfg.transformer.mlp_bias:
            views[f"mlp/{ours}/bias"] = TensorView(f"{prefix}mlp.{theirs}.bias")
    return views


def _moe_views(
    cfg: HFLanguageModelConfig, prefix: str, fused: bool
) -> dict[str, TensorView | Source]:
    if fused:
        width = cfg.transformer.moe.expert_mlp_dim or cfg.transformer.mlp_dim
        experts = f"{prefix}mlp.experts."
        gate_rows = (slice(None), slice(0, width), slice(None))
        up_rows = (slice(None), slice(width, 2 * width), slice(None))
        return {
            "moe/router": TensorView(f"{prefix}mlp.gate.weight", permute=_TRANSPOSE),
            "moe/wi_gate": TensorView(
                f"{experts}gate_up_proj", select=gate_rows, permute=(0, 2, 1)
            ),
            "moe/wi_up": TensorView(f"{experts}gate_up_proj", select=up_rows, permute=(0, 2, 1)),
            "moe/wo": TensorView(f"{experts}down_proj", permute=(0, 2, 1)),
        }
    moe = f"{prefix}block_sparse_moe."
    num_experts = cfg.transformer.moe.num_experts

    def per_expert(weight: str) -> Source:
        return stacked(
            [
                TensorView(f"{moe}experts.{e}.{weight}.weight", permute=_TRANSPOSE)
                for e in range(num_experts)
            ]
        )

    return {
        "moe/router": TensorView(f"{moe}gate.weight", permute=_TRANSPOSE),
        "moe/wi_gate": per_expert("w1"),
        "moe/wi_up": per_expert("w3"),
        "moe/wo": per_expert("w2"),
    }


def _block_views(
    cfg: HFLanguageModelConfig, layer: int, fused_experts: bool
) -> dict[str, TensorView | Source]:
    """Block parameter path (relative to the block) -> its view of the layer's tensors."""
    prefix = f"model.layers.{layer}."
    views: dict[str, TensorView | Source] = {
        "pre_attention_norm/scale": TensorView(f"{prefix}input_layernorm.weight"),
        "pre_mlp_norm/scale": TensorView(f"{prefix}post_attention_layernorm.weight"),
        **_attention_views(cfg, prefix),
    }
    if cfg.transformer.moe is not None:
        views.update(_moe_views(cfg, prefix, fused_experts))
    else:
        views.update(_mlp_views(cfg, prefix))
    return views


def _as_source(part: TensorView | Source) -> Source:
    return part if isinstance(part, Source) else Source((part,))


def hf_lm_sources(
    cfg: HFLanguageModelConfig, *, fused_experts: bool = False
) -> tuple[dict[str, Source], tuple[str, ...]]:
    """("/"-joined DecoderLM parameter path -> Source, ignored tensor regexes) for ``cfg``.

    ``fused_experts`` picks the transformers-5 fused Mixtral expert tensors over the legacy
    per-expert ones.
    """
    sources = {
        "embedder/embedding": _as_source(TensorView("model.embed_tokens.weight")),
        "decoder/final_norm/scale": _as_source(TensorView("model.norm.weight")),
    }
    blocks = [_block_views(cfg, i, fused_experts) for i in range(cfg.transformer.num_layers)]
    if cfg.transformer.scan_layers:
        for path in blocks[0]:
            sources[f"decoder/layers/{path}"] = stacked([block[path] for block in blocks])
    else:
        for i, block in enumerate(blocks):
            for path, part in block.items():
                sources[f"decoder/layers_{i}/{path}"] = _as_source(part)
    ignored = IGNORED_TENSORS
    if cfg.tie_embeddings:
        ignored += (r"lm_head\.weight",)
    else:
        sources["lm_head/kernel"] = _as_source(TensorView("lm_head.weight", permute=_TRANSPOSE))
    return sources, ignored


def lm_param_targets(
    model: DecoderLM, mesh: Mesh | None = None, rules: LogicalRules | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """Parameter path ("/"-joined) -> ShapeDtypeStruct with the sharding the logical ``rules``
    give it on ``mesh`` (``targets.param_targets``). Nothing is allocated."""
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    return param_targets(boxed, mesh, rules)


def load_hf_lm(
    hf_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: LogicalRules | None = None,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
    max_length: int | None = None,
) -> tuple[DecoderLM, dict[str, Any]]:
    """A Hugging Face causal-LM directory (config.json + safetensors) as (DecoderLM, params).

    Args:
      hf_dir: the checkpoint directory.
      mesh, rules: place every parameter on ``mesh`` as the logical-axis ``rules`` shard it,
        each device reading only its slice of the files; without a mesh, on one device.
      dtype: compute dtype; param_dtype: dtype the parameters are cast to.
      scan_layers: stack the blocks for ``nn.scan``.
      max_length: the longest sequence the model will see (see ``lm_config_from_hf``).

    Returns:
      The model and its nested ``params`` dict (``model.apply({"params": params}, tokens)``).

    Raises:
      ValueError: an unsupported config (naming the field), or tensors that do not fit the
        model: missing, unexpected, or of the wrong shape (all listed at once).
    """
    cfg = lm_config_from_hf(
        hf_dir, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, max_length=max_length
    )
    directory = SafetensorsDirectory(hf_dir)
    fused = "model.layers.0.mlp.experts.gate_up_proj" in directory
    sources, ignored = hf_lm_sources(cfg, fused_experts=fused)
    model = cfg.decoder_lm()
    targets = lm_param_targets(model, mesh, rules)
    flat = load_params(directory, sources, targets, ignored=ignored)
    return model, traverse_util.unflatten_dict(flat, sep="/")
