"""FuseMix's mixing, loss and temperature clamp against plain numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax import sharding
from mllm_jax.models.fusion_adapter import (
    TEMPERATURE_RANGE,
    AdapterConfig,
    FuseMixModel,
    clamp_temperature,
)
from mllm_jax.recipes.fusemix import (
    LOGICAL_RULES,
    FuseMixConfig,
    fusemix_task,
    optimizer_config,
    training_config,
)
from mllm_jax.train.fusemix_loss import (
    fusemix,
    make_fusemix_loss,
    mix_weight,
    step_keys,
    symmetric_info_nce,
)
from mllm_jax.train.optimizer import matrices_only
from mllm_jax.train.trainer import prepare_step

TINY = AdapterConfig(embed_dim=8, num_blocks=2, mlp_ratio=2.0, dropout=0.0)


def numpy_info_nce(u, v, temperature):
    logits = u @ v.T / temperature

    def ce_diag(x):
        x = x - x.max(axis=1, keepdims=True)
        log_probs = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        return -np.diag(log_probs)

    return float(np.sum(0.5 * (ce_diag(logits) + ce_diag(logits.T))))


def test_fusemix_pairs_row_i_with_row_i_plus_half():
    rng = np.random.default_rng(0)
    z_x, z_y = rng.normal(size=(6, 5)), rng.normal(size=(6, 3))
    mixed_x, mixed_y = fusemix(jnp.asarray(z_x), jnp.asarray(z_y), 0.3)
    np.testing.assert_allclose(mixed_x, 0.3 * z_x[:3] + 0.7 * z_x[3:], rtol=1e-6)
    np.testing.assert_allclose(mixed_y, 0.3 * z_y[:3] + 0.7 * z_y[3:], rtol=1e-6)


def test_fusemix_rejects_an_odd_batch():
    with pytest.raises(ValueError, match="even batch"):
        fusemix(jnp.zeros((5, 2)), jnp.zeros((5, 2)), 0.5)


def test_info_nce_equals_numpy():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(7, 4))
    v = u + 0.5 * rng.normal(size=(7, 4))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    loss_sum, count = symmetric_info_nce(jnp.asarray(u), jnp.asarray(v), 0.1)
    assert float(count) == 7
    np.testing.assert_allclose(float(loss_sum), numpy_info_nce(u, v, 0.1), rtol=1e-5)


def test_loss_uses_one_lambda_for_both_modalities():
    model = FuseMixModel(TINY)
    rng = np.random.default_rng(2)
    batch = {"image": rng.normal(size=(8, 6)), "text": rng.normal(size=(8, 4))}
    params = model.init(jax.random.key(0), jnp.zeros((2, 6)), jnp.zeros((2, 4)))["params"]
    key = jax.random.key(7)
    loss_sum, count = make_fusemix_loss(model, alpha=1.0)(params, batch, key)

    lam = float(mix_weight(step_keys(key)[0], 1.0))
    assert 0.0 < lam < 1.0
    mixed_x = lam * batch["image"][:4] + (1 - lam) * batch["image"][4:]
    mixed_y = lam * batch["text"][:4] + (1 - lam) * batch["text"][4:]
    u, v, temperature = model.apply({"params": params}, mixed_x, mixed_y)
    expected = numpy_info_nce(np.asarray(u), np.asarray(v), float(temperature))
    assert float(count) == 4
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
    # A different λ for the text side would give another loss.
    other = fusemix(jnp.asarray(batch["text"]), jnp.asarray(batch["text"]), 1 - lam)[1]
    u2, v2, _ = model.apply({"params": params}, mixed_x, other)
    assert abs(numpy_info_nce(np.asarray(u2), np.asarray(v2), 0.07) - expected) > 1e-3


def test_lambda_is_drawn_anew_each_step():
    draws = [float(mix_weight(step_keys(jax.random.fold_in(jax.random.key(0), s))[0], 1.0))
             for s in range(50)]  # fmt: skip
    assert len(set(draws)) == 50
    # Beta(1, 1) is uniform: mean 1/2.
    assert abs(np.mean(draws) - 0.5) < 0.12


def test_temperature_stays_in_its_clamp():
    config = FuseMixConfig(
        adapter=AdapterConfig(embed_dim=8, num_blocks=1, mlp_ratio=1.0, dropout=0.0,
                              temperature_init=0.45),
        learning_rate=0.5, warmup_steps=0, num_steps=30, grad_clip_norm=1e9,
    )  # fmt: skip
    mesh = sharding.create_mesh({"data": 1}, devices=jax.devices()[:1])
    # The trainer's own jitted step, with the task's clamp after every update.
    prepared = prepare_step(
        fusemix_task(config, (6, 4), None, batch_size=16),
        optimizer_config=optimizer_config(config),
        training_config=training_config(config, log_every=1, checkpoint_every=1, progress=False),
        mesh=mesh, rules=LOGICAL_RULES,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    z = rng.normal(size=(16, 6)).astype(np.float32)
    # Text latents equal to a slice of the image ones: easy to align, so τ is pushed to its floor.
    batch = jax.device_put({"image": z, "text": z[:, :4] * 3}, prepared.batch_sharding)
    state, seen = prepared.state, []
    with sharding.mesh_context(mesh, LOGICAL_RULES):
        for _ in range(config.num_steps):
            state, _ = prepared.step_fn(state, batch, prepared.step_rng)
            seen.append(float(state.trainable["temperature"]))
    assert all(TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1] for t in seen), seen
    assert min(seen) == pytest.approx(TEMPERATURE_RANGE[0]) or max(seen) == pytest.approx(
        TEMPERATURE_RANGE[1]
    ), seen


def test_clamp_puts_the_raw_parameter_back():
    assert float(clamp_temperature({"temperature": jnp.float32(3.0)})["temperature"]) == 0.5
    low = clamp_temperature({"temperature": jnp.float32(-1.0)})["temperature"]
    assert float(low) == pytest.approx(0.001)


def test_weight_decay_reaches_matrices_only():
    model = FuseMixModel(TINY)
    params = model.init(jax.random.key(0), jnp.zeros((2, 6)), jnp.zeros((2, 4)))["params"]
    mask = jax.tree_util.tree_leaves_with_path(matrices_only(jax.tree.map(jnp.asarray, params)))
    decayed = {jax.tree_util.keystr(path) for path, on in mask if on}
    assert decayed and all("kernel" in path for path in decayed)
    assert not any("temperature" in p or "bias" in p or "scale" in p for p in decayed)
