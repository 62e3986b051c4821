"""METALM loss: Eq. 1 exclusions per mode, and held-out scoring on the same targets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.layers import TransformerConfig
from mllm_jax.models.semi_causal_lm import SemiCausalConfig, SemiCausalLM
from mllm_jax.train.losses import cross_entropy_loss
from mllm_jax.train.semi_causal_task import make_heldout_loss, semi_causal_loss_fn

CONFIG = SemiCausalConfig(
    vocab_size=16,
    embed_dim=8,
    decoder=TransformerConfig(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=16),
    encoder=TransformerConfig(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=4, mlp_dim=16),
    encoder_embed_dim=8,
    max_spans=2,
    max_span_length=4,
)


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 16, (2, 10)).astype(np.int32)
    segments = np.array([[1] * 10, [1] * 6 + [2] * 3 + [0]], np.int32)
    loss_mask = np.ones((2, 10), np.float32)
    loss_mask[0, 9] = loss_mask[1, 5] = loss_mask[1, 8:] = 0  # segment ends, padding
    return {
        "tokens": tokens,
        "targets": np.roll(tokens, -1, axis=1),
        "loss_mask": loss_mask,
        "segment_ids": segments,
        "positions": np.array([list(range(10)), list(range(6)) + [0, 1, 2, 0]], np.int32),
        "span_ids": np.array([[0, 0, 1, 1, 0, 0, 2, 0, 0, 0], [1, 1, 1, 0, 0, 0, 2, 2, 0, 0]]),
    }


def test_loss_excludes_span_internal_targets_except_in_causal_mode():
    batch = {k: jnp.asarray(v) for k, v in _batch().items()}
    counts = {}
    for mode in ("causal", "prefix", "semi_causal"):
        model = SemiCausalLM(dataclasses.replace(CONFIG, mode=mode))
        params = model.init(
            jax.random.key(0), batch["tokens"], segment_ids=batch["segment_ids"],
            positions=batch["positions"], span_ids=batch["span_ids"],
        )["params"]  # fmt: skip
        loss_sum, count = semi_causal_loss_fn(model)(params, batch, jax.random.key(1))
        counts[mode] = float(count)
        logits = model.apply({"params": params}, batch["tokens"], **{
            k: batch[k] for k in ("segment_ids", "positions", "span_ids")})  # fmt: skip
        # Positions 2 (row 0) and 0, 1, 6 (row 1) sit inside a span before its last token.
        eq1_mask = batch["loss_mask"].at[0, 2].set(0).at[1, jnp.array([0, 1, 6])].set(0)
        want = cross_entropy_loss(
            logits, batch["targets"], batch["loss_mask"] if mode == "causal" else eq1_mask
        )
        np.testing.assert_allclose(float(loss_sum), float(want[0]), rtol=1e-6)
        # Held out, every mode is scored on the Eq. 1 targets.
        eq1_sum, eq1_count = cross_entropy_loss(logits, batch["targets"], eq1_mask)
        heldout = make_heldout_loss(model)(params, [batch])
        np.testing.assert_allclose(heldout, float(eq1_sum) / float(eq1_count), rtol=1e-6)
    assert counts == {"causal": 16.0, "prefix": 12.0, "semi_causal": 12.0}
