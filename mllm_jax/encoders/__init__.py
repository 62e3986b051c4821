"""Frozen pretrained unimodal encoders ported to Flax, with weights from installed packages.

Any function fits where an encoder is expected:

  image encoder: uint8 images [N, H, W, 3] -> float32 [N, d_x]   (``MobileNetV2Encoder``, 1280)
  text encoder:  N strings -> float32 [N, d_y]                     (``SentenceEncoder``, 384)
"""

from collections.abc import Callable, Sequence

import numpy as np

ImageEncoder = Callable[[np.ndarray], np.ndarray]
TextEncoder = Callable[[Sequence[str]], np.ndarray]

__all__ = ["ImageEncoder", "TextEncoder"]
