"""MultimodalLM: image tokens at their placeholders, fusion modes, frozen parts, generation."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mllm_jax.data.packing import PackableSample, PackingSpec, pack_samples
from mllm_jax.layers import TransformerConfig, VCEConfig, ViTConfig
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import is_adapter_param
from mllm_jax.layers.vit import VisionTransformer
from mllm_jax.models import DecoderLM
from mllm_jax.models.generation import generate, left_pad
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.sharding import strip_boxes
from mllm_jax.train.partition import combine_params, partition_params

IMAGE_ID, V, E, SIZE = 4, 48, 16, 16
VISION = ViTConfig(image_size=SIZE, patch_size=8, width=16, num_layers=2, num_heads=2, mlp_dim=32)
LM = TransformerConfig(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)
P = 4  # 2 x 2 patches


def _config(**overrides):
    base = dict(vocab_size=V, embed_dim=E, transformer=LM, vision=VISION)
    return MultimodalConfig(**(base | overrides))


def _batch(num_images_per_sample=(1, 0, 3), seq_len=40, slots=4):
    rng = np.random.default_rng(0)
    samples = []
    for i, count in enumerate(num_images_per_sample):
        text = rng.integers(5, V, size=3 + i)
        tokens = np.concatenate([[2], np.full(count * P, IMAGE_ID), text]).astype(np.int32)
        supervised = np.zeros(len(tokens), bool)
        supervised[-2:] = True
        images = rng.normal(size=(count, SIZE, SIZE, 3)).astype(np.float32)
        samples.append(
            PackableSample(id=str(i), tokens=tokens, supervised=supervised, images=images)
        )
    spec = PackingSpec(seq_len=seq_len, max_images=slots, image_size=SIZE, tokens_per_image=P,
                       image_id=IMAGE_ID)  # fmt: skip
    rows = list(pack_samples(samples, spec))
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def _model_inputs(batch):
    keys = ("segment_ids", "positions", "images", "image_slot", "image_patch")
    return {k: batch[k] for k in keys}


def _init(model, batch):
    variables = jax.jit(model.init)(
        jax.random.key(0, impl="rbg"), batch["tokens"], **_model_inputs(batch)
    )
    return strip_boxes(variables["params"])


@pytest.mark.parametrize("projector", ["mlp", "vce"])
def test_each_image_token_lands_at_its_placeholder(projector):
    vce = VCEConfig(level_indices=(-1, -2), num_heads=2) if projector == "vce" else None
    model = MultimodalLM(_config(projector=projector, vce=vce))
    batch = _batch()  # one row: samples with 1, 0 and 3 images packed together
    assert batch["tokens"].shape[0] == 1 and int(batch["segment_ids"].max()) == 3
    params = _init(model, batch)
    apply = lambda method, *args: model.apply({"params": params}, *args, method=method)  # noqa: E731
    merged = np.asarray(apply(model.input_embeddings, batch["tokens"], batch["images"],
                              batch["image_slot"], batch["image_patch"]))  # fmt: skip
    image_tokens = np.asarray(apply(model.encode_images, batch["images"]))
    text = np.asarray(apply(lambda m, t: m.lm.embed(t), batch["tokens"]))
    slots, patches = np.asarray(batch["image_slot"]), np.asarray(batch["image_patch"])
    assert sorted(set(slots[0]) - {-1}) == [0, 1, 2, 3]
    for t in range(batch["tokens"].shape[1]):
        expected = image_tokens[0, slots[0, t], patches[0, t]] if slots[0, t] >= 0 else text[0, t]
        np.testing.assert_array_equal(merged[0, t], expected)
    # The images of different slots really are different tokens.
    assert not np.allclose(image_tokens[0, 0], image_tokens[0, 1])


def test_cross_attention_fusion_starts_as_the_text_only_lm():
    transformer = dataclasses.replace(LM, cross_attention_every=1)
    model = MultimodalLM(_config(fusion="cross_attention", transformer=transformer))
    batch = _batch()
    params = _init(model, batch)
    assert {"cross_attention_0", "cross_attention_1"} <= set(params["lm"]["decoder"])
    logits = model.apply({"params": params}, batch["tokens"], **_model_inputs(batch))
    text_lm = DecoderLM(vocab_size=V, embed_dim=E, transformer=LM)
    lm_params = dict(params["lm"])
    lm_params["decoder"] = {
        k: v for k, v in params["lm"]["decoder"].items() if not k.startswith("cross")
    }
    expected = text_lm.apply(
        {"params": lm_params},
        batch["tokens"],
        input_mask=batch["segment_ids"] > 0,
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
    )
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # Opening a gate makes the images matter.
    opened = jax.tree_util.tree_map(lambda a: a, params)
    opened["lm"]["decoder"]["cross_attention_0"]["attention_gate"] = jnp.float32(1.0)
    changed = model.apply({"params": opened}, batch["tokens"], **_model_inputs(batch))
    assert np.abs(np.asarray(changed) - np.asarray(logits)).max() > 1e-4


def _reference_pooled_images(params, images):
    """[K, H, W, 3] -> [K, E] float64: penultimate ViT patch states -> LLaVA MLP -> mean."""
    (hidden,) = VisionTransformer(VISION).apply({"params": params["vision"]}, images, (-2,))
    fc1, fc2 = params["projector"]["fc1"], params["projector"]["fc2"]
    h = np.asarray(hidden, np.float64) @ np.asarray(fc1["kernel"]) + np.asarray(fc1["bias"])
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return (h @ np.asarray(fc2["kernel"]) + np.asarray(fc2["bias"])).mean(axis=1)


def _reference_text_states(params, tokens, positions=None):
    """[K, L] ids (all real tokens) -> [K, L, E] float64 final states of the text LM alone."""
    lm = DecoderLM(vocab_size=V, embed_dim=E, transformer=LM)
    hidden = lambda m, t: m.hidden_states(m.embed(t), positions=positions)  # noqa: E731
    states = lm.apply({"params": params["lm"]}, jnp.asarray(tokens), method=hidden)
    return np.asarray(states, np.float64)


def _reference_embedding(pooled, head):
    projected = pooled @ np.asarray(head["kernel"], np.float64)
    return projected / np.linalg.norm(projected, axis=-1, keepdims=True)


@pytest.mark.parametrize("fusion", ["late", "joint"])
def test_contrastive_embeddings_match_a_reference_pool_project_normalise(fusion):
    model = MultimodalLM(_config(fusion=fusion, contrastive_dim=8))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(3, SIZE, SIZE, 3)), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(5, V, size=(3, 6)), jnp.int32)
    mask = jnp.ones((3, 6), bool).at[2, 4:].set(False)
    variables = model.init(jax.random.key(0, impl="rbg"), images, tokens, mask,
                           method=model.contrastive_embeddings)  # fmt: skip
    image_emb, text_emb, scale = model.apply(
        variables, images, tokens, mask, method=model.contrastive_embeddings
    )
    params = strip_boxes(variables["params"])
    assert image_emb.shape == text_emb.shape == (3, 8)
    expected_image = _reference_embedding(_reference_pooled_images(params, images),
                                          params["image_head"])  # fmt: skip
    # Each caption alone, without its padding: a padded row must pool only its real tokens.
    pooled_text = np.stack(
        [_reference_text_states(params, tokens[i : i + 1, : int(mask[i].sum())])[0].mean(0)
         for i in range(3)]
    )  # fmt: skip
    expected_text = _reference_embedding(pooled_text, params["text_head"])
    np.testing.assert_allclose(image_emb, expected_image, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(text_emb, expected_text, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    # The padding matters: pooling it too would give another embedding.
    padded = _reference_text_states(params, tokens[2:])[0].mean(0)
    assert not np.allclose(
        _reference_embedding(padded, params["text_head"]), text_emb[2], atol=1e-3
    )
    if fusion == "late":
        with pytest.raises(ValueError, match="late fusion"):
            model.apply(variables, tokens, **_model_inputs(_batch()))


def _joint_batch():
    """Two rows, three slots: row 0 holds a 1-image and a text-only sample, row 1 a 2-image one."""
    batch = _batch((1, 0, 2), seq_len=20, slots=3)
    assert np.asarray(batch["segment_ids"]).max(axis=1).tolist() == [2, 1]
    return batch


def _early_params(joint_params):
    return {k: v for k, v in joint_params.items() if k in ("vision", "projector", "lm")}


def test_joint_fusion_is_early_fusion_plus_reference_contrastive_pairs():
    model = MultimodalLM(_config(fusion="joint", contrastive_dim=8))
    batch = _joint_batch()
    params = _init(model, batch)  # through __call__, which must create the heads too
    assert set(params) == {"vision", "projector", "lm", "image_head", "text_head", "logit_scale"}
    out = model.apply({"params": params}, batch["tokens"], **_model_inputs(batch),
                      method=model.joint_outputs)  # fmt: skip
    early = MultimodalLM(_config())
    early_logits = early.apply({"params": _early_params(params)}, batch["tokens"],
                               **_model_inputs(batch))  # fmt: skip
    np.testing.assert_allclose(out.logits, early_logits, rtol=1e-5, atol=1e-6)
    called = model.apply({"params": params}, batch["tokens"], **_model_inputs(batch))
    np.testing.assert_allclose(called, early_logits, rtol=1e-5, atol=1e-6)

    tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    slots, positions = np.asarray(batch["image_slot"]), np.asarray(batch["positions"])
    assert out.image_embeddings.shape == out.text_embeddings.shape == (2, 3, 8)
    pair_ids = np.asarray(out.pair_ids)
    assert pair_ids[0, 1] == pair_ids[0, 2] == pair_ids[1, 2] == -1
    assert pair_ids[1, 0] == pair_ids[1, 1] != pair_ids[0, 0] >= 0
    for b in range(2):
        for m in range(3):
            holders = segments[b][slots[b] == m]
            if not len(holders):  # an empty slot
                np.testing.assert_array_equal(out.image_embeddings[b, m], 0.0)
                np.testing.assert_array_equal(out.text_embeddings[b, m], 0.0)
                continue
            pooled = _reference_pooled_images(params, batch["images"][b, m : m + 1])
            expected = _reference_embedding(pooled, params["image_head"])[0]
            np.testing.assert_allclose(out.image_embeddings[b, m], expected, atol=1e-5)
            # The sample's text tokens alone, at their packed positions: the text half never
            # sees an image, not even its placeholders.
            text = (segments[b] == holders[0]) & (slots[b] < 0)
            states = _reference_text_states(params, tokens[b][text][None],
                                            jnp.asarray(positions[b][text][None]))  # fmt: skip
            expected = _reference_embedding(states[0].mean(0), params["text_head"])
            np.testing.assert_allclose(out.text_embeddings[b, m], expected, atol=1e-5)

    # Other images move the logits and the image embeddings, never the text embeddings.
    other = model.apply({"params": params}, batch["tokens"],
                        **(_model_inputs(batch) | {"images": batch["images"][:, ::-1]}),
                        method=model.joint_outputs)  # fmt: skip
    np.testing.assert_allclose(other.text_embeddings, out.text_embeddings, rtol=1e-6, atol=1e-7)
    assert np.abs(np.asarray(other.image_embeddings - out.image_embeddings)).max() > 1e-3
    assert np.abs(np.asarray(other.logits - out.logits)).max() > 1e-4


def _pair_contrastive_loss(out):
    """Symmetric InfoNCE over the filled slots; slots of one sample are each other's positives."""
    ids = out.pair_ids.reshape(-1)
    filled = ids >= 0
    logits = (
        out.logit_scale
        * out.image_embeddings.reshape(ids.shape[0], -1)
        @ (out.text_embeddings.reshape(ids.shape[0], -1).T)
    )
    positives = (ids[:, None] == ids[None, :]) & filled[:, None] & filled[None, :]

    def rows(scores):
        logp = jax.nn.log_softmax(jnp.where(filled[None, :], scores, -1e9), axis=-1)
        return -jax.nn.logsumexp(jnp.where(positives, logp, -1e9), axis=-1)

    return jnp.sum(jnp.where(filled, rows(logits) + rows(logits.T), 0)) / (2 * filled.sum())


def test_joint_objective_trains_the_lm_and_the_contrastive_heads():
    model = MultimodalLM(_config(fusion="joint", contrastive_dim=8))
    batch = _joint_batch()
    params = _init(model, batch)

    def losses(all_params):
        out = model.apply({"params": all_params}, batch["tokens"], **_model_inputs(batch),
                          method=model.joint_outputs)  # fmt: skip
        logp = jax.nn.log_softmax(out.logits)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        lm_loss = jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
        return lm_loss, _pair_contrastive_loss(out)

    norm = lambda tree: float(optax.tree.norm(tree))  # noqa: E731
    lm_grads = jax.grad(lambda p: losses(p)[0])(params)
    contrastive_grads = jax.grad(lambda p: losses(p)[1])(params)
    joint_grads = jax.grad(lambda p: sum(losses(p)))(params)
    # Empty slots are zero vectors: their gradient must stay finite.
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(joint_grads))
    for name in ("image_head", "text_head", "logit_scale"):
        assert norm(lm_grads[name]) == 0.0 and norm(contrastive_grads[name]) > 0
    for name in ("projector", "lm"):
        assert norm(lm_grads[name]) > 0 and norm(contrastive_grads[name]) > 0
    assert norm(joint_grads["vision"]) == 0.0  # frozen tower
    summed = jax.tree_util.tree_map(lambda a, b: a + b, lm_grads, contrastive_grads)
    for got, want in zip(jax.tree_util.tree_leaves(joint_grads),
                         jax.tree_util.tree_leaves(summed), strict=True):  # fmt: skip
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_joint_fusion_rejects_configs_and_calls_that_do_not_fit():
    with pytest.raises(ValueError, match="cross_attention_every"):
        _config(fusion="joint", transformer=dataclasses.replace(LM, cross_attention_every=1))
    with pytest.raises(ValueError, match="contrastive_dim >= 1"):
        _config(fusion="joint", contrastive_dim=0)
    with pytest.raises(ValueError, match="not one of"):
        _config(fusion="hybrid")
    early = MultimodalLM(_config())
    batch = _batch((1,), seq_len=12, slots=1)
    params = _init(early, batch)
    with pytest.raises(ValueError, match="joint_outputs needs fusion='joint'"):
        early.apply({"params": params}, batch["tokens"], **_model_inputs(batch),
                    method=early.joint_outputs)  # fmt: skip
    with pytest.raises(ValueError, match="contrastive_embeddings needs fusion"):
        early.apply({"params": params}, batch["images"][:, 0], batch["tokens"],
                    batch["segment_ids"] > 0, method=early.contrastive_embeddings)  # fmt: skip


def test_only_the_trainable_parts_move_when_training_through_adapters():
    transformer = dataclasses.replace(LM, adapter=AdapterConfig(kind="dual_lora", rank=4))
    model = MultimodalLM(_config(transformer=transformer, freeze_vision=True))
    batch = _batch()
    params = _init(model, batch)
    is_trainable = lambda path: is_adapter_param(path) or path.startswith("projector/")  # noqa: E731
    trainable, frozen = partition_params(params, is_trainable)

    def loss_fn(all_params):
        logits = model.apply({"params": all_params}, batch["tokens"], **_model_inputs(batch))
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])

    # Frozen vision tower: no gradient reaches it even when asked for every parameter.
    full_grads = jax.grad(loss_fn)(params)
    vision_norm = optax.tree.norm(full_grads["vision"])
    assert float(vision_norm) == 0.0 and float(optax.tree.norm(full_grads["lm"])) > 0
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)
    for _ in range(3):
        grads = jax.grad(lambda t: loss_fn(combine_params(t, frozen)))(trainable)
        updates, opt_state = tx.update(grads, opt_state)
        trainable = optax.apply_updates(trainable, updates)
    new_params = combine_params(trainable, frozen)
    flat_old = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_new = dict(jax.tree_util.tree_flatten_with_path(new_params)[0])
    moved = set()
    for path, old in flat_old:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if not np.array_equal(old, flat_new[path]):
            moved.add(name)
    assert moved and all(is_trainable(n) for n in moved)
    assert any(n.startswith("projector/") for n in moved) and any("dual_lora" in n for n in moved)


def test_generation_with_an_image_in_the_prompt_matches_the_full_forward():
    model = MultimodalLM(_config())
    batch = _batch((1,), seq_len=12, slots=1)
    params = _init(model, batch)
    length = int((batch["segment_ids"][0] > 0).sum())
    prompt = {k: v[:, :length] for k, v in batch.items() if v.ndim == 2}
    embeddings = model.apply({"params": params}, prompt["tokens"], batch["images"],
                             prompt["image_slot"], prompt["image_patch"],
                             method=model.input_embeddings)  # fmt: skip
    lm = DecoderLM(vocab_size=V, embed_dim=E, transformer=LM)
    mask = jnp.ones((1, length), bool)
    result = generate(lm, params["lm"], embeddings, mask, max_new_tokens=4, eos_id=-1)
    tokens = np.concatenate([np.asarray(prompt["tokens"][0]), result.tokens[0]])[None]
    slot = np.concatenate([np.asarray(prompt["image_slot"][0]), -np.ones(4, int)])[None]
    patch = np.concatenate([np.asarray(prompt["image_patch"][0]), -np.ones(4, int)])[None]
    full = model.apply({"params": params}, jnp.asarray(tokens),
                       segment_ids=jnp.ones_like(jnp.asarray(tokens)),
                       positions=jnp.arange(tokens.shape[1])[None], images=batch["images"],
                       image_slot=jnp.asarray(slot), image_patch=jnp.asarray(patch))  # fmt: skip
    expected = np.asarray(full)[0, length - 1 : length + 3]
    np.testing.assert_allclose(result.logits[0], expected, rtol=1e-4, atol=1e-4)
    assert left_pad([[1, 2], [3]], 0)[0].tolist() == [[1, 2], [0, 3]]
