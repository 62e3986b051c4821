"""Adapter params in a param tree: path filter, split, counts, LoRA merge and unmerge.

Trees are nested mappings as returned by ``Module.init`` (``{"params": ...}`` stripped); leaves
may be arrays, ``jax.ShapeDtypeStruct`` or ``nn.Partitioned`` boxes (kept boxed on output).
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from mllm_jax.layers.lora import ADAPTER_KINDS, AdapterConfig

ADAPTER_PARAM_REGEX = r"(^|/)(lora_a|lora_b|dual_lora_[a-z_]+|lora_moe_[a-z_]+)(/|$)"
"""Matches the "/"-joined path of every LoRA / Dual-LoRA / LoRA-MoE param, and no base param."""

_ADAPTER_PARAM = re.compile(ADAPTER_PARAM_REGEX)
_LORA_NAMES = ("lora_a", "lora_b")


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def is_adapter_param(path: str | Iterable[Any]) -> bool:
    """Whether ``path`` names an adapter param.

    ``path``: "decoder/layers_0/attention/query/lora_a", a tuple of names, or a JAX key path
    (from ``jax.tree_util.tree_flatten_with_path``).
    """
    joined = path if isinstance(path, str) else "/".join(_key_name(k) for k in path)
    return _ADAPTER_PARAM.search(joined) is not None


def _flat(params: Mapping) -> dict[str, Any]:
    return traverse_util.flatten_dict(params, sep="/")


def _unbox(leaf: Any) -> Any:
    return leaf.value if isinstance(leaf, nn.meta.AxisMetadata) else leaf


def _rebox(like: Any, value: jax.Array) -> Any:
    return like.replace_boxed(value) if isinstance(like, nn.meta.AxisMetadata) else value


def split_adapter_params(params: Mapping) -> tuple[dict, dict]:
    """Returns ``(base, adapters)``: nested dicts holding the non-adapter and adapter leaves.

    ``base`` has exactly the structure of the same model built with ``kind="none"``. Equivalent
    to ``train.partition.partition_params`` with ``path_matcher([ADAPTER_PARAM_REGEX])``.
    """
    flat = _flat(params)
    adapters = {path: leaf for path, leaf in flat.items() if is_adapter_param(path)}
    base = {path: leaf for path, leaf in flat.items() if path not in adapters}
    return (
        traverse_util.unflatten_dict(base, sep="/"),
        traverse_util.unflatten_dict(adapters, sep="/"),
    )


def count_adapter_params(params: Mapping) -> int:
    """Number of scalars in the adapter params of ``params`` (scanned layers counted L times)."""
    return sum(
        math.prod(_unbox(leaf).shape)
        for path, leaf in _flat(params).items()
        if is_adapter_param(path)
    )


def adapter_param_count(d_in: int, d_out: int, rank: int, kind: str) -> int:
    """Adapter params of one d_in -> d_out projection (SPEC §3).

    LoRA: r (d_in + d_out). Dual-LoRA: r (2 d_in + d_out) + 2r (W_A, W_T, W_B, then γ, β).
    LoRA-MoE (4 experts, the ``AdapterConfig`` default): 4 r (d_in + d_out) + 4 d_in (router);
    use ``lora_moe_param_count`` for another expert count.
    """
    if kind == "none":
        return 0
    if kind == "lora":
        return rank * (d_in + d_out)
    if kind == "dual_lora":
        return rank * (2 * d_in + d_out) + 2 * rank
    if kind == "lora_moe":
        return lora_moe_param_count(d_in, d_out, rank, AdapterConfig().num_experts)
    raise ValueError(f"adapter kind {kind!r} is not one of {ADAPTER_KINDS}")


def lora_moe_param_count(d_in: int, d_out: int, rank: int, num_experts: int) -> int:
    """LoRA-MoE params of one d_in -> d_out projection: E r (d_in + d_out) + d_in E."""
    return num_experts * rank * (d_in + d_out) + d_in * num_experts


def _scaled_update(
    kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float, where: str
) -> jax.Array:
    """s · A B in float32, shaped like ``kernel`` (leading scanned ``layers`` dims allowed)."""
    lead = lora_a.ndim + lora_b.ndim - 2 - kernel.ndim
    num_in = lora_a.ndim - 1 - lead
    expected = lora_a.shape[:-1] + lora_b.shape[lead + 1 :]
    if (
        lead < 0
        or lora_a.shape[:lead] != lora_b.shape[:lead]
        or lora_a.shape[-1] != lora_b.shape[lead]
        or expected != kernel.shape
    ):
        raise ValueError(
            f"{where}: lora_a {lora_a.shape} and lora_b {lora_b.shape} do not factor "
            f"kernel {kernel.shape}"
        )
    letters = iter(string.ascii_letters)
    lead_l, in_l, out_l, rank_l = (
        "".join(next(letters) for _ in range(n))
        for n in (lead, num_in, kernel.ndim - lead - num_in, 1)
    )
    product = jnp.einsum(
        f"{lead_l}{in_l}{rank_l},{lead_l}{rank_l}{out_l}->{lead_l}{in_l}{out_l}",
        lora_a.astype(jnp.float32),
        lora_b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return scale * product


def _check_lora(adapter: AdapterConfig, action: str) -> None:
    if adapter.kind == "dual_lora":
        raise ValueError(
            f"cannot {action} Dual-LoRA: its update s·(ReLU(x W_T) ⊙ LayerNorm(x W_A)) W_B "
            "depends on the input through the ReLU gate and the LayerNorm, so no fixed matrix "
            "equals it; keep the adapter params and run the model with kind='dual_lora'"
        )
    if adapter.kind != "lora":
        raise ValueError(f"{action} needs adapter kind 'lora', got {adapter.kind!r}")


def _apply_update(node: Mapping, lora: Mapping, scale: float, sign: float, where: str) -> Any:
    if "kernel" not in node:
        raise ValueError(f"{where}: LoRA params without a base 'kernel' beside them")
    kernel = _unbox(node["kernel"])
    lora_a, lora_b = (_unbox(lora[name]) for name in _LORA_NAMES)
    update = _scaled_update(kernel, lora_a, lora_b, scale, where)
    merged = (kernel.astype(jnp.float32) + sign * update).astype(kernel.dtype)
    return _rebox(node["kernel"], merged)


def merge_lora(params: Mapping, adapter: AdapterConfig) -> dict:
    """Folds every plain-LoRA update into its kernel: W = W0 + s · A B (s = alpha / rank).

    Returns a tree without ``lora_a`` / ``lora_b``, loadable by the same model built with
    ``kind="none"``; its outputs equal the adapted model's up to float rounding (the update is
    computed in float32 at HIGHEST precision, then cast to the kernel's dtype).

    Raises:
      ValueError: for Dual-LoRA, which is not mergeable: the ReLU gate and the LayerNorm make
        its update depend on the input. Also when ``params`` hold no LoRA params, hold
        Dual-LoRA params, or a ``lora_a``'s rank differs from ``adapter.rank``.
    """
    _check_lora(adapter, "merge")
    found = []

    def merge(tree: Mapping, path: str) -> dict:
        if any(name in tree for name in _LORA_NAMES):
            _check_pair(tree, path, adapter)
            found.append(path)
            out = {k: v for k, v in tree.items() if k not in _LORA_NAMES}
            out["kernel"] = _apply_update(tree, tree, adapter.scale, 1.0, path)
            return out
        return {
            k: merge(v, f"{path}/{k}") if isinstance(v, Mapping) else v for k, v in tree.items()
        }

    merged = merge(params, "")
    leftover = [path for path in _flat(merged) if is_adapter_param(path)]
    if leftover:
        raise ValueError(f"merge_lora: params hold non-LoRA adapter params, e.g. {leftover[0]}")
    if not found:
        raise ValueError("merge_lora found no 'lora_a'/'lora_b' params to merge")
    return merged


def unmerge_lora(merged_params: Mapping, lora_params: Mapping, adapter: AdapterConfig) -> dict:
    """Inverse of ``merge_lora``: W0 = W - s · A B, and the LoRA params put back beside W0.

    ``lora_params`` holds the LoRA params at their paths (the ``adapters`` half of
    ``split_adapter_params``). W0 comes back up to float rounding, not bit-exact: each element
    is off by about one ulp of |W0| + |s·A B| (≈1e-7 relative in float32; in bfloat16 ≈1e-2, so
    keep a float32 copy of W0 rather than unmerging bfloat16 weights).
    """
    _check_lora(adapter, "unmerge")

    def unmerge(merged: Mapping, lora: Mapping, path: str) -> dict:
        out = dict(merged)
        for key, value in lora.items():
            if key in _LORA_NAMES:
                continue
            if not isinstance(value, Mapping) or key not in merged:
                raise ValueError(f"{path}/{key} of the LoRA params is not in the merged params")
            out[key] = unmerge(merged[key], value, f"{path}/{key}")
        if any(name in lora for name in _LORA_NAMES):
            _check_pair(lora, path, adapter)
            out["kernel"] = _apply_update(merged, lora, adapter.scale, -1.0, path)
            out.update({name: lora[name] for name in _LORA_NAMES})
        return out

    return unmerge(merged_params, lora_params, "")


def _check_pair(node: Mapping, path: str, adapter: AdapterConfig) -> None:
    missing = [name for name in _LORA_NAMES if name not in node]
    if missing:
        raise ValueError(f"{path}: LoRA params lack {missing}")
    rank = _unbox(node["lora_a"]).shape[-1]
    if rank != adapter.rank:
        raise ValueError(
            f"{path}: lora_a has rank {rank}, but the adapter config says {adapter.rank}"
        )
