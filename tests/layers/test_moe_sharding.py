"""Expert parallelism: the MoE layer sharded over the ``expert`` mesh axis equals one device.

Meshes use all 8 fake CPU devices: expert = 2, 4 or 8 and data = 8 / expert, with the project's
logical-axis rules (``configs/base.py``). Tolerance: atol 1e-5 in float32.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from configs.base import LOGICAL_AXIS_RULES
from mllm_jax import sharding
from mllm_jax.layers.moe import MOE_COLLECTION, MoEConfig, MoEFeedForward, summarize_moe

B, N, D, F, E = 8, 4, 8, 6, 8
RULES = sharding.logical_rules_from_config(LOGICAL_AXIS_RULES)
ATOL = 1e-5


def _layer(mode):
    config = MoEConfig(num_experts=E, top_k=2, mode=mode, capacity_factor=1.0, router_init_std=0.5)
    return MoEFeedForward(config=config, hidden_dim=F)


def _loss_fn(layer):
    def loss(params, x):
        out, state = layer.apply({"params": params}, x, mutable=[MOE_COLLECTION])
        aux_loss, metrics = summarize_moe(state[MOE_COLLECTION])
        return jnp.mean(out**2) + aux_loss, (out, metrics["moe/dropped_fraction"])

    return jax.value_and_grad(loss, has_aux=True)


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(B, N, D)), jnp.float32)


@pytest.fixture(scope="module")
def boxed_params(x):
    """Abstract params (logical boxes) for the shardings."""
    return jax.eval_shape(_layer("dropless").init, jax.random.key(0), x)["params"]


@pytest.fixture(scope="module")
def params(boxed_params):
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.4 * rng.normal(size=s.shape), s.dtype),
        sharding.strip_boxes(boxed_params),
    )


@pytest.fixture(scope="module")
def unsharded(params, x):
    return {mode: jax.jit(_loss_fn(_layer(mode)))(params, x) for mode in ("dropless", "capacity")}


@pytest.mark.parametrize("mode", ["dropless", "capacity"])
@pytest.mark.parametrize("experts_axis", [2, 4, 8])
def test_expert_sharded_layer_equals_unsharded(
    devices, boxed_params, params, x, unsharded, mode, experts_axis
):
    mesh = sharding.create_mesh({"data": -1, "expert": experts_axis})
    shardings = sharding.logical_to_mesh_sharding(boxed_params, mesh, RULES)
    for name in ("wi_gate", "wi_up", "wo"):
        assert shardings[name].spec[0] == "expert", (name, shardings[name].spec)
    sharded_params = jax.device_put(params, shardings)
    x_sharded = jax.device_put(
        x, NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    )
    with sharding.mesh_context(mesh, RULES):
        (loss, (out, dropped)), grads = jax.jit(_loss_fn(_layer(mode)))(sharded_params, x_sharded)
    (want_loss, (want_out, want_dropped)), want_grads = unsharded[mode]
    assert grads["wo"].sharding.spec[0] == "expert"
    np.testing.assert_allclose(out, want_out, atol=ATOL, rtol=0)
    np.testing.assert_allclose(loss, want_loss, atol=ATOL, rtol=1e-6)
    assert float(dropped) == float(want_dropped)
    if mode == "capacity":
        assert float(dropped) > 0  # capacity_factor 1 with k = 2: some tokens do drop
    for path, want in jax.tree_util.tree_flatten_with_path(want_grads)[0]:
        have = dict(jax.tree_util.tree_flatten_with_path(grads)[0])[path]
        np.testing.assert_allclose(have, want, atol=ATOL, rtol=0, err_msg=str(path))


def test_capacity_mode_moves_tokens_to_experts_with_all_to_all(devices, boxed_params, params, x):
    """The [B, E, C, D] buffer constraint turns dispatch and combine into all-to-alls."""
    mesh = sharding.create_mesh({"data": -1, "expert": 4})
    sharded_params = jax.device_put(
        params, sharding.logical_to_mesh_sharding(boxed_params, mesh, RULES)
    )
    x_sharded = jax.device_put(
        x, NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert")))
    )
    with sharding.mesh_context(mesh, RULES):
        hlo = jax.jit(_loss_fn(_layer("capacity"))).lower(sharded_params, x_sharded)
        hlo = hlo.compile().as_text()
    # Forward dispatch and combine, and their transposes in the backward pass.
    assert len(re.findall(r"\ball-to-all(?:-start)?\(", hlo)) >= 4
