"""Zero-shot classification with a CLIPModel: each image takes the nearest candidate caption.

Accuracy is reported overall (the predicted caption is the image's) and per attribute: with
``attributes={"shape": [...], "color": [...]}`` (the attribute value of every candidate), an
image counts as shape-correct when its predicted caption names the right shape, whatever the
colour. ``easy_vqa_caption_attributes`` reads those off easy-VQA's "a {color} {shape}".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models.clip import CLIPModel


def easy_vqa_caption_attributes(captions: Sequence[str]) -> dict[str, list[str]]:
    """{"color": [...], "shape": [...]} of captions "a {color} {shape}".

    Raises:
      ValueError: naming a caption of another form.
    """
    attributes: dict[str, list[str]] = {"color": [], "shape": []}
    for caption in captions:
        words = caption.split()
        if len(words) != 3 or words[0] != "a":
            raise ValueError(f"caption {caption!r} is not of the form 'a {{color}} {{shape}}'")
        attributes["color"].append(words[1])
        attributes["shape"].append(words[2])
    return attributes


@functools.cache
def _embedders(model: CLIPModel):
    """Jitted (embed_images, embed_texts) of ``model``, compiled once per model and shape."""
    embed_images = jax.jit(lambda p, x: model.apply({"params": p}, x, method="embed_images"))
    embed_texts = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, method="embed_texts"))
    return embed_images, embed_texts


def zero_shot_predictions(
    model: CLIPModel,
    params: Any,
    images: np.ndarray,
    caption_tokens: np.ndarray,
    caption_mask: np.ndarray,
    *,
    batch_size: int = 256,
) -> np.ndarray:
    """[N] index of the most similar of K candidate captions for each of N images.

    Args:
      images: [N, H, W, 3] preprocessed pixels.
      caption_tokens: [K, L] candidate caption ids; caption_mask: [K, L] bool.
      batch_size: images embedded per call (the last call is padded to it: one compile).
    """
    embed_images, embed_texts = _embedders(model)
    texts = embed_texts(params, jnp.asarray(caption_tokens), jnp.asarray(caption_mask))
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = np.asarray(images[start : start + batch_size])
        padded = np.zeros((batch_size, *chunk.shape[1:]), chunk.dtype)
        padded[: len(chunk)] = chunk
        similarity = embed_images(params, jnp.asarray(padded)) @ texts.T
        predictions.append(np.asarray(jnp.argmax(similarity, axis=-1))[: len(chunk)])
    return np.concatenate(predictions)


def zero_shot_accuracy(
    predictions: np.ndarray,
    labels: np.ndarray,
    attributes: Mapping[str, Sequence[Any]] | None = None,
) -> dict[str, float]:
    """{"accuracy": ..., "<attribute>_accuracy": ...} of [N] predicted vs true caption indices.

    ``attributes[name][k]`` is candidate k's value of that attribute.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {predictions.shape} and labels {labels.shape} differ")
    metrics = {"accuracy": float(np.mean(predictions == labels))}
    for name, values in (attributes or {}).items():
        values = np.asarray(values)
        metrics[f"{name}_accuracy"] = float(np.mean(values[predictions] == values[labels]))
    return metrics


def evaluate_zero_shot(
    model: CLIPModel,
    params: Any,
    images: np.ndarray,
    labels: np.ndarray,
    caption_tokens: np.ndarray,
    caption_mask: np.ndarray,
    attributes: Mapping[str, Sequence[Any]] | None = None,
    *,
    batch_size: int = 256,
) -> dict[str, float]:
    """Zero-shot accuracies of ``model`` on images with caption-index ``labels`` [N]."""
    predictions = zero_shot_predictions(
        model, params, images, caption_tokens, caption_mask, batch_size=batch_size
    )
    return zero_shot_accuracy(predictions, labels, attributes)
