"""Multi-positive InfoNCE against a numpy double loop, and CLIP's loss when labels are distinct."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mllm_jax.train.contrastive_loss import MULTI_POSITIVE_FORMS, multi_positive_info_nce


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(batch=7, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    image = _unit(rng.normal(size=(batch, dim))).astype(np.float32)
    text = _unit(rng.normal(size=(batch, dim))).astype(np.float32)
    return image, text


def _reference(image, text, scale, labels, form):
    """Plain loops in float64: each row's loss over its positives, averaged over directions."""
    image, text = image.astype(np.float64), text.astype(np.float64)
    batch = len(labels)
    logits = scale * image @ text.T
    total = 0.0
    for direction in (logits, logits.T):
        for i in range(batch):
            row = direction[i]
            log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
            positives = [j for j in range(batch) if labels[j] == labels[i]]
            if form == "supcon":
                row_loss = -np.mean([row[j] - log_z for j in positives])
            else:
                row_loss = -np.log(sum(np.exp(row[j] - log_z) for j in positives))
            total += 0.5 * row_loss
    return total


@pytest.mark.parametrize("form", MULTI_POSITIVE_FORMS)
def test_matches_numpy_double_loop_with_repeated_labels(form):
    image, text = _embeddings()
    labels = np.array([0, 2, 0, 1, 2, 2, 3])
    loss_sum, count = multi_positive_info_nce(
        jnp.asarray(image), jnp.asarray(text), 9.0, jnp.asarray(labels), form=form
    )
    np.testing.assert_allclose(float(loss_sum), _reference(image, text, 9.0, labels, form), 1e-5)
    assert float(count) == 7


def test_the_two_forms_differ_when_a_row_has_several_positives():
    image, text = _embeddings()
    labels = jnp.array([0, 0, 0, 1, 2, 3, 4])
    supcon, _ = multi_positive_info_nce(image, text, 5.0, labels, form="supcon")
    mass, _ = multi_positive_info_nce(image, text, 5.0, labels, form="mass")
    # log Σ p >= mean log p (Jensen, plus the extra mass): "mass" is the smaller loss.
    assert float(mass) < float(supcon) - 1e-3


@pytest.mark.parametrize("form", MULTI_POSITIVE_FORMS)
def test_all_distinct_labels_give_the_clip_loss(form):
    image, text = _embeddings(batch=6)
    scale = 3.0
    logits = scale * jnp.asarray(image) @ jnp.asarray(text).T
    diagonal = jnp.arange(6)
    clip_loss = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(logits, diagonal).mean()
        + optax.softmax_cross_entropy_with_integer_labels(logits.T, diagonal).mean()
    )
    labels = jnp.array([5, 3, 0, 1, 4, 2])
    loss_sum, count = multi_positive_info_nce(image, text, scale, labels, form=form)
    np.testing.assert_allclose(float(loss_sum / count), float(clip_loss), rtol=1e-5)


def test_gradient_pulls_positive_pairs_together():
    image, text = _embeddings(batch=4)
    labels = jnp.array([0, 1, 0, 1])

    def positive_similarity(image):
        return jnp.sum(image[0] * (text[0] + text[2]))

    grad = jax.grad(lambda x: multi_positive_info_nce(x, text, 10.0, labels)[0])(image)
    # A small step against the gradient brings image 0 closer to its two positive captions.
    step = jnp.asarray(image) - 0.1 * grad
    assert float(positive_similarity(step)) > float(positive_similarity(jnp.asarray(image)))


def test_rejects_unknown_form_and_mismatched_shapes():
    image, text = _embeddings(batch=4)
    labels = jnp.arange(4)
    with pytest.raises(ValueError, match="form"):
        multi_positive_info_nce(image, text, 1.0, labels, form="mean")
    with pytest.raises(ValueError, match="labels"):
        multi_positive_info_nce(image, text, 1.0, jnp.arange(3))
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        multi_positive_info_nce(image, text[:, :3], 1.0, labels)
