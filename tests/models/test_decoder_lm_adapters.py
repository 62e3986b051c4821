"""Adapters inside DecoderLM: base-equal at init, param paths and counts, merge, scan, remat.

Tolerances: comparisons of mathematically equal float32 computations (merged vs adapted, scanned
vs unrolled) rtol=1e-5, atol=1e-5; identities that must hold bit for bit use assert_array_equal.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import TransformerConfig
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import (
    ADAPTER_PARAM_REGEX,
    adapter_param_count,
    count_adapter_params,
    is_adapter_param,
    merge_lora,
    split_adapter_params,
    unmerge_lora,
)
from mllm_jax.models import DecoderLM
from mllm_jax.sharding import strip_boxes
from mllm_jax.train.partition import partition_params, path_matcher

RTOL, ATOL = 1e-5, 1e-6
MODEL_RTOL, MODEL_ATOL = 1e-5, 1e-5
RANK, ALPHA = 3, 5.0
KINDS = ("lora", "dual_lora")

B, N, V, E = 2, 8, 24, 16
BASE = TransformerConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32)
TOKENS = np.random.default_rng(0).integers(0, V, size=(B, N)).astype(np.int32)
QV = ("query", "value")
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
MANY = ("query", "value", "out", "wi_gate", "wo")  # 3-D kernels both ways and 2-D kernels


def _lm(kind="none", scan=False, targets=QV, **adapter_kwargs):
    adapter = AdapterConfig(kind=kind, rank=RANK, alpha=ALPHA, targets=targets, **adapter_kwargs)
    config = dataclasses.replace(BASE, scan_layers=scan, adapter=adapter)
    return DecoderLM(vocab_size=V, embed_dim=E, transformer=config)


@functools.cache
def _init(kind="none", targets=QV):
    """Unrolled params. Eager init with "rbg" keys: compiling a whole init is slower on CPU."""
    model = _lm(kind, targets=targets)
    return strip_boxes(model.init(jax.random.key(0, impl="rbg"), TOKENS)["params"])


def _apply(model, params, rngs=None):
    return np.asarray(model.apply({"params": params}, TOKENS, rngs=rngs))


def _paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(k.key for k in path) for path, _ in flat]


def _randomize_adapters(params, seed):
    """Replaces every adapter param by noise (scale 0.3), leaving base params untouched."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: (
            jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype) if is_adapter_param(path) else a
        ),
        params,
    )


def _stack_layers(params):
    """Unrolled -> scanned layout (the inverse of ``unstack_scanned_layers``)."""
    decoder = dict(params["decoder"])
    layers = [decoder.pop(f"layers_{i}") for i in range(BASE.num_layers)]
    decoder["layers"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *layers)
    return {**params, "decoder": decoder}


def _assert_trees_close(got, want, **tolerances):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, **tolerances)


@pytest.mark.parametrize("kind", KINDS)
def test_adapted_model_is_bit_equal_to_base_at_init_and_keeps_base_paths(kind):
    params = _init(kind)
    base, adapters = split_adapter_params(params)
    plain = _init()
    assert jax.tree_util.tree_structure(base) == jax.tree_util.tree_structure(plain)
    assert not any(is_adapter_param(p) for p in _paths(plain))
    names = ["lora_a", "lora_b"] if kind == "lora" else [
        "dual_lora_norm/bias", "dual_lora_norm/scale", "dual_lora_skill", "dual_lora_task",
        "dual_lora_up",
    ]  # fmt: skip
    want = [
        f"decoder/layers_{i}/attention/{proj}/{name}"
        for i in range(BASE.num_layers)
        for proj in QV
        for name in names
    ]
    assert sorted(_paths(adapters)) == sorted(want)
    # The regex selects the same params through the trainable-params filter.
    trainable, frozen = partition_params(params, path_matcher([ADAPTER_PARAM_REGEX]))
    assert sorted(_paths(trainable)) == sorted(want) and _paths(frozen) == _paths(base)
    # W_B = 0: exactly the base model, even with dropout on.
    adapted = _apply(_lm(kind), params, {"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(adapted, _apply(_lm(), base))
    moved = _apply(_lm(kind), _randomize_adapters(params, 1))
    assert np.abs(moved - adapted).max() > 1e-3


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_param_count_of_a_real_tree_equals_the_formula(kind, scan):
    shapes = jax.eval_shape(_lm(kind, scan, MANY).init, jax.random.key(0), TOKENS)["params"]
    heads, kv, dim, mlp = BASE.num_heads, BASE.num_kv_heads, BASE.head_dim, BASE.mlp_dim
    in_out = [(E, heads * dim), (E, kv * dim), (heads * dim, E), (E, mlp), (mlp, E)]
    per_layer = sum(adapter_param_count(i, o, RANK, kind) for i, o in in_out)
    assert count_adapter_params(shapes) == BASE.num_layers * per_layer
    assert count_adapter_params(_init()) == 0


def test_param_count_formula_for_a_4096_layer():
    assert adapter_param_count(4096, 4096, 32, "dual_lora") == 32 * (2 * 4096 + 4096) + 2 * 32
    assert adapter_param_count(4096, 4096, 32, "dual_lora") == 393_280
    assert adapter_param_count(4096, 4096, 32, "lora") == 262_144
    assert adapter_param_count(4096, 4096, 32, "none") == 0


# --------------------------------------------------------------------------------------------
# Merge / unmerge
# --------------------------------------------------------------------------------------------


def test_merged_lora_model_equals_adapted_model_and_unmerge_restores_params():
    model = _lm("lora", targets=MANY)
    adapter = model.transformer.adapter
    params = _randomize_adapters(_init("lora", MANY), 2)
    merged = merge_lora(params, adapter)
    base, adapters = split_adapter_params(params)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    adapted_out = _apply(model, params)
    np.testing.assert_allclose(_apply(_lm(), merged), adapted_out, rtol=MODEL_RTOL, atol=MODEL_ATOL)
    assert np.abs(_apply(_lm(), base) - adapted_out).max() > 1e-2
    # W0 + s·AB - s·AB is W0 up to float32 rounding (|W0|, |s·AB| < 4 here).
    _assert_trees_close(unmerge_lora(merged, adapters, adapter), params, rtol=0, atol=2e-6)
    # A scanned tree (leading layers axis) merges layer by layer.
    _assert_trees_close(
        merge_lora(_stack_layers(params), adapter), _stack_layers(merged), rtol=0, atol=0
    )


def test_merge_computes_w0_plus_scaled_ab_per_kernel():
    params = _randomize_adapters(_init("lora", MANY), 3)
    merged = merge_lora(params, _lm("lora").transformer.adapter)
    for module, proj, equation in [
        ("attention", "value", "er,rkd->ekd"),
        ("attention", "out", "hdr,re->hde"),
        ("mlp", "wo", "fr,re->fe"),
    ]:
        node = params["decoder"]["layers_1"][module][proj]
        a, b = (np.asarray(node[n], np.float64) for n in ("lora_a", "lora_b"))
        want = np.asarray(node["kernel"], np.float64) + ALPHA / RANK * np.einsum(equation, a, b)
        got = merged["decoder"]["layers_1"][module][proj]["kernel"]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_merge_refuses_dual_lora_and_mismatched_configs():
    dual = _init("dual_lora")
    with pytest.raises(ValueError, match="Dual-LoRA.*depends on the input"):
        merge_lora(dual, _lm("dual_lora").transformer.adapter)
    with pytest.raises(ValueError, match="non-LoRA adapter params"):
        merge_lora(dual, AdapterConfig(kind="lora", rank=RANK))
    with pytest.raises(ValueError, match="rank 3, but the adapter config says 32"):
        merge_lora(_init("lora"), AdapterConfig(kind="lora"))
    with pytest.raises(ValueError, match="found no"):
        merge_lora(_init(), AdapterConfig(kind="lora", rank=RANK))


# --------------------------------------------------------------------------------------------
# nn.scan and nn.remat
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_scanned_adapters_init_and_equal_unrolled_with_the_same_weights(kind):
    scanned_model = _lm(kind, scan=True)
    unrolled = _randomize_adapters(_init(kind), 4)
    scanned = _stack_layers(unrolled)
    # The scanned model's own init has exactly this layout and these shapes.
    shapes = jax.eval_shape(scanned_model.init, jax.random.key(0), TOKENS)["params"]
    _assert_trees_close(
        jax.tree_util.tree_map(np.shape, strip_boxes(shapes)),
        jax.tree_util.tree_map(np.shape, scanned),
        rtol=0,
        atol=0,
    )
    np.testing.assert_allclose(
        _apply(scanned_model, scanned),
        _apply(_lm(kind), unrolled),
        rtol=MODEL_RTOL,
        atol=MODEL_ATOL,
    )


def test_scan_with_remat_draws_the_same_dropout_in_the_backward_pass():
    model = _lm("dual_lora", scan=True, dropout=0.3)
    remat = model.clone(transformer=dataclasses.replace(model.transformer, remat_policy="full"))
    params = _stack_layers(_randomize_adapters(_init("dual_lora"), 5))
    rngs = {"dropout": jax.random.key(6)}

    def loss_and_grads(module):
        loss = lambda p: jnp.mean(module.apply({"params": p}, TOKENS, rngs=rngs) ** 2)
        lowered = jax.jit(jax.value_and_grad(loss)).lower(params)
        # Unoptimised CPU code compiles ~3x faster; this test compares values, not speed.
        return lowered.compile(compiler_options=FAST_COMPILE)(params)

    plain_loss, plain_grads = loss_and_grads(model)
    remat_loss, remat_grads = loss_and_grads(remat)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    _assert_trees_close(remat_grads, plain_grads, rtol=1e-5, atol=1e-6)
    no_dropout = np.mean(_apply(model, params) ** 2)
    assert abs(no_dropout - float(plain_loss)) > 1e-4
