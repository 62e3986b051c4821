"""DecoderLM: tied/untied heads and the information flow its masks allow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import TransformerConfig, prefix_mask_ar
from mllm_jax.models import DecoderLM

TRANSFORMER = TransformerConfig(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
B, N, V, E = 2, 8, 24, 16


def _model(tie):
    return DecoderLM(vocab_size=V, embed_dim=E, transformer=TRANSFORMER, tie_embeddings=tie)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, V, size=(B, N)), jnp.int32)


@pytest.fixture(scope="module")
def tied(tokens):
    model = _model(True)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    apply = jax.jit(lambda p, t, **kw: model.apply({"params": p}, t, **kw))
    return params, apply


def test_tied_model_reuses_the_embedding_and_untied_adds_lm_head(tokens, tied):
    params, apply = tied
    assert "lm_head" not in params
    untied = _model(False).init(jax.random.key(0), tokens)["params"]
    assert untied["lm_head"]["kernel"].value.shape == (E, V)
    assert apply(params, tokens).shape == (B, N, V)
    # Tied logits are exactly hidden @ embedding^T: scaling the table scales the logits' input.
    doubled = jax.tree_util.tree_map(lambda a: a, params)
    doubled["embedder"]["embedding"] = params["embedder"]["embedding"].replace_boxed(
        params["embedder"]["embedding"].value * 2.0
    )
    assert not np.allclose(apply(doubled, tokens), apply(params, tokens))


def _changed_positions(apply, params, tokens, position, **kwargs):
    edited = tokens.at[:, position].set((tokens[:, position] + 1) % V)
    diff = np.abs(np.asarray(apply(params, edited, **kwargs) - apply(params, tokens, **kwargs)))
    return diff.max(axis=(0, 2)) > 1e-6


def test_causal_model_never_looks_ahead(tokens, tied):
    params, apply = tied
    changed = _changed_positions(apply, params, tokens, 5)
    np.testing.assert_array_equal(changed, [False] * 5 + [True] * 3)


def test_prefix_model_sees_the_whole_prefix(tokens, tied):
    params, apply = tied
    mask_ar = prefix_mask_ar(jnp.array([4, 4]), N)
    changed = _changed_positions(apply, params, tokens, 2, mask_ar=mask_ar)
    np.testing.assert_array_equal(changed, [True] * N)
    changed = _changed_positions(apply, params, tokens, 5, mask_ar=mask_ar)
    np.testing.assert_array_equal(changed, [False] * 5 + [True] * 3)


def test_packed_segments_are_isolated_and_restart_positions(tokens, tied):
    params, apply = tied
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * B)
    changed = _changed_positions(apply, params, tokens, 1, segment_ids=segment_ids)
    np.testing.assert_array_equal(changed, [False, True, True] + [False] * 5)
    # Segment 2 computes exactly what it would alone at positions 0..4.
    packed = apply(params, tokens, segment_ids=segment_ids)[:, 3:]
    alone = apply(params, tokens[:, 3:])
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)
