"""RoPE inverse frequencies with "linear" and "llama3" scaling vs independent references.

References: a numpy float64 transcription of the Llama 3.1 release's ``apply_scaling`` (a loop
over frequencies with its three branches) and, when installed, transformers'
``ROPE_INIT_FUNCTIONS`` (float32). Tolerance rtol=1e-6 (float32 rounding of one value).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.rope import RopeScaling, apply_rope, rope_inverse_frequencies

LLAMA31 = RopeScaling(
    kind="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)


def llama3_reference(head_dim: int, theta: float, s: RopeScaling) -> np.ndarray:
    """Meta's ``apply_scaling`` (llama-models), one frequency at a time."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * freq / s.factor + smooth * freq)
    return np.array(out)


@pytest.mark.parametrize(("head_dim", "theta"), [(128, 500_000.0), (64, 10_000.0), (16, 50.0)])
def test_llama3_frequencies_match_the_reference_formula(head_dim, theta):
    got = rope_inverse_frequencies(head_dim, theta, LLAMA31)
    want = llama3_reference(head_dim, theta, LLAMA31)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # All three regimes occur for the Llama 3.1 8B setting: kept, blended, divided.
    if head_dim == 128:
        plain = rope_inverse_frequencies(head_dim, theta)
        ratio = got / plain
        assert (
            np.any(ratio == 1)
            and np.any(np.isclose(ratio, 1 / 8))
            and np.any((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3))
        )


def test_linear_scaling_divides_every_frequency():
    got = rope_inverse_frequencies(32, 30_000.0, RopeScaling(kind="linear", factor=4.0))
    want = 30_000.0 ** (-np.arange(0, 32, 2) / 32) / 4.0
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_frequencies_match_transformers_rope_init_functions():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(
        rope_type="llama3",
        rope_theta=500_000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    config = transformers.LlamaConfig(
        hidden_size=256, num_attention_heads=2, rope_parameters=dict(rope)
    )
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    np.testing.assert_allclose(
        rope_inverse_frequencies(128, 500_000.0, LLAMA31), want.numpy(), rtol=1e-6
    )
    linear = transformers.LlamaConfig(
        hidden_size=256,
        num_attention_heads=4,
        rope_parameters=dict(rope_type="linear", rope_theta=20_000.0, factor=3.0),
    )
    want, _ = ROPE_INIT_FUNCTIONS["linear"](linear)
    got = rope_inverse_frequencies(64, 20_000.0, RopeScaling(kind="linear", factor=3.0))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)


def test_scaled_rope_rotates_by_the_scaled_frequencies():
    """apply_rope with scaling = the plain rotation at positions · ω_scaled / ω (per pair)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, 16)).astype(np.float32)
    positions = np.array([[0, 7, 300]])
    scaling = RopeScaling(kind="linear", factor=5.0)
    got = jax.jit(apply_rope, static_argnums=(2, 3))(
        jnp.asarray(x), jnp.asarray(positions), 100.0, scaling
    )
    want = apply_rope(jnp.asarray(x), jnp.asarray(positions / 5.0), 100.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(kind="yarn", factor=2.0), "not one of"),
        (dict(kind="linear", factor=0.0), "positive"),
        (dict(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0), "low_freq"),
    ],
)
def test_bad_scaling_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        RopeScaling(**fields)
