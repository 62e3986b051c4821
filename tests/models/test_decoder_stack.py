"""nn.scan and nn.remat change how the decoder runs, never what it computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import (
    DecoderStack,
    TransformerConfig,
    causal_mask_ar,
    make_attention_mask,
    unstack_scanned_layers,
)
from mllm_jax.sharding import strip_boxes

CONFIG = TransformerConfig(
    num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=48, scan_layers=True
)
B, N, E = 2, 10, 16


@pytest.fixture(scope="module")
def inputs():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, N, E)), jnp.float32)
    mask = make_attention_mask(causal_mask_ar(B, N))
    positions = jnp.broadcast_to(jnp.arange(N), (B, N))
    return x, mask, positions


@pytest.fixture(scope="module")
def scanned_params(inputs):
    return strip_boxes(DecoderStack(CONFIG).init(jax.random.key(0), *inputs)["params"])


def _loss(config, params, inputs):
    out = DecoderStack(config).apply({"params": params}, *inputs)
    return jnp.mean(out**2), out


def _loss_and_grads(config, params, inputs):
    """Jitted (compiled once per config) loss, output and gradient w.r.t. params."""
    fn = jax.jit(jax.value_and_grad(lambda p, i: _loss(config, p, i), has_aux=True))
    return fn(params, inputs)


def test_scanned_params_have_a_leading_layers_axis(scanned_params):
    kernel = scanned_params["layers"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.shape == (CONFIG.num_layers, E, CONFIG.mlp_dim)


def test_scan_equals_unrolled_loop_with_the_same_weights(scanned_params, inputs):
    unrolled_config = dataclasses.replace(CONFIG, scan_layers=False)
    unrolled_params = unstack_scanned_layers(scanned_params, CONFIG.num_layers)
    # The unrolled module's own init produces exactly this structure.
    expected = DecoderStack(unrolled_config).init(jax.random.key(1), *inputs)["params"]
    assert jax.tree_util.tree_structure(strip_boxes(expected)) == jax.tree_util.tree_structure(
        unrolled_params
    )
    (_, out_s), grads_s = _loss_and_grads(CONFIG, scanned_params, inputs)
    (_, out_u), grads_u = _loss_and_grads(unrolled_config, unrolled_params, inputs)
    np.testing.assert_allclose(out_s, out_u, rtol=1e-5, atol=1e-6)
    grads_s = unstack_scanned_layers(grads_s, CONFIG.num_layers)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads_s), jax.tree_util.tree_leaves(grads_u), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_layers_really_differ_so_the_scan_test_can_fail(scanned_params, inputs):
    # Feeding every layer the first layer's weights must change the output.
    same = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a[:1], a.shape), scanned_params["layers"]
    )
    forward = jax.jit(lambda p: _loss(CONFIG, p, inputs)[1])
    out, out_same = forward(scanned_params), forward({**scanned_params, "layers": same})
    assert np.abs(np.asarray(out) - np.asarray(out_same)).max() > 1e-3


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_keeps_outputs_and_gradients(scanned_params, inputs, scan, policy):
    params = scanned_params if scan else unstack_scanned_layers(scanned_params, CONFIG.num_layers)
    plain = dataclasses.replace(CONFIG, scan_layers=scan)
    remat = dataclasses.replace(plain, remat_policy=policy)
    (l0, _), g0 = _loss_and_grads(plain, params, inputs)
    (l1, _), g1 = _loss_and_grads(remat, params, inputs)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_config_rejects_unknown_remat_policy_and_bad_head_grouping():
    with pytest.raises(ValueError, match="remat_policy"):
        dataclasses.replace(CONFIG, remat_policy="sometimes")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(CONFIG, num_heads=6, num_kv_heads=4)
