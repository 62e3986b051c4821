"""LoRA-MoE adapter: a mixture of LoRA experts with a router per frozen projection.

Tolerance: float32 layer vs float64 numpy, rtol 1e-5, atol 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import (
    adapter_param_count,
    count_adapter_params,
    is_adapter_param,
    lora_moe_param_count,
    split_adapter_params,
)
from mllm_jax.sharding import strip_boxes
from tests.layers.projection_cases import KERNELS as ALL_KERNELS
from tests.layers.projection_cases import Projection

RANK, ALPHA, EXPERTS, TOP_K = 3, 6.0, 4, 2
KERNELS = {case: ALL_KERNELS[case] for case in ("dense_2d", "out_3d")}  # a 2-D and a 3-D kernel


ADAPTER = AdapterConfig(
    kind="lora_moe",
    rank=RANK,
    alpha=ALPHA,
    dropout=0.0,
    targets=("wo",),
    num_experts=EXPERTS,
    top_k=TOP_K,
)


def _reference(x, params, num_in):
    """h = W0 x + s Σ_{e in top-k} g_e (x A_e) B_e, per token in float64."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    kernel = f64(params["kernel"])
    out_shape = kernel.shape[num_in:]
    d_in, d_out = int(np.prod(kernel.shape[:num_in])), int(np.prod(out_shape))
    tokens = f64(x).reshape(-1, d_in)
    router = f64(params["lora_moe_router"]).reshape(d_in, EXPERTS)
    down = f64(params["lora_moe_a"]).reshape(EXPERTS, d_in, RANK)
    up = f64(params["lora_moe_b"]).reshape(EXPERTS, RANK, d_out)
    rows = []
    for token in tokens:
        logits = token @ router
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:TOP_K]
        update = sum(probs[e] / probs[chosen].sum() * (token @ down[e] @ up[e]) for e in chosen)
        rows.append(token @ kernel.reshape(d_in, d_out) + ALPHA / RANK * update)
    return np.stack(rows).reshape(x.shape[: x.ndim - num_in] + out_shape)


@pytest.mark.parametrize("case", sorted(KERNELS))
def test_lora_moe_projection_matches_per_token_reference(case):
    _, shape, _, num_in, x_shape = KERNELS[case]
    x = jnp.asarray(np.random.default_rng(0).normal(size=x_shape), jnp.float32)
    module = Projection(case, ADAPTER)
    abstract = strip_boxes(jax.eval_shape(module.init, jax.random.key(0), x)["params"])
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), abstract
    )
    assert set(params["wo"]) == {"kernel", "lora_moe_router", "lora_moe_a", "lora_moe_b"}
    assert params["wo"]["lora_moe_a"].shape == (EXPERTS,) + shape[:num_in] + (RANK,)
    got = jax.jit(module.apply)({"params": params}, x)
    want = _reference(x, params["wo"], num_in)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Dense (all experts, equal weights) would differ: the top-k selection matters.
    dense = dict(params["wo"], lora_moe_router=jnp.zeros_like(params["wo"]["lora_moe_router"]))
    assert np.abs(np.asarray(got) - _reference(x, dense, num_in)).max() > 1e-2


def test_lora_moe_starts_as_the_base_layer_and_its_params_are_adapter_params():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 6)), jnp.float32)
    adapted = Projection("dense_2d", ADAPTER)
    variables = jax.jit(adapted.init)(jax.random.key(0), x)
    params = strip_boxes(variables["params"])
    base, adapters = split_adapter_params(params)
    assert set(adapters["wo"]) == {"lora_moe_router", "lora_moe_a", "lora_moe_b"}
    assert not is_adapter_param("wo/kernel")
    base_out = Projection("dense_2d", AdapterConfig(kind="none")).apply({"params": base}, x)
    np.testing.assert_allclose(adapted.apply({"params": params}, x), base_out, rtol=1e-6)
    assert count_adapter_params(params) == lora_moe_param_count(6, 5, RANK, EXPERTS)
    assert adapter_param_count(6, 5, RANK, "lora_moe") == lora_moe_param_count(6, 5, RANK, 4)


def test_lora_moe_config_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match="top_k"):
        AdapterConfig(kind="lora_moe", num_experts=2, top_k=3)
