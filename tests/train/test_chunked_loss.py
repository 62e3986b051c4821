"""Chunked cross-entropy: the plain loss and its gradients, without [B, N, V] float32 logits.

Tolerance: float32, rtol 1e-5 (atol 1e-7 on gradients, whose small entries are sums of
cancelling terms); the chunked and plain paths differ only in summation order.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.data.packing import PackableSample, PackingSpec, pack_samples
from mllm_jax.layers import TransformerConfig, ViTConfig
from mllm_jax.layers.moe import MoEConfig
from mllm_jax.models import DecoderLM
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.models.semi_causal_lm import SemiCausalConfig, SemiCausalLM
from mllm_jax.sharding import strip_boxes
from mllm_jax.train.losses import (
    chunked_cross_entropy_loss,
    cross_entropy_loss,
    loss_chunk_size_from,
)
from mllm_jax.train.multimodal_task import multimodal_loss_fn, text_loss_fn
from mllm_jax.train.semi_causal_task import make_heldout_loss, semi_causal_loss_fn
from mllm_jax.train.step import lm_loss, lm_objective, make_eval_step

RTOL, ATOL = 1e-5, 1e-7
B, N, V, E = 2, 13, 40, 16  # N = 13 is not a multiple of the chunk sizes below
TRANSFORMER = TransformerConfig(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
IMAGE_ID, IMAGE_SIZE = 4, 8
VISION = ViTConfig(
    image_size=IMAGE_SIZE, patch_size=4, width=8, num_layers=2, num_heads=2, mlp_dim=16
)


def _assert_trees_close(got, want, rtol=RTOL, atol=ATOL):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def _targets_and_mask(rng):
    targets = jnp.asarray(rng.integers(0, V, (B, N)), jnp.int32)
    mask = rng.random((B, N)) < 0.7
    mask[1, 9:] = False  # padding at the end of a row, across a chunk boundary
    return targets, jnp.asarray(mask, jnp.float32)


def _head(tied: bool):
    """(weights, project): a tied [V, E] table or an untied [E, V] kernel, as DecoderLM uses."""
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(V, E) if tied else (E, V)))
    weights = weights.astype(jnp.float32)
    if tied:
        return weights, lambda w, h: jnp.einsum(
            "bne,ve->bnv", h, w, preferred_element_type=jnp.float32
        )
    return weights, lambda w, h: jnp.einsum("bne,ev->bnv", h, w)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 32])
def test_chunked_loss_and_gradients_equal_the_plain_loss(tied, chunk_size):
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(B, N, E)), jnp.float32)
    targets, mask = _targets_and_mask(rng)
    weights, project = _head(tied)

    def plain(h, w):
        return cross_entropy_loss(project(w, h), targets, mask)

    def chunked(h, w):
        return chunked_cross_entropy_loss(
            h, lambda x: project(w, x), targets, mask, chunk_size=chunk_size
        )

    (want, want_count), want_grads = jax.value_and_grad(plain, (0, 1), has_aux=True)(
        hidden, weights
    )
    (got, got_count), got_grads = jax.jit(jax.value_and_grad(chunked, (0, 1), has_aux=True))(
        hidden, weights
    )
    # The plain loss itself against numpy: sum over trained positions of logsumexp - target logit.
    logits = np.asarray(project(weights, hidden), np.float64)
    top = logits.max(-1, keepdims=True)
    nll = np.log(np.exp(logits - top).sum(-1)) + top[..., 0]
    nll -= np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(want), (nll * np.asarray(mask)).sum(), rtol=RTOL)

    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    assert float(got_count) == float(want_count) == float(mask.sum())
    _assert_trees_close(got_grads, want_grads)
    # Masked positions get no gradient, including the padded tail of row 1.
    assert not np.any(np.asarray(got_grads[0])[np.asarray(mask) == 0])


def test_chunked_loss_rejects_a_chunk_size_below_one():
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_cross_entropy_loss(
            jnp.zeros((1, 4, 2)), lambda h: h, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4)),
            chunk_size=0,
        )  # fmt: skip


def test_loss_chunk_size_reads_the_model_section():
    assert loss_chunk_size_from({}) == 0
    assert loss_chunk_size_from({"loss_chunk_size": 256}) == 256
    with pytest.raises(ValueError, match="model.loss_chunk_size must be >= 0"):
        loss_chunk_size_from({"loss_chunk_size": -1})


def _text_batch():
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, V, (B, N)), jnp.int32)
    targets, mask = _targets_and_mask(rng)
    segments = np.ones((B, N), np.int32)
    segments[0, 7:] = 2  # two packed samples in row 0
    segments[1, 9:] = 0  # padding
    positions = np.concatenate([np.arange(7), np.arange(N - 7)])
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": mask,
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(np.stack([positions, np.arange(N)]), jnp.int32),
    }


def _init_decoder(model, batch):
    # Non-zero everywhere (norm scales start at 1, some kernels at 0): every gradient matters.
    params = strip_boxes(jax.jit(model.init)(jax.random.key(0), batch["tokens"])["params"])
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noisy = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(tree, noisy)


def test_decoder_lm_chunked_loss_and_param_gradients_equal_the_plain_loss():
    # Untied here (the lm_head kernel gets gradients); the multimodal test below is tied.
    model = DecoderLM(vocab_size=V, embed_dim=E, transformer=TRANSFORMER, tie_embeddings=False)
    batch = _text_batch()
    params = _init_decoder(model, batch)
    assert "lm_head" in params

    def grads(chunk_size):
        return jax.jit(jax.value_and_grad(
            lambda p: lm_loss(model, p, batch, loss_chunk_size=chunk_size), has_aux=True
        ))(params)  # fmt: skip

    (want, want_count), want_grads = grads(0)
    (got, got_count), got_grads = grads(5)
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    assert float(got_count) == float(want_count) == float(batch["loss_mask"].sum())
    _assert_trees_close(got_grads, want_grads)
    # The text trainer's loss and the eval step honour the chunk size in the same way.
    text_sum, text_count, _ = jax.jit(text_loss_fn(model, loss_chunk_size=5))(
        params, batch, jax.random.key(0)
    )
    np.testing.assert_allclose(float(text_sum), float(want) * float(want_count), rtol=RTOL)
    sums = jax.jit(make_eval_step(model, loss_chunk_size=4))(params, batch)
    np.testing.assert_allclose(float(sums["loss_sum"]), float(text_sum), rtol=RTOL)


def test_chunked_objective_still_adds_the_moe_aux_loss():
    transformer = dataclasses.replace(TRANSFORMER, moe=MoEConfig(num_experts=4, top_k=2))
    model = DecoderLM(vocab_size=V, embed_dim=E, transformer=transformer)
    batch = _text_batch()
    params = _init_decoder(model, batch)

    def objective(chunk_size):
        return jax.jit(jax.value_and_grad(
            lambda p: lm_objective(model, p, batch, loss_chunk_size=chunk_size)[::2],
            has_aux=True,
        ))(params)  # fmt: skip

    (want, want_metrics), want_grads = objective(0)
    (got, got_metrics), got_grads = objective(4)
    assert float(got_metrics["moe/aux_loss"]) > 0
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    _assert_trees_close(got_metrics, want_metrics)
    _assert_trees_close(got_grads, want_grads)


def _grads_of(loss_fn, params, batch):
    """jit(value_and_grad) of a ``(params, batch, rng) -> (loss_sum, count, ...)`` loss."""
    return jax.jit(jax.value_and_grad(
        lambda p: loss_fn(p, batch, jax.random.key(3))[:2], has_aux=True
    ))(params)  # fmt: skip


def _multimodal_batch():
    rng = np.random.default_rng(4)
    patches = VISION.grid_shape()[0] * VISION.grid_shape()[1]
    samples = []
    for i, count in enumerate((1, 0, 1)):
        text = rng.integers(5, V, size=3 + i)
        tokens = np.concatenate([[2], np.full(count * patches, IMAGE_ID), text]).astype(np.int32)
        supervised = np.zeros(len(tokens), bool)
        supervised[-3:] = True
        images = rng.normal(size=(count, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
        samples.append(
            PackableSample(id=str(i), tokens=tokens, supervised=supervised, images=images)
        )
    spec = PackingSpec(seq_len=N, max_images=2, image_size=IMAGE_SIZE, tokens_per_image=patches,
                       image_id=IMAGE_ID)  # fmt: skip
    rows = list(pack_samples(samples, spec))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def test_multimodal_chunked_loss_equals_the_plain_loss():
    # Cross-attention fusion: the images reach the loss through the gated blocks; early fusion
    # shares the same head path (MultimodalLM.lm.logits) and is not compiled again here.
    transformer = dataclasses.replace(TRANSFORMER, cross_attention_every=1)
    model = MultimodalLM(MultimodalConfig(
        vocab_size=V, embed_dim=E, transformer=transformer, vision=VISION, fusion="cross_attention",
        freeze_vision=False,
    ))  # fmt: skip
    batch = _multimodal_batch()
    inputs = {k: batch[k] for k in ("segment_ids", "positions", "images", "image_slot")}
    variables = jax.jit(model.init)(
        jax.random.key(0), batch["tokens"], image_patch=batch["image_patch"], **inputs
    )
    params = strip_boxes(variables["params"])
    for name, block in params["lm"]["decoder"].items():  # open the gates: images reach the loss
        if name.startswith("cross_attention"):
            block["attention_gate"] = block["mlp_gate"] = jnp.float32(0.5)
    (want, want_count), want_grads = _grads_of(multimodal_loss_fn(model), params, batch)
    (got, got_count), got_grads = _grads_of(
        multimodal_loss_fn(model, loss_chunk_size=4), params, batch
    )
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    assert float(got_count) == float(want_count) > 0
    _assert_trees_close(got_grads, want_grads)
    assert np.abs(np.asarray(got_grads["vision"]["patch_embedding"]["kernel"])).max() > 0


def test_semi_causal_chunked_loss_and_heldout_equal_the_plain_ones():
    config = SemiCausalConfig(
        vocab_size=V, embed_dim=E, decoder=TRANSFORMER, encoder=TRANSFORMER, encoder_embed_dim=E,
        max_spans=2, max_span_length=4, tie_embeddings=False,
    )  # fmt: skip
    model = SemiCausalLM(config)
    batch = _text_batch()
    batch["span_ids"] = jnp.asarray(
        [[0, 1, 1, 1, 0, 0, 0, 0, 2, 2, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    )
    inputs = {k: batch[k] for k in ("segment_ids", "positions", "span_ids")}
    init = jax.jit(model.init)
    params = strip_boxes(init(jax.random.key(0), batch["tokens"], **inputs)["params"])
    (want, want_count), want_grads = _grads_of(semi_causal_loss_fn(model), params, batch)
    (got, got_count), got_grads = _grads_of(
        semi_causal_loss_fn(model, loss_chunk_size=3), params, batch
    )
    np.testing.assert_allclose(float(got), float(want), rtol=RTOL)
    assert float(got_count) == float(want_count) > 0
    _assert_trees_close(got_grads, want_grads)
    heldout = make_heldout_loss(model, loss_chunk_size=3)(params, [batch])
    np.testing.assert_allclose(heldout, make_heldout_loss(model)(params, [batch]), rtol=RTOL)


def test_compiled_chunked_loss_never_holds_the_float32_logits():
    """Temp bytes of the compiled loss + gradient, B=2, N=512, V=32768, E=64, chunks of 64.

    The [B, N, V] float32 logits are 128 MiB. Measured on the CPU backend: plain 640 MiB (the
    logits, their softmax and gradient), chunked 64.5 MiB (one chunk's 16 MiB logits and
    their gradient); without ``jax.checkpoint`` the chunked loss would keep every chunk's
    logits for the backward pass (176 MiB) and fail both bounds.
    """
    batch, length, vocab, width = 2, 512, 32768, 64
    logits_bytes = batch * length * vocab * 4

    def project(w, h):
        return jnp.einsum("bne,ve->bnv", h, w, preferred_element_type=jnp.float32)

    def plain(h, w, t, m):
        return cross_entropy_loss(project(w, h), t, m)[0]

    def chunked(h, w, t, m):
        return chunked_cross_entropy_loss(h, lambda x: project(w, x), t, m, chunk_size=64)[0]

    args = (
        jax.ShapeDtypeStruct((batch, length, width), jnp.float32),
        jax.ShapeDtypeStruct((vocab, width), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.float32),
    )

    def temp_bytes(loss):
        compiled = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*args).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain_bytes, chunked_bytes = temp_bytes(plain), temp_bytes(chunked)
    assert plain_bytes >= logits_bytes
    assert chunked_bytes < logits_bytes
    assert chunked_bytes < plain_bytes / 4
