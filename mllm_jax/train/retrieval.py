"""Cross-modal retrieval Recall@K and zero-shot accuracy, for label-shared captions.

In the pair sets here each class has one caption, so many images share a caption:

  text -> image: every test pair's caption is a query (N queries) over the N test images; a
                 query is a hit at K when ANY of its K nearest images carries that caption.
  image -> text: each test image is a query over the DISTINCT test captions (K classes, each
                 once); a hit when the image's own caption is among the K nearest. With K at
                 least the number of classes this is 1 by construction (digits: R@10).
  zero-shot:     each image takes the class whose prompt embedding is nearest.

Ties in similarity are broken by candidate index (a stable sort).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = KS) -> dict:
    """{k: fraction of queries with a relevant candidate among their top k}.

    Args:
      similarity: [Q, C] query-candidate scores (higher is nearer).
      relevant: [Q, C] bool, which candidates count as hits for each query.
    """
    similarity, relevant = np.asarray(similarity), np.asarray(relevant, bool)
    if similarity.shape != relevant.shape or similarity.ndim != 2:
        raise ValueError(f"similarity {similarity.shape} and relevant {relevant.shape} differ")
    order = np.argsort(-similarity, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    # First rank (1-based) at which each query finds a relevant candidate; inf if none.
    first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.inf)
    return {k: float(np.mean(first <= k)) for k in ks}


def retrieval_metrics(
    image_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = KS,
) -> dict[str, float]:
    """{"t2i_r@k", "i2t_r@k"} for [N, e] image and [K, e] class-caption embeddings.

    ``labels`` [N]: each image's class (its caption is ``class_emb[label]``).
    """
    labels = np.asarray(labels)
    image_emb, class_emb = np.asarray(image_emb), np.asarray(class_emb)
    text_queries = class_emb[labels]
    t2i = recall_at_k(text_queries @ image_emb.T, labels[:, None] == labels[None, :], ks)
    i2t = recall_at_k(
        image_emb @ class_emb.T, labels[:, None] == np.arange(len(class_emb))[None, :], ks
    )
    return {f"t2i_r@{k}": v for k, v in t2i.items()} | {f"i2t_r@{k}": v for k, v in i2t.items()}


def zero_shot_accuracy(image_emb: np.ndarray, prompt_emb: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of [N, e] images whose nearest of the [K, e] class prompts is their class."""
    predictions = np.argmax(np.asarray(image_emb) @ np.asarray(prompt_emb).T, axis=1)
    return float(np.mean(predictions == np.asarray(labels)))
