"""Image-token insertion and Flamingo-style gated cross-attention against loop references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from mllm_jax.layers.cross_attention import GatedCrossAttentionBlock, make_cross_attention_mask
from mllm_jax.layers.image_tokens import insert_image_tokens
from mllm_jax.sharding import strip_boxes

P = 2  # tokens per image
# Two packed samples: sample 1 = [bos, img0 x2, t, t], sample 2 = [bos, t, img1 x2, img2 x2, t]
SEGMENTS = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 0]])
SLOTS = np.array([[-1, 0, 0, -1, -1, -1, -1, 1, 1, 2, 2, -1, -1]])
PATCHES = np.where(SLOTS >= 0, np.array([[0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0]]), -1)


def test_image_tokens_replace_exactly_the_placeholder_positions():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(1, 13, 4)).astype(np.float32)
    images = rng.normal(size=(1, 4, P, 4)).astype(np.float32)  # slot 3 unused
    merged = np.asarray(insert_image_tokens(text, images, SLOTS, PATCHES))
    for t in range(13):
        expected = images[0, SLOTS[0, t], PATCHES[0, t]] if SLOTS[0, t] >= 0 else text[0, t]
        np.testing.assert_array_equal(merged[0, t], expected)


def test_cross_attention_mask_shows_only_earlier_images_of_the_same_sample():
    mask = np.asarray(make_cross_attention_mask(SLOTS, SEGMENTS, num_slots=4, tokens_per_image=P))
    assert mask.shape == (1, 1, 13, 4 * P)
    first = {0: 1, 1: 7, 2: 9}
    segment_of = {0: 1, 1: 2, 2: 2}
    for t in range(13):
        for m in range(4):
            visible = m in first and first[m] <= t and segment_of[m] == SEGMENTS[0, t] > 0
            assert (mask[0, 0, t, m * P : (m + 1) * P] == visible).all(), (t, m)


def _reference_block(params, x, context, mask):
    """numpy float64 of GatedCrossAttentionBlock."""
    p = {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}

    def layer_norm(v, prefix):
        mean = v.mean(-1, keepdims=True)
        var = ((v - mean) ** 2).mean(-1, keepdims=True)
        return (v - mean) / np.sqrt(var + 1e-6) * p[f"{prefix}/scale"] + p[f"{prefix}/bias"]

    x = np.asarray(x, np.float64)
    context = np.asarray(context, np.float64)
    h = layer_norm(x, "pre_attention_norm")
    q = np.einsum("bne,ehd->bnhd", h, p["cross_attention/query/kernel"])
    k = np.einsum("bse,ehd->bshd", context, p["cross_attention/key/kernel"])
    v = np.einsum("bse,ehd->bshd", context, p["cross_attention/value/kernel"])
    logits = np.einsum("bnhd,bshd->bhns", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask, logits, -np.inf)  # mask [B, 1, N, S] broadcasts over heads
    has_image = mask[:, 0].any(-1)[:, :, None]
    logits = np.where(has_image[:, None, :, :], logits, 0.0)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhns,bshd->bnhd", weights, v)
    attended = np.einsum("bnhd,hde->bne", out, p["cross_attention/out/kernel"])
    x = x + np.tanh(p["attention_gate"]) * attended * has_image
    h = layer_norm(x, "pre_mlp_norm")
    hidden = h @ p["mlp/wi/kernel"]
    hidden = 0.5 * hidden * (1 + erf(hidden / np.sqrt(2)))
    return x + np.tanh(p["mlp_gate"]) * (hidden @ p["mlp/wo/kernel"]) * has_image


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        out.update(_flat(value, path) if isinstance(value, dict) else {path: value})
    return out


@pytest.fixture(scope="module")
def block_and_inputs():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 13, 8)), jnp.float32)
    context = jnp.asarray(rng.normal(size=(1, 4 * P, 6)), jnp.float32)
    mask = make_cross_attention_mask(SLOTS, SEGMENTS, num_slots=4, tokens_per_image=P)
    block = GatedCrossAttentionBlock(num_heads=2, head_dim=4, mlp_dim=16)
    params = strip_boxes(block.init(jax.random.key(0, impl="rbg"), x, context, mask)["params"])
    return block, params, x, context, mask


def test_gated_block_is_the_identity_at_initialisation(block_and_inputs):
    block, params, x, context, mask = block_and_inputs
    assert float(params["attention_gate"]) == 0.0 and float(params["mlp_gate"]) == 0.0
    out = block.apply({"params": params}, x, context, mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))


def test_gated_block_matches_numpy_with_open_gates(block_and_inputs):
    block, params, x, context, mask = block_and_inputs
    params = {**params, "attention_gate": jnp.float32(0.7), "mlp_gate": jnp.float32(-0.4)}
    out = np.asarray(block.apply({"params": params}, x, context, mask))
    expected = _reference_block(params, x, context, np.asarray(mask))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # Text before the first image of its sample (t = 0, 5, 6) and padding (t = 12) is untouched.
    np.testing.assert_array_equal(out[0, [0, 5, 6, 12]], np.asarray(x)[0, [0, 5, 6, 12]])
