"""Recall@K and zero-shot accuracy on hand-worked examples."""

import numpy as np
import pytest

from mllm_jax.train.retrieval import recall_at_k, retrieval_metrics, zero_shot_accuracy


def test_recall_at_k_hand_worked():
    # Query 0: candidates by score 2 > 0 > 1, relevant {1}: first hit at rank 3.
    # Query 1: best candidate 1 is relevant: rank 1.   Query 2: nothing relevant: never.
    similarity = np.array([[0.9, 0.1, 0.95], [0.2, 0.8, 0.1], [0.5, 0.4, 0.3]])
    relevant = np.array([[False, True, False], [False, True, True], [False, False, False]])
    assert recall_at_k(similarity, relevant, ks=(1, 2, 3)) == {
        1: pytest.approx(1 / 3),
        2: pytest.approx(1 / 3),
        3: pytest.approx(2 / 3),
    }


def test_shared_captions_any_image_counts():
    # Three images; images 0 and 2 share class 0. Text embeddings per class.
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    classes = np.array([[0.6, 0.8], [1.0, 0.0]])  # class 0 is nearer image 2, class 1 image 0
    labels = np.array([0, 1, 0])
    metrics = retrieval_metrics(images, classes, labels, ks=(1, 2))
    # t2i: caption 0 (queries 0 and 2): nearest image is 2 (0.96), class 0: hit at 1.
    # caption 1 (query 1): scores 1.0, 0.0, 0.8 -> image 0 (class 0), image 2 (class 0),
    # image 1: miss at 1 and 2.
    assert metrics["t2i_r@1"] == pytest.approx(2 / 3)
    assert metrics["t2i_r@2"] == pytest.approx(2 / 3)
    # i2t over the 2 distinct captions: image 0 -> class 1 (wrong), image 1 -> class 0 (wrong),
    # image 2 -> class 0 (0.96 vs 0.8, right).
    assert metrics["i2t_r@1"] == pytest.approx(1 / 3)
    assert metrics["i2t_r@2"] == pytest.approx(1.0)


def test_zero_shot_accuracy():
    images = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    prompts = np.array([[0.0, 1.0], [1.0, 0.1]])
    assert zero_shot_accuracy(images, prompts, np.array([1, 0, 1])) == pytest.approx(1.0)
    assert zero_shot_accuracy(images, prompts, np.array([0, 0, 0])) == pytest.approx(1 / 3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ"):
        recall_at_k(np.zeros((2, 3)), np.zeros((3, 2), bool))
