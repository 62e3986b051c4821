"""The Flax MobileNetV2 port: same outputs as torch on the same weights, right ImageNet classes."""

import pathlib

import numpy as np
import pytest
import skimage.data
from reference_inputs import reference_images

from mllm_jax.encoders.mobilenet_v2 import MobileNetV2Encoder, port_state_dict, resize_images

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# ImageNet-1k class indices (the standard synset order).
CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967
SPACE_SHUTTLE, MISSILE, PROJECTILE = 812, 657, 744


@pytest.fixture(scope="module")
def encoder():
    return MobileNetV2Encoder(crop_fraction=224 / 256, batch_size=4)


def test_matches_the_torch_forward_of_the_same_weights(encoder):
    # Fixture: make_reference_fixtures.py, torch's conv/batch-norm forward of the .pth weights.
    reference = np.load(FIXTURES / "mobilenet_v2_reference.npz")
    flax_encoder = MobileNetV2Encoder(size=64, batch_size=4)
    embeddings, logits = flax_encoder.embed_and_classify(reference_images())
    np.testing.assert_allclose(embeddings, reference["embeddings"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits, reference["logits"], rtol=1e-4, atol=2e-3)


def test_top1_on_scikit_image_photos_is_the_known_imagenet_class(encoder):
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    logits = [encoder.embed_and_classify(photo[None])[1][0] for photo in photos]
    top1 = [int(np.argmax(row)) for row in logits]
    assert top1[0] in CAT_CLASSES, top1
    assert top1[1] == ESPRESSO, top1
    assert top1[2] in {SPACE_SHUTTLE, MISSILE, PROJECTILE}, top1


def test_embeddings_are_batch_independent(encoder):
    images = reference_images()
    together = encoder(images)
    alone = np.concatenate([encoder(image[None]) for image in images])
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)
    assert together.shape == (3, 1280)


def test_resize_rejects_float_images():
    with pytest.raises(ValueError, match="expected uint8"):
        resize_images(np.zeros((1, 8, 8, 3), np.float32))


def test_grey_images_become_rgb():
    assert resize_images(np.zeros((2, 8, 8), np.uint8), size=32).shape == (2, 32, 32, 3)


def test_port_names_missing_and_unexpected_keys():
    with pytest.raises(ValueError, match=r"my\.pth: .*263 problems.*unexpected extra.*missing"):
        port_state_dict({"extra": np.zeros(3)}, "my.pth")
