"""KV-cached generation reproduces the full forward pass step by step."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import TransformerConfig
from mllm_jax.models import DecoderLM
from mllm_jax.models.generation import generate, left_pad
from mllm_jax.sharding import strip_boxes

V = 40
TRANSFORMER = TransformerConfig(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=32)


@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def lm_and_params(request):
    transformer = dataclasses.replace(TRANSFORMER, scan_layers=request.param)
    lm = DecoderLM(vocab_size=V, embed_dim=16, transformer=transformer)
    params = jax.jit(lm.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 4), jnp.int32))
    # Sharpen the logits so greedy choices are not decided by float noise.
    params = jax.tree_util.tree_map(lambda p: p * 3.0, strip_boxes(params["params"]))
    return lm, params


PROMPTS = [[5, 9, 2, 31, 7], [11, 3], [8, 8, 19, 1]]


def test_cached_decoding_matches_the_full_forward_pass_at_every_step(lm_and_params):
    lm, params = lm_and_params
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    embeddings = lm.apply({"params": params}, jnp.asarray(tokens), method=lm.embed)
    result = generate(lm, params, embeddings, jnp.asarray(mask), max_new_tokens=6, eos_id=-1)
    assert result.tokens.shape == (3, 6)
    forward = jax.jit(lambda t: lm.apply({"params": params}, t))
    for row, prompt in enumerate(PROMPTS):
        full = np.asarray(prompt + result.tokens[row].tolist())[None]
        logits = np.asarray(forward(jnp.asarray(full)))[0]
        # Step s was chosen from the logits at position len(prompt) - 1 + s.
        expected = logits[len(prompt) - 1 : len(prompt) - 1 + 6]
        np.testing.assert_allclose(result.logits[row], expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(result.tokens[row], expected.argmax(-1))


def test_generation_stops_rows_at_eos_and_pads_after(lm_and_params):
    lm, params = lm_and_params
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    embeddings = lm.apply({"params": params}, jnp.asarray(tokens), method=lm.embed)
    free = generate(lm, params, embeddings, jnp.asarray(mask), max_new_tokens=6, eos_id=-1)
    eos = int(free.tokens[0, 2])  # make row 0's third token the end-of-sequence id
    result = generate(lm, params, embeddings, jnp.asarray(mask), max_new_tokens=6, eos_id=eos)
    first_eos = [list(r).index(eos) if eos in r else None for r in free.tokens.tolist()]
    for row, stop in enumerate(first_eos):
        if stop is None:
            np.testing.assert_array_equal(
                result.tokens[row], free.tokens[row][: result.tokens.shape[1]]
            )
            continue
        assert result.lengths[row] == stop + 1
        np.testing.assert_array_equal(result.tokens[row, : stop + 1], free.tokens[row, : stop + 1])
        assert (result.tokens[row, stop + 1 :] == 0).all()


def test_sampling_is_reproducible_per_key(lm_and_params):
    lm, params = lm_and_params
    tokens, mask = left_pad(PROMPTS, pad_id=0)
    embeddings = lm.apply({"params": params}, jnp.asarray(tokens), method=lm.embed)
    run = lambda key: generate(  # noqa: E731
        lm, params, embeddings, jnp.asarray(mask), max_new_tokens=5, eos_id=-1,
        rng=jax.random.key(key), temperature=1.5, top_p=0.9,
    ).tokens  # fmt: skip
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))
