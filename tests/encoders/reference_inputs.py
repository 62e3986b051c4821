"""Inputs of the encoder parity fixtures (shared by the tests and make_reference_fixtures.py)."""

from __future__ import annotations

import numpy as np

REFERENCE_SENTENCES = (
    "a handwritten digit seven",
    "a blue circle",
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, twice; then it rests!",
    "naïve café owners don't like ùnusual ACCENTS",
    "",
    " ".join(["long"] * 300),  # longer than the 256-token limit: truncated
)


def reference_images() -> np.ndarray:
    """uint8 [3, 64, 64, 3]: a smooth gradient, a bright square on grey, and seeded noise."""
    y, x = np.mgrid[0:64, 0:64]
    gradient = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1)
    square = np.full((64, 64, 3), 128)
    square[16:40, 20:44] = (250, 40, 30)
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3))
    return np.stack([gradient, square, noise]).clip(0, 255).astype(np.uint8)
