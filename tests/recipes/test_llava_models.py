"""The recipe's model configs: ``model.dtype`` reaches the ViT and the VCE, not only the LM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import llava_vce
from mllm_jax.models.multimodal_lm import MultimodalLM
from mllm_jax.recipes import llava_models


def _model_and_params(dtype: str):
    config = llava_vce.get_config("size=test")
    config.model.dtype = dtype
    mm_config = llava_models.multimodal_config(config, with_adapter=True)
    model = MultimodalLM(mm_config)
    size = config.data.image_size
    images = jax.random.uniform(jax.random.key(1), (2, 1, size, size, 3))
    tokens = jnp.zeros((1, 8), jnp.int32)
    minus_one = jnp.full((1, 8), -1, jnp.int32)
    params = model.init(
        jax.random.key(0), tokens, segment_ids=tokens, positions=tokens, images=images[:1],
        image_slot=minus_one, image_patch=minus_one,
    )["params"]  # fmt: skip
    return mm_config, model, jax.tree_util.tree_map(np.asarray, params), images


def test_bfloat16_computes_the_vision_path_in_bfloat16_with_float32_params():
    mm_config, model, params, images = _model_and_params("bfloat16")
    assert mm_config.vision.dtype == jnp.bfloat16 and mm_config.vce.dtype == jnp.bfloat16
    assert mm_config.transformer.dtype == jnp.bfloat16
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {np.dtype("float32")}
    tokens = model.apply({"params": params}, images, method=MultimodalLM.encode_images)
    assert tokens.dtype == jnp.bfloat16

    # The same params in float32: the bfloat16 image tokens agree to bfloat16 precision
    # (8 mantissa bits, several layers deep: 5% of the tokens' scale).
    _, model32, _, _ = _model_and_params("float32")
    reference = model32.apply({"params": params}, images, method=MultimodalLM.encode_images)
    assert reference.dtype == jnp.float32
    error = np.abs(np.asarray(tokens, np.float32) - np.asarray(reference))
    assert error.max() < 0.05 * np.abs(np.asarray(reference)).max()
    assert error.max() > 0  # it really did compute in a lower precision


def test_an_unknown_dtype_is_rejected_naming_the_field():
    config = llava_vce.get_config("size=test")
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        llava_models.vit_config(config)
