"""VisionTransformer against float64 numpy references: stride-p convolution, bilinear resizing of
the position grid (torch ``interpolate(bilinear, align_corners=False)`` semantics), pre-LN blocks
with full attention, and CLIP hidden-state numbering.

Tolerance: float32 library output vs float64 reference, rtol=1e-5, atol=1e-5.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.vit import (
    PooledVisionTransformer,
    VisionTransformer,
    ViTConfig,
    grid_shape,
    resize_position_grid,
)
from mllm_jax.sharding import strip_boxes

RTOL, ATOL = 1e-5, 1e-5
CONFIG = ViTConfig(
    image_size=(8, 12), patch_size=4, width=16, num_layers=3, num_heads=2, mlp_dim=24
)
GRID = (2, 3)
BATCH = 2


def random_params(module, *args, seed: int):
    """(boxed abstract params, random values): shapes from ``jax.eval_shape`` (nothing compiles),
    values N(0, 0.3²), norm scales 1 + N(0, 0.3²), so zero biases and unit scales matter too."""
    boxed = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.3 * rng.normal(size=leaf.shape)).astype(np.float32)

    return boxed, jax.tree_util.tree_map_with_path(fill, strip_boxes(boxed))


def images(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(BATCH, height, width, 3)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def ref_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    """Stride-p 'valid' convolution, kernel [p, p, C_in, C_out] -> [B, rows·cols, C_out]."""
    p = kernel.shape[0]
    batch, height, width, _ = x.shape
    rows, cols = (height - p) // stride + 1, (width - p) // stride + 1
    out = np.zeros((batch, rows * cols, kernel.shape[-1]))
    for b in range(batch):
        for i in range(rows):
            for j in range(cols):
                window = x[b, i * stride : i * stride + p, j * stride : j * stride + p]
                out[b, i * cols + j] = np.einsum("yxc,yxcd->d", window, kernel) + bias
    return out


def ref_resize_axis(size_in: int, size_out: int) -> list[tuple[int, int, float]]:
    """torch align_corners=False: src = (o + .5)·in/out - .5 clamped at 0; neighbours i0, i1."""
    taps = []
    for o in range(size_out):
        src = max((o + 0.5) * size_in / size_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), size_in - 1)
        i1 = min(i0 + 1, size_in - 1)
        taps.append((i0, i1, src - i0 if i1 != i0 else 0.0))
    return taps


def ref_resize(grid: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """[h, w, C] -> [h', w', C] separable bilinear."""
    out = np.zeros((*target, grid.shape[-1]))
    for oi, (r0, r1, fr) in enumerate(ref_resize_axis(grid.shape[0], target[0])):
        for oj, (c0, c1, fc) in enumerate(ref_resize_axis(grid.shape[1], target[1])):
            out[oi, oj] = (
                (1 - fr) * (1 - fc) * grid[r0, c0]
                + (1 - fr) * fc * grid[r0, c1]
                + fr * (1 - fc) * grid[r1, c0]
                + fr * fc * grid[r1, c1]
            )
    return out


def ref_layernorm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def ref_block(x: np.ndarray, p: dict, eps: float) -> np.ndarray:
    """Pre-LN block: x + Attn(LN(x)) with full attention and no RoPE; + GELU-MLP(LN(.))."""
    x = np.asarray(x, np.float64)
    h = ref_layernorm(x, p["pre_attention_norm"]["scale"], p["pre_attention_norm"]["bias"], eps)
    q, k, v = (
        np.einsum("bne,ehd->bnhd", h, p["attention"][name]["kernel"])
        for name in ("query", "key", "value")
    )
    logits = np.einsum("bnhd,bshd->bhns", q, k) / math.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhns,bshd->bnhd", weights, v)
    x = x + np.einsum("bnhd,hde->bne", attended, p["attention"]["out"]["kernel"])
    h = ref_layernorm(x, p["pre_mlp_norm"]["scale"], p["pre_mlp_norm"]["bias"], eps)
    hidden = h @ p["mlp"]["wi"]["kernel"]
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    return x + hidden @ p["mlp"]["wo"]["kernel"]


def ref_hidden_states(x: np.ndarray, params: dict, config: ViTConfig) -> list[np.ndarray]:
    """All L + 1 hidden states, CLS token first when the config uses one."""
    p = config.patch_size
    kernel = params["patch_embedding"]["kernel"].reshape(p, p, x.shape[-1], config.width)
    rows, cols = grid_shape(x.shape[1:3], p)
    tokens = ref_conv(x, kernel, params["patch_embedding"]["bias"], stride=p)
    table = np.asarray(params["position_embedding"], np.float64)
    num_cls = int(config.use_cls_token)
    grid = table[num_cls:].reshape(*config.grid_shape(), config.width)
    tokens = tokens + ref_resize(grid, (rows, cols)).reshape(rows * cols, -1)
    if config.use_cls_token:
        cls = np.broadcast_to(params["cls_token"] + table[0], (x.shape[0], 1, config.width))
        tokens = np.concatenate([cls, tokens], axis=1)
    states = [tokens]
    for i in range(config.num_layers):
        states.append(ref_block(states[-1], params[f"layers_{i}"], config.norm_epsilon))
    return states


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit():
    model = VisionTransformer(CONFIG)
    boxed, params = random_params(model, images(8, 12), seed=1)
    apply = jax.jit(model.apply, static_argnums=(2,), static_argnames=("drop_cls",))
    return model, boxed, params, apply


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_patch_embedding_equals_a_stride_p_convolution(vit):
    _, _, params, apply = vit
    x = images(8, 12)
    (state0,) = apply({"params": params}, x, (0,), drop_cls=True)
    kernel = params["patch_embedding"]["kernel"].reshape(4, 4, 3, CONFIG.width)
    expected = ref_conv(x, kernel, params["patch_embedding"]["bias"], stride=4)
    expected += params["position_embedding"][1:]
    np.testing.assert_allclose(state0, expected, rtol=RTOL, atol=ATOL)


def test_position_table_is_used_unchanged_at_the_config_size(vit):
    _, _, params, apply = vit
    (state0,) = apply(
        {"params": params}, np.zeros((BATCH, 8, 12, 3), np.float32), (0,), drop_cls=False
    )
    table = params["position_embedding"]
    np.testing.assert_array_equal(
        state0[:, 0], np.broadcast_to(params["cls_token"] + table[0], (BATCH, 16))
    )
    np.testing.assert_array_equal(
        state0[:, 1:],
        np.broadcast_to(params["patch_embedding"]["bias"] + table[1:], (BATCH, 6, 16)),
    )


@pytest.mark.parametrize("size", [(16, 8), (4, 24), (12, 12)])
def test_position_grid_is_bilinearly_resized_for_other_image_sizes(vit, size):
    """(16, 8): rows 2 -> 4 up, cols 3 -> 2 down; (4, 24): 2 -> 1, 3 -> 6; (12, 12): 2 -> 3."""
    _, _, params, apply = vit
    zeros = np.zeros((BATCH, *size, 3), np.float32)
    (state0,) = apply({"params": params}, zeros, (0,), drop_cls=False)
    rows, cols = size[0] // 4, size[1] // 4
    assert state0.shape == (BATCH, 1 + rows * cols, CONFIG.width)
    table = params["position_embedding"]
    # The CLS position is kept as it is.
    np.testing.assert_array_equal(
        state0[:, 0], np.broadcast_to(params["cls_token"] + table[0], (BATCH, 16))
    )
    expected = ref_resize(table[1:].reshape(*GRID, -1).astype(np.float64), (rows, cols))
    np.testing.assert_allclose(
        state0[:, 1:] - params["patch_embedding"]["bias"],
        np.broadcast_to(expected.reshape(rows * cols, -1), (BATCH, rows * cols, 16)),
        rtol=RTOL,
        atol=ATOL,
    )


@pytest.mark.parametrize("source,target", [((3, 4), (5, 2)), ((4, 4), (2, 7)), ((2, 3), (2, 3))])
def test_resize_position_grid_matches_torch_bilinear_reference(source, target):
    table = np.random.default_rng(4).normal(size=(source[0] * source[1], 5)).astype(np.float32)
    out = resize_position_grid(jnp.asarray(table), source, target)
    expected = ref_resize(table.reshape(*source, 5).astype(np.float64), target)
    np.testing.assert_allclose(out, expected.reshape(-1, 5), rtol=RTOL, atol=ATOL)


def test_hidden_states_follow_clip_numbering(vit):
    _, _, params, apply = vit
    x = images(8, 12, seed=5)
    indices = (0, 1, 2, 3, -1, -2, -3, -4)
    states = apply({"params": params}, x, indices, drop_cls=False)
    expected = ref_hidden_states(x, params, CONFIG)
    for index, state in zip(indices, states, strict=True):
        np.testing.assert_allclose(state, expected[index], rtol=RTOL, atol=ATOL, err_msg=f"{index}")
    for i in range(4):
        for j in range(i):
            assert np.abs(states[i] - states[j]).max() > 1e-2, f"states {i} and {j} coincide"


def test_default_is_the_penultimate_layer_without_cls(vit):
    model, _, params, _ = vit
    x = images(8, 12, seed=6)
    (features,) = jax.jit(model.apply)({"params": params}, x)
    assert features.shape == (BATCH, 6, CONFIG.width)
    np.testing.assert_allclose(
        features, ref_hidden_states(x, params, CONFIG)[-2][:, 1:], rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("index", [4, -5, 10])
def test_out_of_range_index_raises_naming_it(vit, index):
    model, _, params, _ = vit
    with pytest.raises(ValueError, match=f"index {index} is out of range"):
        model.apply({"params": params}, images(8, 12), (0, index))


def test_every_parameter_has_logical_axis_names(vit):
    _, boxed, _, _ = vit
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    for leaf in leaves:
        assert len(leaf.names) == len(leaf.value.shape) and all(leaf.names), leaf.names
    assert boxed["patch_embedding"]["kernel"].names == ("patch", "embed")
    assert boxed["position_embedding"].names == ("position", "embed")


@pytest.mark.parametrize("use_cls", [True, False])
def test_pooled_embedding_is_the_normed_cls_token_or_patch_mean(use_cls):
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        width=8,
        num_layers=1,
        num_heads=2,
        mlp_dim=8,
        use_cls_token=use_cls,
    )
    model = PooledVisionTransformer(config)
    x = images(8, 8, seed=7)
    _, params = random_params(model, x, seed=8)
    pooled = jax.jit(model.apply)({"params": params}, x)
    last = ref_hidden_states(x, params["vit"], config)[-1]
    normed = ref_layernorm(
        last, params["final_norm"]["scale"], params["final_norm"]["bias"], config.norm_epsilon
    )
    expected = normed[:, 0] if use_cls else normed.mean(axis=1)
    np.testing.assert_allclose(pooled, expected, rtol=RTOL, atol=ATOL)
    # Without a CLS token, every hidden state is patches only.
    (state,) = jax.jit(functools.partial(VisionTransformer(config).apply, drop_cls=False))(
        {"params": params["vit"]}, x
    )
    assert state.shape == (BATCH, 4 + int(use_cls), 8)


def test_grid_shape_and_invalid_sizes():
    assert grid_shape(336, 14) == (24, 24)
    assert grid_shape((8, 12), 4) == (2, 3)
    assert CONFIG.grid_shape() == GRID and CONFIG.grid_shape((16, 4)) == (4, 1)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        grid_shape((8, 10), 4)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        ViTConfig(image_size=10, patch_size=4, width=8, num_layers=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="num_heads"):
        ViTConfig(image_size=8, patch_size=4, width=9, num_layers=1, num_heads=2, mlp_dim=8)


def test_pretrained_tower_options_add_only_their_params_and_defaults_add_none():
    def paths(config: ViTConfig) -> set[str]:
        boxed = jax.eval_shape(
            PooledVisionTransformer(config).init, jax.random.key(0), images(8, 12)
        )
        flat = jax.tree_util.tree_flatten_with_path(strip_boxes(boxed["params"]))[0]
        return {"/".join(k.key for k in path) for path, _ in flat}

    default = paths(CONFIG)
    assert "vit/patch_embedding/bias" in default
    assert not any("pre_norm/" in p or p.endswith(("query/bias", "wi/bias")) for p in default)
    clip_like = dataclasses.replace(
        CONFIG,
        mlp_activation="quick_gelu",
        attention_bias="all",
        mlp_bias=True,
        patch_bias=False,
        pre_norm=True,
    )
    added = {"vit/pre_norm/scale", "vit/pre_norm/bias"} | {
        f"vit/layers_{i}/{name}/bias"
        for i in range(CONFIG.num_layers)
        for name in ("attention/query", "attention/key", "attention/value", "attention/out")
        + ("mlp/wi", "mlp/wo")
    }
    assert paths(clip_like) == (default - {"vit/patch_embedding/bias"}) | added


@pytest.mark.parametrize(
    "field, value, message",
    [("mlp_activation", "swiglu", "mlp_activation 'swiglu'"), ("attention_bias", "qk", "'qk'")],
)
def test_invalid_tower_options_raise_naming_them(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONFIG, **{field: value})
