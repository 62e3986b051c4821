"""bilinear_sample against a float64 numpy loop over points and their four neighbouring pixels.

Tolerances: values rtol=1e-5, atol=1e-6 (float32 vs float64); gradients w.r.t. locations vs
central finite differences of the float64 reference, rtol=atol=1e-4 (the function is bilinear
inside a cell, so the differences are exact up to rounding).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.bilinear import bilinear_sample

RTOL, ATOL = 1e-5, 1e-6
HEIGHT, WIDTH, CHANNELS = 4, 5, 3
LEAD = (2, 3)  # two leading batch dims


def sampling_matrix(locations: np.ndarray, height: int, width: int) -> np.ndarray:
    """[N, h·w] float64: row n holds the weight of each pixel in the sample at locations[n].

    grid_sample(align_corners=False, padding_mode="zeros"): pixel coordinate = loc * size - .5,
    each of the four neighbours weighted by (1 - |dx|)(1 - |dy|), neighbours off the map dropped.
    """
    matrix = np.zeros((len(locations), height * width))
    for n, (loc_x, loc_y) in enumerate(np.asarray(locations, np.float64)):
        x = loc_x * width - 0.5
        y = loc_y * height - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        for yi in (y0, y0 + 1):
            for xi in (x0, x0 + 1):
                if 0 <= yi < height and 0 <= xi < width:
                    matrix[n, yi * width + xi] += (1 - abs(x - xi)) * (1 - abs(y - yi))
    return matrix


def ref_sample(values: np.ndarray, locations: np.ndarray) -> np.ndarray:
    """[..., h, w, C], [..., N, 2] -> [..., N, C] float64."""
    *lead, height, width, channels = values.shape
    out = np.zeros((*lead, locations.shape[-2], channels))
    for idx in np.ndindex(*lead):
        table = np.asarray(values[idx], np.float64).reshape(height * width, channels)
        out[idx] = sampling_matrix(locations[idx], height, width) @ table
    return out


def probe_points():
    """Random points (many outside), border lines, corners, pixel centres, far outside."""
    rng = np.random.default_rng(0)
    random = rng.uniform(-0.3, 1.3, size=(20, 2))
    border = np.array(
        [[0.0, 0.3], [1.0, 0.6], [0.45, 0.0], [0.7, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]
    )
    centres = np.array(
        [[(j + 0.5) / WIDTH, (i + 0.5) / HEIGHT] for i, j in [(0, 0), (3, 4), (2, 1)]]
    )
    far = np.array([[-5.0, 0.5], [0.5, 7.0], [100.0, -100.0], [-0.1, -0.2]])
    return np.concatenate([random, border, centres, far]).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(*LEAD, HEIGHT, WIDTH, CHANNELS)).astype(np.float32)
    points = probe_points()
    locations = np.broadcast_to(points, (*LEAD, *points.shape)).copy()
    locations += rng.normal(scale=0.01, size=locations.shape).astype(np.float32) * (
        np.arange(LEAD[1])[None, :, None, None] == 2
    )  # one slice of the batch gets jittered points, so slices differ
    return values, locations


sample = jax.jit(bilinear_sample)


def test_matches_loop_reference_inside_outside_and_on_the_border(data):
    values, locations = data
    out = sample(values, locations)
    assert out.shape == (*LEAD, locations.shape[-2], CHANNELS)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref_sample(values, locations), rtol=RTOL, atol=ATOL)


def test_pixel_centres_return_the_pixel_and_far_points_return_zero(data):
    values, _ = data
    centres = np.array(
        [[(j + 0.5) / WIDTH, (i + 0.5) / HEIGHT] for i in range(HEIGHT) for j in range(WIDTH)],
        np.float32,
    )
    locations = np.broadcast_to(centres, (*LEAD, *centres.shape))
    out = sample(values, locations)
    np.testing.assert_allclose(
        out, values.reshape(*LEAD, HEIGHT * WIDTH, CHANNELS), rtol=RTOL, atol=ATOL
    )
    # Half a pixel or more outside the map: no neighbour inside, exactly zero.
    far = np.array([[-0.5 / WIDTH, 0.5], [1 + 0.5 / WIDTH, 0.5], [0.5, -0.6 / HEIGHT], [9, 9]])
    far = np.broadcast_to(far.astype(np.float32), (*LEAD, 4, 2))
    np.testing.assert_array_equal(sample(values, far), 0.0)


def test_left_edge_at_a_row_centre_is_half_the_first_pixel(data):
    values, _ = data
    rows = np.array([[0.0, (i + 0.5) / HEIGHT] for i in range(HEIGHT)], np.float32)
    out = sample(values, np.broadcast_to(rows, (*LEAD, *rows.shape)))
    np.testing.assert_allclose(out, 0.5 * values[..., :, 0, :], rtol=RTOL, atol=ATOL)


def test_gradient_wrt_values_is_the_transposed_sampling_matrix(data):
    values, locations = data
    cotangent = np.random.default_rng(2).normal(size=(*LEAD, locations.shape[-2], CHANNELS))
    grad = jax.jit(jax.grad(lambda v: jnp.sum(bilinear_sample(v, locations) * cotangent)))(values)
    for idx in np.ndindex(*LEAD):
        expected = sampling_matrix(locations[idx], HEIGHT, WIDTH).T @ cotangent[idx]
        np.testing.assert_allclose(
            grad[idx].reshape(HEIGHT * WIDTH, CHANNELS), expected, rtol=RTOL, atol=1e-5
        )


def test_gradient_wrt_locations_matches_finite_differences(data):
    values, _ = data
    rng = np.random.default_rng(3)
    # Pixel coordinates with fractional parts in [0.15, 0.85], from half outside the map (-1.x)
    # to fully inside, so every point sits strictly inside one bilinear cell.
    pix = rng.integers(-1, [WIDTH, HEIGHT], size=(*LEAD, 12, 2)) + rng.uniform(
        0.15, 0.85, size=(*LEAD, 12, 2)
    )
    locations = ((pix + 0.5) / np.array([WIDTH, HEIGHT])).astype(np.float32)
    cotangent = rng.normal(size=(*LEAD, 12, CHANNELS))
    grad = jax.jit(jax.grad(lambda loc: jnp.sum(bilinear_sample(values, loc) * cotangent)))(
        locations
    )
    assert np.all(np.isfinite(grad))
    loss = lambda loc: np.sum(ref_sample(values, loc) * cotangent)
    expected = np.zeros(locations.shape)
    base = locations.astype(np.float64)
    step = 1e-4
    for idx in np.ndindex(*locations.shape):
        delta = np.zeros_like(base)
        delta[idx] = step / (WIDTH if idx[-1] == 0 else HEIGHT)
        expected[idx] = (loss(base + delta) - loss(base - delta)) / (2 * delta[idx])
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected).max() > 0.1  # the check is not vacuous


def test_mismatched_leading_dims_raise():
    with pytest.raises(ValueError, match="leading dims"):
        bilinear_sample(jnp.zeros((2, 4, 5, 3)), jnp.zeros((3, 7, 2)))
