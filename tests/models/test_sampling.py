"""Greedy, temperature and nucleus sampling against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.models.sampling import sample_next_token, top_p_filter


def test_greedy_is_argmax():
    logits = jnp.array([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    np.testing.assert_array_equal(sample_next_token(logits, jax.random.key(0)), [1, 0])


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = jnp.log(jnp.asarray(probs))
    for top_p, kept in [(0.5, 1), (0.6, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        filtered = np.asarray(top_p_filter(logits, top_p))
        order = np.argsort(-probs, axis=-1)
        for b in range(2):
            finite = np.isfinite(filtered[b])
            assert finite.sum() == kept, (top_p, b)
            assert set(np.flatnonzero(finite)) == set(order[b, :kept])


def test_sampling_frequencies_follow_the_renormalised_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (20000, 1))
    tokens = np.asarray(sample_next_token(logits, jax.random.key(3), temperature=1.0, top_p=0.7))
    freq = np.bincount(tokens, minlength=4) / len(tokens)
    np.testing.assert_allclose(freq, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.015)
    # Temperature 2 flattens the distribution: p^(1/2), renormalised.
    tokens = np.asarray(sample_next_token(logits, jax.random.key(4), temperature=2.0))
    expected = np.sqrt(probs) / np.sqrt(probs).sum()
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / len(tokens), expected, atol=0.015)


def test_invalid_settings_are_rejected():
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(jnp.zeros((1, 3)), 0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(jnp.zeros((1, 3)), jax.random.key(0), temperature=-1.0)
