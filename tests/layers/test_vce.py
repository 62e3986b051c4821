"""VCE projector against float64 numpy references of SPEC §2 (loops over queries, heads, levels
and points; bilinear sampling written out per neighbouring pixel).

Tolerance: max |output - reference| <= 1e-5 · max |reference| (float32 vs float64), unless a
test says otherwise.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import base
from mllm_jax import sharding
from mllm_jax.layers.vce import VCEConfig, VCEProjector, VisualCueEnhancement, ring_offsets
from mllm_jax.layers.vit import VisionTransformer, ViTConfig

BATCH, WIDTH, OUT_DIM = 2, 16, 12
HEADS, POINTS = 2, 3
EPS = 1e-6
# Anchor 4×4, then a 3×5 map and a 2×3 map of another width (projected to WIDTH).
MIXED = ((4, 4, 16), (3, 5, 16), (2, 3, 24))
SAME = ((4, 4, 16), (4, 4, 16), (4, 4, 16))


def assert_rel_close(actual, expected, rtol: float = 1e-5):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    error, scale = np.abs(actual - expected).max(), np.abs(expected).max()
    assert error <= rtol * scale, f"max error {error:.3g} > {rtol} · max|ref| {scale:.3g}"


def make_levels(spec, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(BATCH, h * w, c)).astype(np.float32) for h, w, c in spec]


def shapes_of(spec) -> tuple[tuple[int, int], ...]:
    return tuple((h, w) for h, w, _ in spec)


def randomized(params, seed: int):
    """Every parameter N(0, 0.3²), norm scales 1 + N(0, 0.3²): offsets reach outside the maps."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return (base + 0.3 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, params)


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def ref_bilinear(grid: np.ndarray, x_norm: float, y_norm: float) -> np.ndarray:
    """grid_sample(align_corners=False, zeros): [h, w, D] at normalised (x, y) -> [D]."""
    height, width, _ = grid.shape
    x, y = x_norm * width - 0.5, y_norm * height - 0.5
    x0, y0 = math.floor(x), math.floor(y)
    out = np.zeros(grid.shape[-1])
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= yi < height and 0 <= xi < width:
                out += (1 - abs(x - xi)) * (1 - abs(y - yi)) * grid[yi, xi]
    return out


def ref_layernorm(x, params):
    x = np.asarray(x, np.float64)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * params["scale"] + params["bias"]


def ref_values(levels, params) -> list[np.ndarray]:
    """v_l = value_proj(LN(level_l projected to the anchor width if needed)): [B, P_l, H, Dh]."""
    values = []
    for index, level in enumerate(levels):
        x = np.asarray(level, np.float64)
        if x.shape[-1] != levels[0].shape[-1]:
            x = x @ params[f"level_proj_{index}"]["kernel"] + params[f"level_proj_{index}"]["bias"]
        x = ref_layernorm(x, params["feature_norm"])
        proj = params["value_proj"]
        values.append(np.einsum("bpc,chd->bphd", x, proj["kernel"]) + proj["bias"])
    return values


def ref_aggregate(values, shapes, offsets, weights) -> np.ndarray:
    """out[b,p,h] = Σ_{l,k} weights · bilinear(v_l[b,:,h], ref(p) + offsets / (w_l, h_l))."""
    batch, queries, heads, levels, points, _ = offsets.shape
    anchor_h, anchor_w = shapes[0]
    out = np.zeros((batch, queries, heads, values[0].shape[-1]))
    for b, p, h, level, k in np.ndindex(batch, queries, heads, levels, points):
        i, j = divmod(p, anchor_w)
        level_h, level_w = shapes[level]
        x = (j + 0.5) / anchor_w + offsets[b, p, h, level, k, 0] / level_w
        y = (i + 0.5) / anchor_h + offsets[b, p, h, level, k, 1] / level_h
        grid = values[level][b, :, h].reshape(level_h, level_w, -1)
        out[b, p, h] += weights[b, p, h, level, k] * ref_bilinear(grid, x, y)
    return out


def ref_finish(query, out, params, mlp, normalize: bool):
    """x = [LN](q + output_proj(out)); tokens = fc2(gelu(fc1(x)))."""
    proj = params["output_proj"]
    x = np.asarray(query, np.float64) + np.einsum("bphd,hdc->bpc", out, proj["kernel"])
    x = x + proj["bias"]
    if normalize:
        x = ref_layernorm(x, params["output_norm"])
    hidden = x @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    return x, hidden @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]


def ref_vce(levels, shapes, params, normalize: bool):
    """SPEC §2 in full: returns (x [B, P, C], tokens [B, P, D])."""
    vce = params["vce"]
    levels_n = len(levels)
    query_normed = ref_layernorm(levels[0], vce["query_norm"])
    so, aw = vce["sampling_offsets"], vce["attention_weights"]
    offsets = np.einsum("bpc,chs->bphs", query_normed, so["kernel"]) + so["bias"]
    offsets = offsets.reshape(*query_normed.shape[:2], HEADS, levels_n, POINTS, 2)
    logits = np.einsum("bpc,chs->bphs", query_normed, aw["kernel"]) + aw["bias"]
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).reshape(offsets.shape[:-1])
    out = ref_aggregate(ref_values(levels, vce), shapes, offsets, weights)
    return ref_finish(levels[0], out, vce, params["mlp_projector"], normalize)


def expected_ring(heads: int, levels: int, points: int) -> np.ndarray:
    """SPEC init: θ_h = 2πh/H, (cos, sin) / max(|cos|, |sin|), times (k + 1), every level."""
    ring = np.zeros((heads, levels, points, 2))
    for h, level, k in np.ndindex(heads, levels, points):
        c, s = math.cos(2 * math.pi * h / heads), math.sin(2 * math.pi * h / heads)
        ring[h, level, k] = np.array([c, s]) / max(abs(c), abs(s)) * (k + 1)
    return ring


# --------------------------------------------------------------------------------------------
# Fixtures: one compiled model per (levels layout, normalize_output)
# --------------------------------------------------------------------------------------------


def build(spec, normalize: bool):
    config = VCEConfig(
        level_indices=tuple(range(-1, -1 - len(spec), -1)),
        num_heads=HEADS,
        num_points=POINTS,
        normalize_output=normalize,
    )
    model = VCEProjector(config, OUT_DIM)
    shapes = shapes_of(spec)
    levels = make_levels(spec, seed=0)
    boxed = jax.jit(model.init, static_argnums=2)(jax.random.key(0, impl="rbg"), levels, shapes)

    @jax.jit
    def run(params, levels):
        """(x [B, P, C] from the VCE module, tokens [B, P, D])."""
        tokens, state = model.apply(
            {"params": params},
            levels,
            shapes,
            capture_intermediates=lambda mdl, _: isinstance(mdl, VisualCueEnhancement),
            mutable=["intermediates"],
        )
        return state["intermediates"]["vce"]["__call__"][0], tokens

    return dict(
        model=model, shapes=shapes, levels=levels, boxed=boxed["params"],
        params=sharding.strip_boxes(boxed["params"]), run=run, normalize=normalize,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mixed():
    return build(MIXED, normalize=True)


@pytest.fixture(scope="module")
def mixed_raw():
    return build(MIXED, normalize=False)


@pytest.fixture(scope="module")
def same_size():
    return build(SAME, normalize=True)


def with_vce(params, **changes):
    vce = dict(params["vce"])
    for name, leaves in changes.items():
        vce[name] = {**vce[name], **leaves}
    return {**params, "vce": vce}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_init_values_follow_the_spec(mixed):
    vce = mixed["params"]["vce"]
    levels = len(MIXED)
    np.testing.assert_array_equal(vce["sampling_offsets"]["kernel"], 0.0)
    np.testing.assert_allclose(
        np.asarray(vce["sampling_offsets"]["bias"]).reshape(HEADS, levels, POINTS, 2),
        expected_ring(HEADS, levels, POINTS),
        atol=1e-6,
    )
    np.testing.assert_array_equal(vce["attention_weights"]["kernel"], 0.0)
    np.testing.assert_array_equal(vce["attention_weights"]["bias"], 0.0)
    for name, fan_in, fan_out in [
        ("value_proj", WIDTH, WIDTH),
        ("output_proj", WIDTH, WIDTH),
        ("level_proj_2", 24, WIDTH),
    ]:
        kernel = np.asarray(vce[name]["kernel"])
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert np.abs(kernel).max() <= bound, name
        assert 0.75 * bound / math.sqrt(3) < kernel.std() < 1.25 * bound / math.sqrt(3), name
        np.testing.assert_array_equal(vce[name]["bias"], 0.0)
    for name in ("query_norm", "feature_norm", "output_norm"):
        np.testing.assert_array_equal(vce[name]["scale"], 1.0)
        np.testing.assert_array_equal(vce[name]["bias"], 0.0)


def test_ring_directions_for_four_and_eight_heads():
    four = ring_offsets(4, 1, 2)
    np.testing.assert_allclose(four[:, 0, 0], [[1, 0], [0, 1], [-1, 0], [0, -1]], atol=1e-12)
    np.testing.assert_allclose(four[:, 0, 1], 2 * four[:, 0, 0], atol=1e-12)
    np.testing.assert_allclose(ring_offsets(8, 1, 1)[1, 0, 0], [1, 1], atol=1e-12)
    np.testing.assert_allclose(ring_offsets(8, 1, 1)[3, 0, 0], [-1, 1], atol=1e-12)


def test_init_output_is_the_uniform_ring_closed_form(mixed):
    """At init: out[b,p,h] = 1/(L·K) Σ_{l,k} bilinear(v_l, ref_p + ring_h·(k+1) / (w_l, h_l))."""
    params, shapes = mixed["params"], mixed["shapes"]
    levels = make_levels(MIXED, seed=1)
    x, tokens = mixed["run"](params, levels)
    ring = expected_ring(HEADS, len(MIXED), POINTS)
    offsets = np.broadcast_to(ring, (BATCH, 16, *ring.shape))
    uniform = np.full(offsets.shape[:-1], 1.0 / (len(MIXED) * POINTS))
    out = ref_aggregate(ref_values(levels, params["vce"]), shapes, offsets, uniform)
    x_ref, tokens_ref = ref_finish(levels[0], out, params["vce"], params["mlp_projector"], True)
    assert_rel_close(x, x_ref)
    assert_rel_close(tokens, tokens_ref)


def test_zero_offsets_sample_every_level_at_the_patch_centre(mixed):
    """Offset bias 0 too: out = (1/L) Σ_l bilinear(v_l, ref_p) on maps of different sizes."""
    params, shapes = mixed["params"], mixed["shapes"]
    params = with_vce(params, sampling_offsets={"bias": np.zeros((HEADS, 3 * POINTS * 2))})
    levels = make_levels(MIXED, seed=2)
    x, _ = mixed["run"](params, levels)
    values = ref_values(levels, params["vce"])
    out = np.zeros((BATCH, 16, HEADS, WIDTH // HEADS))
    for b, p, h, level in np.ndindex(BATCH, 16, HEADS, 3):
        i, j = divmod(p, 4)
        grid = values[level][b, :, h].reshape(*shapes[level], -1)
        out[b, p, h] += ref_bilinear(grid, (j + 0.5) / 4, (i + 0.5) / 4) / 3
    assert_rel_close(x, ref_finish(levels[0], out, params["vce"], params["mlp_projector"], True)[0])


def test_zero_offsets_on_same_size_maps_average_the_values_at_the_patch(same_size):
    """Same-size levels: out[b,p,h] = mean_l v_l[b,p,h], no interpolation at all."""
    params = with_vce(
        same_size["params"], sampling_offsets={"bias": np.zeros((HEADS, 3 * POINTS * 2))}
    )
    levels = make_levels(SAME, seed=3)
    x, tokens = same_size["run"](params, levels)
    out = np.mean(ref_values(levels, params["vce"]), axis=0)
    x_ref, tokens_ref = ref_finish(levels[0], out, params["vce"], params["mlp_projector"], True)
    assert_rel_close(x, x_ref)
    assert_rel_close(tokens, tokens_ref)


@pytest.mark.parametrize("fixture", ["mixed", "mixed_raw"])
def test_random_params_match_the_spec_reference(fixture, request):
    """Learned offsets and attention, maps of different sizes and widths, output norm on / off."""
    setup = request.getfixturevalue(fixture)
    params = randomized(setup["params"], seed=4)
    levels = make_levels(MIXED, seed=5)
    x, tokens = setup["run"](params, levels)
    x_ref, tokens_ref = ref_vce(levels, setup["shapes"], params, setup["normalize"])
    assert_rel_close(x, x_ref)
    assert_rel_close(tokens, tokens_ref)


def test_gradient_wrt_offset_bias_matches_finite_differences(mixed):
    params = randomized(mixed["params"], seed=6)
    levels = make_levels(MIXED, seed=7)
    cotangent = np.random.default_rng(8).normal(size=(BATCH, 16, OUT_DIM))

    def loss(bias):
        p = with_vce(params, sampling_offsets={"bias": bias})
        return jnp.sum(mixed["run"](p, levels)[1] * cotangent)

    bias = params["vce"]["sampling_offsets"]["bias"]
    grad = np.asarray(jax.jit(jax.grad(loss))(bias))
    step = 1e-5  # pixels; float64 reference, so no rounding trouble
    for idx in [(0, 0), (0, 5), (1, 7), (1, 12), (0, 16), (1, 17)]:
        delta = np.zeros(bias.shape)
        delta[idx] = step
        plus, minus = (
            with_vce(params, sampling_offsets={"bias": bias + sign * delta}) for sign in (1, -1)
        )
        numeric = (
            np.sum(ref_vce(levels, mixed["shapes"], plus, True)[1] * cotangent)
            - np.sum(ref_vce(levels, mixed["shapes"], minus, True)[1] * cotangent)
        ) / (2 * step)
        assert abs(grad[idx] - numeric) <= 1e-3 * max(1.0, abs(numeric)), (idx, grad[idx], numeric)


def test_anchor_is_the_first_level(mixed, mixed_raw):
    """With f* = 0 the output is levels[0] itself (raw) or LayerNorm(levels[0])."""
    levels = make_levels(MIXED, seed=9)
    zero = {"kernel": np.zeros((HEADS, WIDTH // HEADS, WIDTH)), "bias": np.zeros(WIDTH)}
    x, _ = mixed_raw["run"](with_vce(mixed_raw["params"], output_proj=zero), levels)
    np.testing.assert_array_equal(x, levels[0])
    x, _ = mixed["run"](with_vce(mixed["params"], output_proj=zero), levels)
    assert_rel_close(x, ref_layernorm(levels[0], mixed["params"]["vce"]["output_norm"]))


def test_level_order_must_put_the_deepest_layer_first():
    assert VCEConfig().level_indices[0] == -2
    VCEConfig(level_indices=(23, 17, 11, 5))
    for wrong in [(-20, -14, -8, -2), (-8, -2), (5, 11), (-2, -2)]:
        with pytest.raises(ValueError, match="first entry is the anchor"):
            VCEConfig(level_indices=wrong)


def test_parameters_exist_only_where_needed_and_carry_logical_axes(mixed, mixed_raw):
    names = set(mixed["params"]["vce"])
    assert "level_proj_2" in names and not names & {"level_proj_0", "level_proj_1"}
    assert "output_norm" in names and "output_norm" not in mixed_raw["params"]["vce"]
    leaves = jax.tree_util.tree_leaves(
        mixed["boxed"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    assert all(len(leaf.names) == leaf.value.ndim and all(leaf.names) for leaf in leaves)
    vce = mixed["boxed"]["vce"]
    assert vce["sampling_offsets"]["kernel"].names == ("embed", "heads", "sampling")
    assert vce["value_proj"]["kernel"].names == ("embed", "heads", "head_dim")
    assert vce["output_proj"]["kernel"].names == ("heads", "head_dim", "embed")
    assert vce["level_proj_2"]["kernel"].names == ("level_embed", "embed")
    assert mixed["boxed"]["mlp_projector"]["fc1"]["kernel"].names == ("embed", "mlp")


def test_bad_inputs_raise(mixed):
    model, params, levels = mixed["model"], mixed["params"], mixed["levels"]
    apply = lambda lv, shapes=None: model.apply({"params": params}, lv, shapes)
    with pytest.raises(ValueError, match="config has 3 levels"):
        apply(levels[:2], mixed["shapes"][:2])
    with pytest.raises(ValueError, match="not all square"):
        apply(levels)
    with pytest.raises(ValueError, match="level 1 has shape"):
        apply(levels, ((4, 4), (3, 4), (2, 3)))
    odd = VCEProjector(VCEConfig(level_indices=(-1,), num_heads=3), OUT_DIM)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        jax.eval_shape(odd.init, jax.random.key(0), [levels[0]])


def test_vit_hidden_states_feed_the_projector():
    vit_config = ViTConfig(
        image_size=8, patch_size=2, width=16, num_layers=3, num_heads=2, mlp_dim=16
    )
    config = VCEConfig(level_indices=(-2, -3, 0), num_heads=HEADS, num_points=POINTS)
    vit, projector = VisionTransformer(vit_config), VCEProjector(config, OUT_DIM)

    def forward(images):
        vit_vars = vit.init(jax.random.key(0), images)
        levels = vit.apply(vit_vars, images, config.level_indices)
        return projector.apply(projector.init(jax.random.key(1), levels), levels)

    tokens = jax.eval_shape(forward, jax.ShapeDtypeStruct((BATCH, 8, 8, 3), jnp.float32))
    assert tokens.shape == (BATCH, 16, OUT_DIM)


def test_sharded_forward_matches_the_reference(mixed, devices):
    """On a (data 2, fsdp 2, tensor 2) mesh with the base rules (new names replicated): heads
    split over ``tensor``, batch over ``data``·``fsdp``, the width over ``fsdp``."""
    rules = sharding.logical_rules_from_config(
        list(base.LOGICAL_AXIS_RULES) + [("level_embed", None), ("sampling", None)]
    )
    model, shapes = mixed["model"], mixed["shapes"]
    params = randomized(mixed["params"], seed=10)
    rng = np.random.default_rng(11)
    levels = [rng.normal(size=(4, h * w, c)).astype(np.float32) for h, w, c in MIXED]
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    param_shardings = sharding.logical_to_mesh_sharding(mixed["boxed"], mesh, rules)
    assert param_shardings["vce"]["value_proj"]["kernel"].spec == P("fsdp", "tensor", None)
    with sharding.mesh_context(mesh, rules):
        placed = jax.device_put(params, param_shardings)
        tokens = jax.jit(lambda p, lv: model.apply({"params": p}, lv, shapes))(placed, levels)
    assert_rel_close(tokens, ref_vce(levels, shapes, params, True)[1])
