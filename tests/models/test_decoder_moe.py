"""MoE feed-forwards inside the decoder: every-N placement, nn.scan, remat, config, train step."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mllm_jax.layers import (
    DecoderStack,
    MoEConfig,
    TransformerConfig,
    causal_mask_ar,
    make_attention_mask,
    unstack_scanned_layers,
)
from mllm_jax.layers.moe import MOE_COLLECTION, summarize_moe
from mllm_jax.models import DecoderLM, transformer_config_from
from mllm_jax.sharding import strip_boxes
from mllm_jax.train.step import lm_loss, lm_objective

B, N, E = 2, 8, 8
BASE = TransformerConfig(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=16)
# every=1: 2 blocks, both MoE, dropless; every=2: 4 blocks, MoE at 0 and 2 (2 scanned groups),
# capacity mode (some tokens drop).
NUM_LAYERS = {1: 2, 2: 4}
MOE = {
    1: MoEConfig(num_experts=4, top_k=2, every=1, router_init_std=0.5, shared_expert_mlp_dim=8),
    2: MoEConfig(num_experts=4, top_k=2, every=2, mode="capacity", capacity_factor=1.0),
}


def _random_params(init_fn, *args, seed=0, scale=0.4):
    """Params shaped like ``init_fn(*args)["params"]`` drawn by numpy (no init compile)."""
    abstract = strip_boxes(jax.eval_shape(init_fn, *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), abstract
    )


@pytest.fixture(scope="module")
def inputs():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, N, E)), jnp.float32)
    mask = make_attention_mask(causal_mask_ar(B, N))
    positions = jnp.broadcast_to(jnp.arange(N), (B, N))
    return x, mask, positions


def _config(every, scan, remat="none"):
    return dataclasses.replace(
        BASE, num_layers=NUM_LAYERS[every], moe=MOE[every], scan_layers=scan, remat_policy=remat
    )


@pytest.fixture(scope="module")
def scanned_params(inputs):
    return {
        every: _random_params(DecoderStack(_config(every, True)).init, jax.random.key(0), *inputs)
        for every in MOE
    }


@pytest.fixture(scope="module")
def run(scanned_params, inputs):
    """(every, scan, remat) -> ((loss, (aux loss, dropped fraction)), grads), compiled once."""
    results = {}

    def get(every, scan, remat="none"):
        if (every, scan, remat) not in results:
            params = scanned_params[every]
            if not scan:
                params = unstack_scanned_layers(params, NUM_LAYERS[every])
            results[every, scan, remat] = _run(_config(every, scan, remat), params, inputs)
        return results[every, scan, remat]

    return get


def _run(config, params, inputs):
    """Jitted (loss incl. the MoE aux loss, aux loss), gradients."""

    def loss(p):
        out, state = DecoderStack(config).apply({"params": p}, *inputs, mutable=[MOE_COLLECTION])
        aux_loss, metrics = summarize_moe(state[MOE_COLLECTION])
        return jnp.mean(out**2) + aux_loss, (aux_loss, metrics["moe/dropped_fraction"])

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def _assert_trees_close(a, b, atol):
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
        np.testing.assert_allclose(leaf, flat_b[path], atol=atol, rtol=1e-5, err_msg=str(path))
    assert len(flat_b) == len(jax.tree_util.tree_leaves(a))


@pytest.mark.parametrize("every", [1, 2])
def test_moe_blocks_sit_every_nth_layer_and_scan_equals_unrolled(
    scanned_params, inputs, run, every
):
    num_layers = NUM_LAYERS[every]
    unrolled = unstack_scanned_layers(scanned_params[every], num_layers)
    for i in range(num_layers):
        assert ("moe" in unrolled[f"layers_{i}"]) == (i % every == 0), i
        assert ("mlp" in unrolled[f"layers_{i}"]) == (i % every != 0), i
    expected = jax.eval_shape(DecoderStack(_config(every, False)).init, jax.random.key(1), *inputs)
    assert jax.tree_util.tree_structure(
        strip_boxes(expected["params"])
    ) == jax.tree_util.tree_structure(unrolled)
    (loss_s, (aux_s, dropped_s)), grads_s = run(every, True)
    (loss_u, (aux_u, dropped_u)), grads_u = run(every, False)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-5)
    np.testing.assert_allclose(aux_s, aux_u, rtol=1e-5)
    assert float(aux_s) > 0.01 * 2 * num_layers / every  # >= k per MoE layer, weighted
    assert float(dropped_s) == float(dropped_u)
    if every == 2:
        assert float(dropped_s) > 0
    _assert_trees_close(unstack_scanned_layers(grads_s, num_layers), grads_u, atol=1e-6)


@pytest.mark.parametrize("every, scan, policy", [(2, True, "full"), (1, False, "dots")])
def test_remat_keeps_moe_outputs_gradients_and_aux_losses(run, every, scan, policy):
    (loss0, aux0), grads0 = run(every, scan)
    (loss1, aux1), grads1 = run(every, scan, policy)
    np.testing.assert_allclose(loss0, loss1, rtol=1e-6)
    np.testing.assert_allclose(aux0, aux1, rtol=1e-6)
    _assert_trees_close(grads0, grads1, atol=1e-7)


def test_scanned_moe_needs_every_to_divide_the_layers():
    with pytest.raises(ValueError, match="moe.every"):
        dataclasses.replace(BASE, scan_layers=True, moe=MoEConfig(num_experts=4, every=3))
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)


def _model_config(**moe):
    return ml_collections.ConfigDict(
        dict(
            vocab_size=32, embed_dim=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
            mlp_dim=16, mlp_activation="swiglu", norm="rmsnorm", norm_epsilon=1e-6,
            rope_max_wavelength=10_000.0, scan_layers=False, remat_policy="none",
            dtype="float32", param_dtype="float32", moe=moe,
        )
    )  # fmt: skip


def test_config_section_builds_moe_or_stays_dense():
    moe = transformer_config_from(_model_config(num_experts=4, top_k=1, every=2)).moe
    assert moe == MoEConfig(num_experts=4, top_k=1, every=2)
    assert transformer_config_from(_model_config(num_experts=0)).moe is None
    with pytest.raises(ValueError, match="model.moe has unknown keys"):
        transformer_config_from(_model_config(num_experts=4, experts_per_token=2))


def test_experiment_configs_turn_moe_on_only_when_asked():
    from configs import llava_vce, moe_lm

    assert transformer_config_from(llava_vce.get_config().model).moe is None
    moe = transformer_config_from(llava_vce.get_config("moe_experts=4").model).moe
    assert (moe.num_experts, moe.top_k, moe.every) == (4, 2, 2)
    config = moe_lm.get_config("mode=capacity,ep=2")
    moe = transformer_config_from(config.model).moe
    assert moe.mode == "capacity" and moe.expert_mlp_dim * moe.top_k == config.model.mlp_dim
    assert config.mesh.ici_parallelism["expert"] == 2


def test_lm_objective_adds_the_weighted_aux_loss_and_reports_moe_metrics():
    model = DecoderLM(
        vocab_size=32,
        embed_dim=8,
        transformer=transformer_config_from(_model_config(num_experts=4, top_k=2)),
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 6)), jnp.int32)
    batch = {
        "tokens": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "segment_ids": jnp.ones_like(tokens),
        "positions": jnp.broadcast_to(jnp.arange(6), tokens.shape),
        "loss_mask": jnp.ones(tokens.shape, jnp.float32),
    }
    params = _random_params(model.init, jax.random.key(0), tokens)
    both = jax.jit(lambda p: (lm_objective(model, p, batch), lm_loss(model, p, batch)[0]))
    (objective, count, metrics), cross_entropy = both(params)
    assert float(count) == 12
    np.testing.assert_allclose(objective, cross_entropy + metrics["moe/aux_loss"], rtol=1e-6)
    # Two MoE layers, each >= 0.01 * k (load balance) + 1e-3 * z-loss.
    assert float(metrics["moe/aux_loss"]) > 2 * 0.01 * 2
    loads = [float(metrics[f"moe/expert_load/{e}"]) for e in range(4)]
    assert sum(loads) == pytest.approx(1.0, rel=1e-6)
    assert float(metrics["moe/dropped_fraction"]) == 0.0
