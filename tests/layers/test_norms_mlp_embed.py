"""RMSNorm, LayerNorm, MLP and Embedder against plain-numpy loop references (float64).

Tolerance: float32 library output vs float64 reference, rtol=1e-5, atol=1e-6.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.embed import Embedder
from mllm_jax.layers.mlp import MLP
from mllm_jax.layers.norms import LayerNorm, RMSNorm, make_norm

RTOL, ATOL = 1e-5, 1e-6


def init_params(module, *args, **kwargs):
    # "rbg" keys only make eager compilation of the initialisers cheaper on CPU.
    return nn.unbox(module.init(jax.random.key(0, impl="rbg"), *args, **kwargs))["params"]


def rows(x: np.ndarray):
    """Yields every index of x's leading dims, so references loop over feature vectors."""
    yield from np.ndindex(*x.shape[:-1])


# --------------------------------------------------------------------------------------------
# Norms
# --------------------------------------------------------------------------------------------


def ref_rmsnorm(x, scale, eps):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    dim = x.shape[-1]
    for idx in rows(x):
        mean_sq = sum(float(v) ** 2 for v in x[idx]) / dim
        out[idx] = x[idx] / math.sqrt(mean_sq + eps) * scale
    return out


def ref_layernorm(x, scale, bias, eps):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    dim = x.shape[-1]
    for idx in rows(x):
        mean = sum(float(v) for v in x[idx]) / dim
        var = sum((float(v) - mean) ** 2 for v in x[idx]) / dim
        out[idx] = (x[idx] - mean) / math.sqrt(var + eps) * scale
        if bias is not None:
            out[idx] += bias
    return out


@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_rmsnorm_matches_reference(epsilon):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 3, 8)) * 0.7).astype(np.float32)
    module = RMSNorm(epsilon=epsilon)
    params = init_params(module, jnp.asarray(x))
    np.testing.assert_array_equal(params["scale"], np.ones(8))  # initialised to ones
    scale = rng.normal(size=8).astype(np.float32)
    got = np.asarray(module.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x)))
    np.testing.assert_allclose(got, ref_rmsnorm(x, scale, epsilon), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("epsilon", [1e-6, 0.5])
def test_layernorm_matches_reference(epsilon):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(2, 3, 8)) * 0.7 + 2.0).astype(np.float32)
    module = LayerNorm(epsilon=epsilon)
    params = init_params(module, jnp.asarray(x))
    np.testing.assert_array_equal(params["scale"], np.ones(8))
    np.testing.assert_array_equal(params["bias"], np.zeros(8))
    scale = rng.normal(size=8).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    variables = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    got = np.asarray(module.apply(variables, jnp.asarray(x)))
    np.testing.assert_allclose(got, ref_layernorm(x, scale, bias, epsilon), rtol=RTOL, atol=ATOL)


def test_layernorm_without_bias_has_only_scale():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 8)).astype(np.float32)
    module = LayerNorm(use_bias=False)
    params = init_params(module, jnp.asarray(x))
    assert set(params) == {"scale"}
    scale = rng.normal(size=8).astype(np.float32)
    got = np.asarray(module.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x)))
    np.testing.assert_allclose(got, ref_layernorm(x, scale, None, 1e-6), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_norm_statistics_are_float32_for_float16_input(kind):
    # 400^2 = 160000 overflows float16 (max 65504): float16 statistics would give inf -> 0 output.
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2, 8)) * 400.0).astype(np.float16)
    module = make_norm(kind, dtype=jnp.float16)
    params = init_params(module, jnp.asarray(x))
    got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    assert got.dtype == np.float16
    ones = np.ones(8)
    want = (
        ref_rmsnorm(x, ones, 1e-6) if kind == "rmsnorm" else ref_layernorm(x, ones, 0 * ones, 1e-6)
    )
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3, atol=2e-3)


def test_make_norm_builds_requested_kind_with_kwargs():
    assert isinstance(make_norm("rmsnorm", epsilon=0.1), RMSNorm)
    layer = make_norm("layernorm", epsilon=0.25)
    assert isinstance(layer, LayerNorm) and layer.epsilon == 0.25


def test_make_norm_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown norm kind 'batchnorm'.*'rmsnorm'.*'layernorm'"):
        make_norm("batchnorm")


# --------------------------------------------------------------------------------------------
# MLP
# --------------------------------------------------------------------------------------------


def ref_matmul(x, w):
    """[..., I] @ [I, O] with explicit loops over rows."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros(x.shape[:-1] + (w.shape[1],))
    for idx in rows(x):
        for o in range(w.shape[1]):
            out[idx + (o,)] = sum(x[idx + (i,)] * w[i, o] for i in range(w.shape[0]))
    return out


def silu(z):
    return z / (1.0 + math.exp(-z))


def gelu_exact(z):
    return 0.5 * z * (1.0 + math.erf(z / math.sqrt(2.0)))


EMBED, HIDDEN = 8, 12


def test_swiglu_mlp_matches_reference():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, EMBED)).astype(np.float32)
    module = MLP(hidden_dim=HIDDEN, activation="swiglu")
    params = init_params(module, jnp.asarray(x))
    assert set(params) == {"wi_gate", "wi_up", "wo"}
    assert params["wi_gate"]["kernel"].shape == (EMBED, HIDDEN)
    assert params["wi_up"]["kernel"].shape == (EMBED, HIDDEN)
    assert params["wo"]["kernel"].shape == (HIDDEN, EMBED)
    got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    gate = ref_matmul(x, params["wi_gate"]["kernel"])
    up = ref_matmul(x, params["wi_up"]["kernel"])
    hidden = np.vectorize(silu)(gate) * up
    want = ref_matmul(hidden, params["wo"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_gelu_mlp_uses_exact_erf_gelu():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(2, 3, EMBED)) * 1.5).astype(np.float32)
    module = MLP(hidden_dim=HIDDEN, activation="gelu")
    params = init_params(module, jnp.asarray(x))
    assert set(params) == {"wi", "wo"}
    assert params["wi"]["kernel"].shape == (EMBED, HIDDEN)
    assert params["wo"]["kernel"].shape == (HIDDEN, EMBED)
    got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    pre = ref_matmul(x, params["wi"]["kernel"])
    want = ref_matmul(np.vectorize(gelu_exact)(pre), params["wo"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    # The tanh approximation differs by far more than the tolerance on these inputs.
    tanh_gelu = 0.5 * pre * (1 + np.tanh(math.sqrt(2 / math.pi) * (pre + 0.044715 * pre**3)))
    approx = ref_matmul(tanh_gelu, params["wo"]["kernel"])
    assert not np.allclose(got, approx, rtol=RTOL, atol=ATOL)


def gelu_tanh(z):
    return 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def quick_gelu(z):
    return z / (1.0 + math.exp(-1.702 * z))


@pytest.mark.parametrize(
    ("activation", "reference"),
    [("gelu", gelu_exact), ("gelu_tanh", gelu_tanh), ("quick_gelu", quick_gelu)],
)
def test_biased_mlp_matches_reference(activation, reference):
    """The CLIP (quick_gelu) and SigLIP (gelu_tanh) feed-forwards: biases on both projections."""
    rng = np.random.default_rng(6)
    x = (rng.normal(size=(2, 3, EMBED)) * 1.5).astype(np.float32)
    module = MLP(hidden_dim=HIDDEN, activation=activation, use_bias=True)
    params = init_params(module, jnp.asarray(x))
    assert params["wi"]["bias"].shape == (HIDDEN,) and params["wo"]["bias"].shape == (EMBED,)
    params = jax.tree_util.tree_map(  # biases start at zero: make them matter
        lambda a: a + rng.normal(size=a.shape).astype(np.float32), params
    )
    got = np.asarray(module.apply({"params": params}, jnp.asarray(x)))
    pre = ref_matmul(x, params["wi"]["kernel"]) + np.asarray(params["wi"]["bias"])
    hidden = np.vectorize(reference)(pre)
    want = ref_matmul(hidden, params["wo"]["kernel"]) + np.asarray(params["wo"]["bias"])
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_mlp_rejects_unknown_activation():
    module = MLP(hidden_dim=4, activation="relu")
    with pytest.raises(ValueError, match=r"unknown MLP activation 'relu'.*swiglu.*gelu"):
        module.init(jax.random.key(0, impl="rbg"), jnp.ones((1, 2, 4)))


# --------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------


def test_embedder_encode_looks_up_rows():
    vocab, embed = 11, 6
    tokens = np.array([[0, 3, 10, 3], [7, 7, 1, 0]])
    module = Embedder(vocab_size=vocab, embed_dim=embed)
    params = init_params(module, jnp.asarray(tokens), method=Embedder.encode)
    table = np.random.default_rng(6).normal(size=(vocab, embed)).astype(np.float32)
    got = np.asarray(
        module.apply(
            {"params": {"embedding": jnp.asarray(table)}},
            jnp.asarray(tokens),
            method=Embedder.encode,
        )
    )
    assert params["embedding"].shape == (vocab, embed)
    want = np.zeros((2, 4, embed), np.float32)
    for b in range(2):
        for n in range(4):
            want[b, n] = table[tokens[b, n]]
    np.testing.assert_array_equal(got, want)


def test_embedder_decode_is_dot_with_every_row():
    vocab, embed = 11, 6
    rng = np.random.default_rng(7)
    table = rng.normal(size=(vocab, embed)).astype(np.float32)
    x = rng.normal(size=(2, 3, embed)).astype(np.float32)
    module = Embedder(vocab_size=vocab, embed_dim=embed)
    got = np.asarray(
        module.apply(
            {"params": {"embedding": jnp.asarray(table)}}, jnp.asarray(x), method=Embedder.decode
        )
    )
    assert got.shape == (2, 3, vocab) and got.dtype == np.float32
    want = np.zeros((2, 3, vocab))
    for b in range(2):
        for n in range(3):
            for v in range(vocab):
                want[b, n, v] = sum(float(x[b, n, e]) * float(table[v, e]) for e in range(embed))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_embedder_init_has_stddev_inverse_sqrt_embed_dim():
    vocab, embed = 256, 64
    module = Embedder(vocab_size=vocab, embed_dim=embed)
    table = np.asarray(
        init_params(module, jnp.zeros((1, 1), jnp.int32), method=Embedder.encode)["embedding"]
    )
    assert table.shape == (vocab, embed)
    assert abs(table.std() - embed**-0.5) < 0.05 * embed**-0.5
    assert abs(table.mean()) < 0.01
