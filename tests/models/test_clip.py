"""CLIPModel: embeddings, padding-invariant captions, clipped scale, a drop-in LLaVA tower."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import TransformerConfig, ViTConfig
from mllm_jax.models.clip import CLIPConfig, CLIPModel
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.sharding import strip_boxes

SIZE, VOCAB = 16, 20
VISION = ViTConfig(image_size=SIZE, patch_size=8, width=16, num_layers=2, num_heads=2, mlp_dim=32)


def _config(**overrides):
    base = dict(vision=VISION, vocab_size=VOCAB, embed_dim=8, text_width=16, text_heads=2,
                text_mlp_dim=32)  # fmt: skip
    return CLIPConfig(**(base | overrides))


def _inputs(batch=3, length=5):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, SIZE, SIZE, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(1, VOCAB, size=(batch, length)), jnp.int32)
    mask = jnp.asarray(np.arange(length)[None] < np.array([[3], [5], [1]])[:batch])
    return images, jnp.where(mask, tokens, 0), mask


def _init(model, images, tokens, mask):
    return strip_boxes(jax.jit(model.init)(jax.random.key(0), images, tokens, mask)["params"])


def _apply(model, method=None):
    """Jitted ``apply`` (one compile instead of op-by-op dispatch)."""
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=method))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embeddings_are_unit_norm_and_match_the_separate_methods(pooling):
    vision = dataclasses.replace(VISION, use_cls_token=pooling == "cls")
    model = CLIPModel(_config(vision=vision, image_pooling=pooling))
    images, tokens, mask = _inputs()
    params = _init(model, images, tokens, mask)
    image_emb, text_emb, scale = _apply(model)(params, images, tokens, mask)
    assert image_emb.shape == text_emb.shape == (3, 8)
    np.testing.assert_allclose(np.linalg.norm(image_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(text_emb, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    alone = _apply(model, "embed_images")(params, images)
    np.testing.assert_allclose(alone, image_emb, rtol=1e-5, atol=1e-6)
    # Different images give different embeddings (the tower is not ignored).
    assert not np.allclose(image_emb[0], image_emb[1])


def test_caption_embedding_ignores_padding():
    model = CLIPModel(_config())
    images, tokens, mask = _inputs()
    params = _init(model, images, tokens, mask)
    embed = _apply(model, "embed_texts")
    short = embed(params, tokens[:, :3], mask[:, :3])
    junk_padding = jnp.concatenate([tokens, jnp.full((3, 4), 7, jnp.int32)], axis=1)
    longer = embed(params, junk_padding, jnp.concatenate([mask, jnp.zeros((3, 4), bool)], axis=1))
    np.testing.assert_allclose(short[0], longer[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(short[2], longer[2], rtol=1e-5, atol=1e-6)


def test_bag_of_embeddings_text_tower_when_text_layers_is_zero():
    model = CLIPModel(_config(text_layers=0))
    images, tokens, mask = _inputs()
    params = _init(model, images, tokens, mask)
    assert not any(name.startswith("text_layers") for name in params)
    # Order of the real tokens does not matter without blocks.
    swapped = tokens.at[0, :3].set(tokens[0, :3][::-1])
    embed = _apply(model, "embed_texts")
    a, b = embed(params, tokens, mask), embed(params, swapped, mask)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)


def test_logit_scale_is_clipped_at_its_maximum():
    model = CLIPModel(_config(max_logit_scale=100.0))
    images, tokens, mask = _inputs()
    params = _init(model, images, tokens, mask)
    params = {**params, "logit_scale": jnp.asarray(math.log(1000.0))}
    scale = model.apply({"params": params}, method=lambda m: m.logit_scale())
    np.testing.assert_allclose(float(scale), 100.0, rtol=1e-5)


def test_vision_params_drop_into_a_multimodal_lm():
    model = CLIPModel(_config())
    images, tokens, mask = _inputs()
    clip_params = _init(model, images, tokens, mask)
    lm_config = MultimodalConfig(
        vocab_size=32,
        embed_dim=16,
        vision=VISION,
        transformer=TransformerConfig(
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32
        ),
    )
    llava = MultimodalLM(lm_config)
    abstract = jax.eval_shape(
        lambda r: llava.init(r, images[:, None], method=lambda m, x: m.encode_images(x)),
        jax.random.key(1),
    )
    shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, strip_boxes(tree))  # noqa: E731
    assert shapes(abstract["params"]["vision"]) == shapes(clip_params["vision"])
    features = lambda m, x: m.vision(x, (-2,), drop_cls=True)  # noqa: E731
    hidden = jax.jit(lambda p, x: llava.apply({"params": {"vision": p}}, x, method=features))(
        clip_params["vision"], images
    )
    expected = _apply(model, features)(clip_params, images)
    np.testing.assert_allclose(hidden[0], expected[0], rtol=1e-6)


def test_config_rejects_cls_pooling_without_a_cls_token():
    with pytest.raises(ValueError, match="use_cls_token"):
        _config(vision=dataclasses.replace(VISION, use_cls_token=False), image_pooling="cls")
    with pytest.raises(ValueError, match="image_pooling"):
        _config(image_pooling="max")
