"""apply_rope against a loop reference of the half-split rotation, plus its relative property.

Tolerance: float32 output vs float64 reference, rtol=1e-5, atol=1e-6 (the library forms angles
in float32, so positions stay small here, where that costs well under 1e-6).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.rope import apply_rope

RTOL, ATOL = 1e-5, 1e-6


def ref_rope(x: np.ndarray, positions: np.ndarray, max_wavelength: float) -> np.ndarray:
    """Pairs (i, i + D/2) rotated by angle position * max_wavelength^(-2i/D)."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    batch, length, heads, dim = x.shape
    half = dim // 2
    for b in range(batch):
        for n in range(length):
            for h in range(heads):
                for i in range(half):
                    theta = float(positions[b, n]) * max_wavelength ** (-2.0 * i / dim)
                    c, s = math.cos(theta), math.sin(theta)
                    a, z = x[b, n, h, i], x[b, n, h, i + half]
                    out[b, n, h, i] = a * c - z * s
                    out[b, n, h, i + half] = z * c + a * s
    return out


# One compiled program per shape instead of one per primitive keeps the suite fast on CPU.
jit_rope = jax.jit(apply_rope, static_argnums=2)


def rope(x, positions, max_wavelength=10_000.0) -> np.ndarray:
    return np.asarray(jit_rope(jnp.asarray(x), jnp.asarray(positions), max_wavelength))


@pytest.mark.parametrize(("dim", "max_wavelength"), [(8, 10_000.0), (16, 10_000.0), (6, 100.0)])
def test_rope_matches_loop_reference(dim, max_wavelength):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, dim)).astype(np.float32)
    positions = rng.integers(0, 20, size=(2, 5))
    got = rope(x, positions, max_wavelength)
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_rope(x, positions, max_wavelength), rtol=RTOL, atol=ATOL)


def test_rope_accepts_float_positions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 2, 8)).astype(np.float32)
    positions = np.array([[0.5, 1.25, 3.0, 7.75]], np.float32)
    np.testing.assert_allclose(
        rope(x, positions), ref_rope(x, positions, 10_000.0), rtol=RTOL, atol=ATOL
    )


def test_rope_at_position_zero_is_identity():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 2, 8)).astype(np.float32)
    np.testing.assert_array_equal(rope(x, np.zeros((2, 3), np.int32)), x)


def test_rope_rotates_first_pair_by_position_radians():
    # Pair (0, D/2) has frequency 1: unit vector e_0 at position p becomes (cos p, ..., sin p, ...).
    dim = 8
    x = np.zeros((1, 3, 1, dim), np.float32)
    x[..., 0] = 1.0
    got = rope(x, np.array([[1, 2, 3]]))
    for n, p in enumerate([1, 2, 3]):
        want = np.zeros(dim)
        want[0], want[dim // 2] = math.cos(p), math.sin(p)
        np.testing.assert_allclose(got[0, n, 0], want, rtol=RTOL, atol=ATOL)


def test_rope_preserves_norm():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 6, 2, 16)).astype(np.float32)
    got = rope(x, rng.integers(0, 50, size=(2, 6)))
    np.testing.assert_allclose(
        np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=RTOL, atol=ATOL
    )


def test_rope_dot_product_depends_only_on_relative_position():
    rng = np.random.default_rng(4)
    dim = 16
    q = rng.normal(size=(1, 1, 1, dim)).astype(np.float32)
    k = rng.normal(size=(1, 1, 1, dim)).astype(np.float32)

    def score(m, n):
        rq = rope(q, np.array([[m]]), 100.0).astype(np.float64)
        rk = rope(k, np.array([[n]]), 100.0).astype(np.float64)
        return float(np.sum(rq * rk))

    for offset in (0, 3, -5):
        scores = [score(m, m - offset) for m in (5, 9, 17, 40)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-5)
        want = float(np.sum(ref_rope(q, np.array([[offset]]), 100.0) * k))
        np.testing.assert_allclose(scores[0], want, rtol=1e-4, atol=1e-5)
    # ... and it does depend on the offset.
    assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_keeps_input_dtype():
    x = jnp.ones((1, 2, 1, 4), jnp.bfloat16)
    assert apply_rope(x, jnp.array([[0, 1]])).dtype == jnp.bfloat16


def test_rope_rejects_odd_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        apply_rope(jnp.ones((1, 2, 1, 5)), jnp.zeros((1, 2), jnp.int32))
