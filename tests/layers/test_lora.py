"""LoRA and Dual-LoRA projections (SPEC §3): numerics vs numpy, init, equations, dropout, config.

Tolerance: float32 layer output vs float64 numpy reference, rtol=1e-5, atol=1e-6.
Whole-model wiring, merge and scan: tests/models/test_decoder_lm_adapters.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mllm_jax.layers import TransformerConfig
from mllm_jax.layers.lora import AdapterConfig, low_rank_einsum
from mllm_jax.models import transformer_config_from
from tests.layers.projection_cases import KERNELS, Projection

RTOL, ATOL = 1e-5, 1e-6
LN_EPS = 1e-5  # LayerNorm_r epsilon (PyTorch's default, as in the released Dual-LoRA code)
RANK, ALPHA = 3, 5.0
KINDS = ("lora", "dual_lora")

# --------------------------------------------------------------------------------------------
# One projection against a numpy implementation of SPEC §3
# --------------------------------------------------------------------------------------------


def _adapter(kind, dropout=0.0):
    return AdapterConfig(kind=kind, rank=RANK, alpha=ALPHA, dropout=dropout, targets=("wo",))


def _random_params(case, kind, rng):
    """All params drawn at random, so W_B != 0, γ != 1, β != 0."""
    _, shape, _, num_in, _ = KERNELS[case]
    in_shape, out_shape = shape[:num_in], shape[num_in:]
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    params = {"kernel": normal(*shape)}
    if kind == "lora":
        params |= {"lora_a": normal(*in_shape, RANK), "lora_b": normal(RANK, *out_shape)}
    else:
        params |= {
            "dual_lora_skill": normal(*in_shape, RANK),
            "dual_lora_task": normal(*in_shape, RANK),
            "dual_lora_up": normal(RANK, *out_shape),
            "dual_lora_norm": {"scale": normal(RANK) + 1.0, "bias": normal(RANK)},
        }
    return params


def ref_projection(x, params, kind, num_in, skill_x=None):
    """SPEC §3 in float64 numpy on the flattened d_in -> d_out matrices.

    ``skill_x``: the dropped-out input that feeds A (LoRA) / W_A (Dual-LoRA); default x.
    """
    f64 = lambda a: np.asarray(a, np.float64)
    kernel = f64(params["kernel"])
    out_shape = kernel.shape[num_in:]
    d_in, d_out = int(np.prod(kernel.shape[:num_in])), int(np.prod(out_shape))
    x2 = f64(x).reshape(-1, d_in)
    s2 = x2 if skill_x is None else f64(skill_x).reshape(-1, d_in)
    down = lambda name: f64(params[name]).reshape(d_in, RANK)
    up = lambda name: f64(params[name]).reshape(RANK, d_out)
    out = x2 @ kernel.reshape(d_in, d_out)
    if kind == "lora":
        update = (s2 @ down("lora_a")) @ up("lora_b")
    else:
        task = np.maximum(x2 @ down("dual_lora_task"), 0.0)
        z = s2 @ down("dual_lora_skill")
        centred = z - z.mean(-1, keepdims=True)
        var = (centred**2).mean(-1, keepdims=True)
        norm = params["dual_lora_norm"]
        skill = centred / np.sqrt(var + LN_EPS) * f64(norm["scale"]) + f64(norm["bias"])
        update = (task * skill) @ up("dual_lora_up")
    out = out + (ALPHA / RANK) * update
    return out.reshape(x.shape[: x.ndim - num_in] + out_shape)


def _input(case, seed=0):
    return np.random.default_rng(seed).normal(size=KERNELS[case][4]).astype(np.float32)


@pytest.mark.parametrize("case", sorted(KERNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_projection_matches_numpy_spec_with_nonzero_up_weights(case, kind):
    x = _input(case)
    params = _random_params(case, kind, np.random.default_rng(1))
    got = Projection(case, _adapter(kind)).apply({"params": {"wo": params}}, jnp.asarray(x))
    want = ref_projection(x, params, kind, KERNELS[case][3])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # The adapter term is far above the tolerance, so dropping it would fail the check.
    base_only = ref_projection(x, params | _zero_update(params, kind), kind, KERNELS[case][3])
    assert np.abs(base_only - want).max() > 1e-2


def _zero_update(params, kind):
    name = "lora_b" if kind == "lora" else "dual_lora_up"
    return {name: jnp.zeros_like(params[name])}


@pytest.mark.parametrize("case", sorted(KERNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_init_shapes_axes_and_values(case, kind):
    _, shape, axes, num_in, x_shape = KERNELS[case]
    boxed = Projection(case, _adapter(kind)).init(jax.random.key(0), jnp.ones(x_shape))
    params = boxed["params"]["wo"]
    in_shape, out_shape = shape[:num_in], shape[num_in:]
    down, up = ("lora_a", "lora_b") if kind == "lora" else ("dual_lora_skill", "dual_lora_up")
    assert params["kernel"].value.shape == shape and params["kernel"].names == axes
    assert params[down].value.shape == in_shape + (RANK,)
    assert params[down].names == axes[:num_in] + ("lora_rank",)
    assert params[up].value.shape == (RANK,) + out_shape
    assert params[up].names == ("lora_rank",) + axes[num_in:]
    np.testing.assert_array_equal(params[up].value, 0.0)
    bound = 1.0 / np.sqrt(np.prod(in_shape))  # kaiming-uniform U(±1/sqrt(d_in))
    downs = [down] if kind == "lora" else [down, "dual_lora_task"]
    for name in downs:
        values = np.asarray(params[name].value)
        assert np.abs(values).max() <= bound and np.abs(values).max() > 0.7 * bound
    if kind == "dual_lora":
        assert not np.array_equal(params["dual_lora_skill"].value, params["dual_lora_task"].value)
        np.testing.assert_array_equal(params["dual_lora_norm"]["scale"].value, 1.0)
        np.testing.assert_array_equal(params["dual_lora_norm"]["bias"].value, 0.0)


def test_low_rank_equations_are_derived_from_the_base_equation():
    split = low_rank_einsum("bne,ehd->bnhd", 3)
    assert (split.down, split.up, split.num_in) == ("bne,er->bnr", "bnr,rhd->bnhd", 1)
    split = low_rank_einsum("bnhd,hde->bne", 3)
    assert (split.down, split.up, split.num_in) == ("bnhd,hdr->bnr", "bnr,re->bne", 2)
    # "r" is taken, so another unused letter names the rank; ellipses pass through.
    split = low_rank_einsum("...r,rf->...f", 2)
    assert (split.down, split.up) == ("...r,ra->...a", "...a,af->...f")
    with pytest.raises(ValueError, match="contracted dims first"):
        low_rank_einsum("bnf,ef->bne", 2)
    with pytest.raises(ValueError, match="batched kernel dims"):
        low_rank_einsum("ebd,edf->ebf", 3)
    with pytest.raises(ValueError, match="distinct letter"):
        low_rank_einsum("bne,ehd->bnhd", 2)


# --------------------------------------------------------------------------------------------
# Dropout: only with a "dropout" RNG, only on the skill branch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_needs_an_rng_and_hits_only_the_skill_branch(kind):
    case = "query_3d"
    x = _input(case)
    params = _random_params(case, kind, np.random.default_rng(2))
    module = Projection(case, _adapter(kind, dropout=0.5))
    variables = {"params": {"wo": params}}
    clean = ref_projection(x, params, kind, 1)
    # Without an RNG: deterministic and dropout-free.
    for _ in range(2):
        np.testing.assert_allclose(module.apply(variables, x), clean, rtol=RTOL, atol=ATOL)
    out, state = module.apply(
        variables, x, rngs={"dropout": jax.random.key(3)}, capture_intermediates=True
    )
    dropped = np.asarray(state["intermediates"]["wo"]["Dropout_0"]["__call__"][0])
    kept = dropped != 0
    assert 0.3 < kept.mean() < 0.7
    np.testing.assert_allclose(dropped[kept], 2.0 * x[kept], rtol=1e-6)
    # The task gate T and the base path see the clean x; only A / W_A see the dropped x.
    want = ref_projection(x, params, kind, 1, skill_x=dropped)
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
    all_dropped = ref_projection(dropped, params, kind, 1)
    assert np.abs(all_dropped - want).max() > 1e-2
    assert np.abs(np.asarray(out) - clean).max() > 1e-2
    other = module.apply(variables, x, rngs={"dropout": jax.random.key(4)})
    assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-2


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_adapter_config_validates_its_fields():
    assert AdapterConfig(kind="dual_lora").scale == 2.0  # 64 / 32, as in the released code
    assert AdapterConfig(kind="lora", targets=["query"]).targets == ("query",)
    for bad, match in [
        (dict(kind="dora"), "kind 'dora'"),
        (dict(rank=0), "rank must be a positive int"),
        (dict(alpha=0.0), "alpha must be positive"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(targets=("q_proj",)), "unknown adapter targets"),
        (dict(targets=("query", "query")), "repeat"),
        (dict(kind="lora", targets=()), "at least one target"),
    ]:
        with pytest.raises(ValueError, match=match):
            AdapterConfig(**bad)
    with pytest.raises(ValueError, match=r"\['wi'\] are not projections"):
        TransformerConfig(
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, mlp_dim=8,
            adapter=AdapterConfig(kind="lora", targets=("query", "wi")),
        )  # fmt: skip


def test_transformer_config_reads_an_optional_adapter_section():
    model = ml_collections.ConfigDict(
        dict(
            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32,
            mlp_activation="swiglu", norm="rmsnorm", norm_epsilon=1e-6,
            rope_max_wavelength=1e4, scan_layers=False, remat_policy="none",
            dtype="float32", param_dtype="float32",
        )
    )  # fmt: skip
    assert transformer_config_from(model).adapter.kind == "none"
    model.adapter = dict(kind="dual_lora", rank=8, alpha=16, dropout=0.1, targets=["query"])
    assert transformer_config_from(model).adapter == AdapterConfig(
        kind="dual_lora", rank=8, alpha=16, dropout=0.1, targets=("query",)
    )
    model.adapter.lora_rank = 4
    with pytest.raises(ValueError, match=r"unknown keys \['lora_rank'\]"):
        transformer_config_from(model)
