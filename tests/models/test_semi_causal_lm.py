"""SemiCausalLM (METALM): Eq. 1 targets, who attends to whom, span inputs = connector outputs,
gradient paths into the encoder, vision-language spans, and (2,2,2) sharding == one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import base
from mllm_jax import sharding
from mllm_jax.layers import TransformerConfig, ViTConfig
from mllm_jax.layers.masks import make_attention_mask
from mllm_jax.layers.transformer import DecoderStack
from mllm_jax.models.semi_causal_lm import (
    Connector,
    SemiCausalConfig,
    SemiCausalLM,
    span_mask_ar,
    span_target_mask,
)

V, N = 32, 10
# SPEC §4's example: n = 10, spans [2, 4) and [6, 7).
SPANS = np.array([[0, 0, 1, 1, 0, 0, 2, 0, 0, 0]], np.int32)
ENCODER_PARAMS = ("encoder_embedder", "encoder", "connector")

CONFIG = SemiCausalConfig(
    vocab_size=V,
    embed_dim=16,
    decoder=TransformerConfig(num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32),
    encoder=TransformerConfig(num_layers=1, num_heads=2, num_kv_heads=2, head_dim=6, mlp_dim=24),
    encoder_embed_dim=12,
    connector_layers=2,
    connector_hidden_dim=20,
    max_spans=3,
    max_span_length=4,
)


def _inputs(tokens, spans, segments=None):
    segments = np.ones_like(tokens) if segments is None else segments
    positions = np.zeros_like(tokens)
    for row in range(len(tokens)):
        for k in range(1, len(tokens[row])):
            same = segments[row, k] == segments[row, k - 1]
            positions[row, k] = positions[row, k - 1] + 1 if same else 0
    return dict(
        segment_ids=jnp.asarray(segments), positions=jnp.asarray(positions),
        span_ids=jnp.asarray(spans),
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(3, V, (1, N)), jnp.int32)


@pytest.fixture(scope="module")
def models_and_params(tokens):
    out = {}
    for mode in ("causal", "prefix", "semi_causal"):
        model = SemiCausalLM(dataclasses.replace(CONFIG, mode=mode))
        params = model.init(jax.random.key(1), tokens, **_inputs(tokens, SPANS))["params"]
        out[mode] = (model, sharding.strip_boxes(params))
    return out


def test_eq1_targets_of_the_spec_example():
    mask = np.asarray(span_target_mask(jnp.asarray(SPANS)))[0]
    # Position p predicts x_{p+1}; the last position predicts nothing (no x_10).
    predicted = [p + 1 for p in range(N - 1) if mask[p]]
    assert predicted == [1, 2, 4, 5, 6, 7, 8, 9]  # x_2, x_4 (after span 1), x_6, x_7 count


def test_prefix_mode_mask_makes_each_span_one_bidirectional_block():
    mask = np.asarray(make_attention_mask(span_mask_ar(jnp.asarray(SPANS))))[0, 0]
    assert mask[2, 3] and mask[3, 2]  # inside span 1: both ways
    assert not mask[1, 2] and not mask[4, 5]  # causal elsewhere
    assert mask[6, 3] and not mask[3, 6]
    expected = np.tril(np.ones((N, N), bool))
    expected[2, 3] = True
    np.testing.assert_array_equal(mask, expected)


_APPLY = {}


def _changed_positions(model, params, tokens, position):
    if model.config.mode not in _APPLY:  # one compile per mode
        kwargs = _inputs(np.asarray(tokens), SPANS)
        _APPLY[model.config.mode] = jax.jit(lambda p, t: model.apply({"params": p}, t, **kwargs))
    apply = _APPLY[model.config.mode]
    changed = tokens.at[0, position].set((tokens[0, position] + 1) % V)
    diff = np.abs(np.asarray(apply(params, changed) - apply(params, tokens))).max(axis=-1)[0]
    return np.flatnonzero(diff > 1e-6).tolist()


@pytest.mark.parametrize(
    "mode, position, expected",
    [
        ("causal", 3, list(range(3, N))),
        ("prefix", 3, list(range(2, N))),  # position 2 sees 3 inside the decoder
        ("semi_causal", 3, list(range(2, N))),  # the encoder hands 3's influence to input 2
        ("semi_causal", 2, list(range(2, N))),
        ("semi_causal", 6, list(range(6, N))),  # span 2 is one token: nothing earlier
        ("semi_causal", 5, list(range(5, N))),
    ],
)
def test_a_token_influences_exactly_the_positions_that_may_attend_to_it(
    models_and_params, tokens, mode, position, expected
):
    model, params = models_and_params[mode]
    assert _changed_positions(model, params, tokens, position) == expected


def _reference_span_encoding(params, tokens, start, end):
    """The encoder run on the span's tokens alone, then the connector."""
    cfg = CONFIG
    x = params["encoder_embedder"]["embedding"][tokens[:, start:end]]
    length = end - start
    mask = jnp.ones((1, 1, length, length), bool)
    hidden = DecoderStack(cfg.encoder).apply(
        {"params": params["encoder"]}, x, mask, jnp.arange(length)[None]
    )
    connector = Connector(cfg.embed_dim, cfg.connector_layers, cfg.connector_hidden_dim)
    return connector.apply({"params": params["connector"]}, hidden)[0]


def test_span_decoder_inputs_are_the_connector_outputs_of_each_span_alone(
    models_and_params, tokens
):
    model, params = models_and_params["semi_causal"]
    inputs = model.apply(
        {"params": params}, tokens, jnp.asarray(SPANS), method=model.decoder_inputs
    )[0]
    for start, end in ((2, 4), (6, 7)):
        np.testing.assert_allclose(
            inputs[start:end], _reference_span_encoding(params, tokens, start, end),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
    outside = np.array([0, 1, 4, 5, 7, 8, 9])
    embedding = params["lm"]["embedder"]["embedding"]
    np.testing.assert_array_equal(inputs[outside], embedding[tokens[0, outside]])


def test_packed_rows_encode_spans_per_segment(models_and_params):
    model, params = models_and_params["semi_causal"]
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(3, V, (2, 12)), jnp.int32)
    segments = np.array([[1] * 5 + [2] * 7, [1] * 12])
    spans = np.array([[0, 1, 1, 1, 0, 2, 2, 0, 3, 3, 3, 3], [1, 1, 0] + [0] * 9])
    inputs = model.apply(
        {"params": params}, tokens, jnp.asarray(spans), method=model.decoder_inputs
    )
    for row, start, end in ((0, 1, 4), (0, 5, 7), (0, 8, 12), (1, 0, 2)):
        np.testing.assert_allclose(
            inputs[row, start:end],
            _reference_span_encoding(params, tokens[row : row + 1], start, end),
            rtol=1e-5, atol=1e-6,
        )  # fmt: skip
    # Segment 2's logits do not move when segment 1's span changes.
    kwargs = _inputs(np.asarray(tokens), spans, segments)
    logits = model.apply({"params": params}, tokens, **kwargs)
    changed = model.apply(
        {"params": params}, tokens.at[0, 2].set(tokens[0, 2] % (V - 1) + 1), **kwargs
    )
    np.testing.assert_array_equal(changed[0, 5:], logits[0, 5:])
    assert np.abs(np.asarray(changed[0, 1:5] - logits[0, 1:5])).max() > 1e-6


def _encoder_grads(model, params, tokens, loss_positions):
    weights = jnp.zeros((1, N)).at[0, jnp.asarray(loss_positions)].set(1.0)
    targets = jnp.roll(tokens, -1, axis=1)
    kwargs = _inputs(np.asarray(tokens), SPANS)

    def loss(p):
        logits = model.apply({"params": p}, tokens, **kwargs)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights * span_target_mask(jnp.asarray(SPANS)))

    grads = jax.grad(loss)(params)
    return [
        np.asarray(g) for name in ENCODER_PARAMS for g in jax.tree_util.tree_leaves(grads[name])
    ]


def test_encoder_gradient_comes_only_from_positions_after_a_span_starts(models_and_params, tokens):
    model, params = models_and_params["semi_causal"]
    # Positions 0 and 1 predict x_1 and x_2 (the first token of span 1) from before the span.
    before = _encoder_grads(model, params, tokens, [0, 1])
    assert all(np.all(g == 0.0) for g in before)
    # Position 3, the span's last, predicts x_4: its gradient reaches the encoder.
    after = _encoder_grads(model, params, tokens, [3])
    assert sum(float(np.abs(g).sum()) for g in after) > 0


VL_CONFIG = dataclasses.replace(
    CONFIG,
    max_span_length=8,
    vision=ViTConfig(
        image_size=16, patch_size=8, width=12, num_layers=1, num_heads=2, mlp_dim=24,
    ),
)  # fmt: skip


def test_vision_language_span_encodes_image_and_text_prefix_together():
    model = SemiCausalLM(VL_CONFIG)
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(3, V, (1, N)), jnp.int32)
    # BOS, four image tokens, a 2-token text prefix: one span; the decoder predicts the rest.
    spans = np.array([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    image_slot = jnp.asarray([[-1, 0, 0, 0, 0, -1, -1, -1, -1, -1]])
    image_patch = jnp.asarray([[-1, 0, 1, 2, 3, -1, -1, -1, -1, -1]])
    images = jnp.asarray(rng.normal(size=(1, 1, 16, 16, 3)), jnp.float32)
    kwargs = dict(images=images, image_slot=image_slot, image_patch=image_patch)
    params = model.init(jax.random.key(2), tokens, **_inputs(tokens, spans), **kwargs)["params"]
    params = sharding.strip_boxes(params)

    def inputs(imgs, toks=tokens):
        return model.apply(
            {"params": params}, toks, jnp.asarray(spans), imgs, image_slot, image_patch,
            method=model.decoder_inputs,
        )[0]  # fmt: skip

    base_inputs = inputs(images)
    moved = np.abs(np.asarray(inputs(images * 2.0) - base_inputs)).max(axis=-1)
    # The image reaches every span position (text prefix included) and nothing else.
    assert np.all(moved[:7] > 1e-6) and np.all(moved[7:] == 0.0)
    prefix_changed = inputs(images, tokens.at[0, 6].set((tokens[0, 6] + 1) % V))
    assert np.abs(np.asarray(prefix_changed - base_inputs))[1:5].max() > 1e-6


def test_semi_causal_mode_needs_an_encoder():
    with pytest.raises(ValueError, match="encoder"):
        dataclasses.replace(CONFIG, encoder=None)
    with pytest.raises(ValueError, match="mode"):
        dataclasses.replace(CONFIG, mode="bidirectional")


def test_sharded_forward_and_gradients_match_one_device(devices, models_and_params):
    model, params = models_and_params["semi_causal"]
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(3, V, (4, 12)), jnp.int32)
    segments = np.array([[1] * 12, [1] * 6 + [2] * 6, [1] * 12, [1] * 9 + [0] * 3])
    spans = np.array(
        [
            [0, 1, 1, 1, 1, 0, 0, 2, 2, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 2, 2, 2, 0, 3, 0],
            [0] * 12,
            [0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        ]
    )
    batch = dict(tokens=tokens, **_inputs(np.asarray(tokens), spans, segments))
    targets = jnp.roll(tokens, -1, axis=1)
    weights = span_target_mask(batch["span_ids"]) & (batch["segment_ids"] > 0)

    def loss(p, b):
        logits = model.apply({"params": p}, b["tokens"], segment_ids=b["segment_ids"],
                             positions=b["positions"], span_ids=b["span_ids"])  # fmt: skip
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (ref_loss, ref_logits), ref_grads = grad_fn(params, batch)

    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.logical_rules_from_config(base.LOGICAL_AXIS_RULES)
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(1), tokens, **_inputs(np.asarray(tokens), spans))
    )["params"]
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("act_batch"), mesh,
                                                 rules)  # fmt: skip
    with sharding.mesh_context(mesh, rules):
        (loss_value, logits), grads = grad_fn(
            jax.device_put(params, shardings), jax.device_put(batch, batch_sharding)
        )
    kernel = jax.device_put(params, shardings)["encoder"]["layers_0"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(float(loss_value), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    for path, ref in jax.tree_util.tree_leaves_with_path(ref_grads):
        np.testing.assert_allclose(
            np.asarray(flat[path]), np.asarray(ref), rtol=1e-3, atol=1e-5,
            err_msg=jax.tree_util.keystr(path),
        )  # fmt: skip
    assert float(np.abs(ref_grads["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]).sum()) > 0
