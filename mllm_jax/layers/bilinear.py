"""Bilinear sampling of feature maps at continuous locations, zero outside the map."""

from __future__ import annotations

import jax.numpy as jnp


def bilinear_sample(values: jnp.ndarray, locations: jnp.ndarray) -> jnp.ndarray:
    """Bilinearly interpolates ``values`` at normalised (x, y) ``locations``, in float32.

    Semantics of ``torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros",
    align_corners=False)`` with ``grid = 2 * locations - 1``, as in Deformable-DETR: location
    (x, y) in [0, 1]^2 spans the map edge to edge, pixel coordinate = location * size - 0.5, so
    the centre of pixel (row i, column j) is ((j + 0.5) / w, (i + 0.5) / h). Each of the four
    neighbouring pixels contributes its bilinear weight if it lies inside the map and zero if
    not, so values fade to zero within half a pixel outside the border. Differentiable with
    respect to ``values`` and ``locations`` (piecewise bilinear; at exact pixel coordinates the
    derivative is the one-sided one from the right).

    Args:
      values: [..., h, w, C] feature maps.
      locations: [..., N, 2] normalised (x, y); the leading dims must equal those of ``values``.

    Returns:
      [..., N, C] float32.
    """
    *batch, height, width, channels = values.shape
    if tuple(locations.shape[:-2]) != tuple(batch) or locations.shape[-1] != 2:
        raise ValueError(
            f"locations {locations.shape} must be [..., N, 2] with the leading dims of "
            f"values {values.shape} ([..., h, w, C])"
        )
    num_points = locations.shape[-2]
    table = values.astype(jnp.float32).reshape(-1, height * width, channels)
    locations = locations.astype(jnp.float32).reshape(-1, num_points, 2)
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = x - x0
    fy = y - y0
    out = jnp.zeros(table.shape[:1] + (num_points, channels), jnp.float32)
    for dy, weight_y in ((0, 1.0 - fy), (1, fy)):
        for dx, weight_x in ((0, 1.0 - fx), (1, fx)):
            xi = x0 + dx
            yi = y0 + dy
            inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
            # Clip before the int cast: far-away float coordinates would overflow int32.
            index = jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)
            corner = jnp.take_along_axis(
                table, index.astype(jnp.int32)[..., None], axis=1, mode="clip"
            )
            weight = jnp.where(inside, weight_x * weight_y, 0.0)
            out = out + corner * weight[..., None]
    return out.reshape(*batch, num_points, channels)
