"""Masked next-token cross-entropy and the AdamW warmup-cosine optimizer against references."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mllm_jax.train.losses import cross_entropy_loss
from mllm_jax.train.optimizer import make_learning_rate_schedule, matrices_only
from mllm_jax.train.param_groups import ParamGroup, make_grouped_optimizer


def _reference_loss(logits, targets, loss_mask):
    total, count = 0.0, 0.0
    batch, length, _ = logits.shape
    for b in range(batch):
        for t in range(length):
            if not loss_mask[b, t]:
                continue
            row = logits[b, t].astype(np.float64)
            log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            total += loss_mask[b, t] * (log_z - row[targets[b, t]])
            count += loss_mask[b, t]
    return total, count


def test_cross_entropy_matches_loop_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(3, 7))
    loss_mask = rng.integers(0, 2, size=(3, 7)).astype(np.float32)
    total, count = cross_entropy_loss(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(loss_mask)
    )
    ref_total, ref_count = _reference_loss(logits, targets, loss_mask)
    assert float(count) == ref_count
    np.testing.assert_allclose(float(total), ref_total, rtol=1e-5)


def test_masked_positions_do_not_contribute_even_with_extreme_logits():
    logits = jnp.zeros((1, 3, 5)).at[0, 1].set(jnp.array([1e4, -1e4, 0, 0, 0]))
    targets = jnp.array([[1, 1, 1]])
    total, count = cross_entropy_loss(logits, targets, jnp.array([[1.0, 0.0, 1.0]]))
    assert float(count) == 2
    np.testing.assert_allclose(float(total), 2 * np.log(5), rtol=1e-6)


def _optimizer_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-2,
            warmup_steps=10,
            end_learning_rate_fraction=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            grad_clip_norm=1.0,
        )
    )
    config.update(overrides)
    return config


def test_learning_rate_schedule_is_linear_warmup_then_cosine():
    config = _optimizer_config()
    schedule = make_learning_rate_schedule(config, num_steps=110)
    peak, end = 1e-2, 1e-3
    for step in [0, 5, 10, 30, 60, 109, 110]:
        if step < 10:
            expected = peak * step / 10
        else:
            progress = (step - 10) / 100
            expected = end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), step


def test_schedule_rejects_warmup_longer_than_training():
    with pytest.raises(ValueError, match="warmup_steps"):
        make_learning_rate_schedule(_optimizer_config(warmup_steps=50), num_steps=50)


def _one_group_optimizer(config):
    """The trainer's optimizer with every parameter in one group."""
    group = ParamGroup(name="all", patterns=(".",), learning_rate=config.learning_rate)
    return make_grouped_optimizer(config, [group], num_steps=100)


def test_weight_decay_applies_to_matrices_only():
    params = {"kernel": jnp.ones((2, 3)), "scale": jnp.ones((3,))}
    assert matrices_only(params) == {"kernel": True, "scale": False}
    # With zero gradients AdamW moves only the decayed matrix: p <- p - lr * wd * p.
    config = _optimizer_config(warmup_steps=0)
    tx = _one_group_optimizer(config)
    zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["kernel"], 1 - 1e-2 * 0.1, rtol=1e-6)
    np.testing.assert_allclose(new["scale"], 1.0)


def test_gradients_are_clipped_to_the_global_norm():
    # b1 = b2 = 0 makes Adam's update g / |g| elementwise, so clipping is invisible in the
    # update; the moments store the (clipped) gradient and its square instead.
    config = _optimizer_config(warmup_steps=0, weight_decay=0.0, b1=0.0, b2=0.0)
    tx = _one_group_optimizer(config)
    params = {"w": jnp.zeros((4,))}
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # global norm 50 -> rescaled to norm 1
    _, state = tx.update(grads, tx.init(params), params)
    adam_state = state[1].inner_states["all"].inner_state[0]
    np.testing.assert_allclose(adam_state.mu["w"], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(adam_state.nu["w"], [0.36, 0.64, 0.0, 0.0], rtol=1e-6)
