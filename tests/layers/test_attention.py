"""dot_product_attention and MultiHeadAttention against plain-numpy loop references (float64).

Tolerance everywhere: float32 library output vs float64 reference, rtol=1e-5, atol=1e-6.
Masks are built in numpy from each kind's definition, so these tests do not depend on
make_attention_mask (tested on its own in test_masks.py).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers.attention import MultiHeadAttention, dot_product_attention

RTOL, ATOL = 1e-5, 1e-6

# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def ref_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None):
    """Loop reference. Query head h reads kv head h // (H // K). Rows with no key: uniform."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, length, heads, dim = q.shape
    keys, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    out = np.zeros((batch, length, heads, dim))
    for b in range(batch):
        for h in range(heads):
            kvh = h // group
            for n in range(length):
                allowed = [mask is None or bool(mask[b, 0, n, s]) for s in range(keys)]
                logits = [
                    float(np.dot(q[b, n, h], k[b, s, kvh])) / math.sqrt(dim) for s in range(keys)
                ]
                if any(allowed):
                    top = max(lg for lg, ok in zip(logits, allowed, strict=True) if ok)
                    w = [
                        math.exp(lg - top) if ok else 0.0
                        for lg, ok in zip(logits, allowed, strict=True)
                    ]
                else:
                    w = [1.0] * keys
                total = sum(w)
                for s in range(keys):
                    out[b, n, h] += (w[s] / total) * v[b, s, kvh]
    return out


def ref_rope(x: np.ndarray, positions: np.ndarray, max_wavelength: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    batch, length, heads, dim = x.shape
    half = dim // 2
    for b in range(batch):
        for n in range(length):
            for h in range(heads):
                for i in range(half):
                    theta = positions[b, n] * max_wavelength ** (-2.0 * i / dim)
                    c, s = math.cos(theta), math.sin(theta)
                    a, z = x[b, n, h, i], x[b, n, h, i + half]
                    out[b, n, h, i] = a * c - z * s
                    out[b, n, h, i + half] = z * c + a * s
    return out


def causal(batch, n):
    return np.array([[[[k <= q for k in range(n)] for q in range(n)]]] * batch)


def bidirectional(batch, n):
    return np.ones((batch, 1, n, n), bool)


def prefix(prefix_lengths, n):
    return np.array(
        [[[[k < p or k <= q for k in range(n)] for q in range(n)]] for p in prefix_lengths]
    )


def padded(base, input_mask):
    return base & input_mask[:, None, None, :] & input_mask[:, None, :, None]


def packed(base, segment_ids):
    return base & (segment_ids[:, None, None, :] == segment_ids[:, None, :, None])


B, N = 2, 7


def mask_of_kind(kind: str) -> np.ndarray | None:
    if kind == "none":
        return None
    if kind == "causal":
        return causal(B, N)
    if kind == "bidirectional":
        return bidirectional(B, N)
    if kind == "prefix":
        return prefix([3, 5], N)
    if kind == "semi_causal_span":  # causal with a bidirectional span [2, 5) in each row
        m = causal(B, N)
        m[:, 0, 2:5, 2:5] = True
        return m
    if kind == "padding":  # causal, row 0 padded after 4 tokens, row 1 full
        valid = np.array([[1, 1, 1, 1, 0, 0, 0], [1] * 7], bool)
        return padded(causal(B, N), valid)
    if kind == "packed":
        seg = np.array([[1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 2, 2, 2]])
        return packed(causal(B, N), seg)
    raise AssertionError(kind)


def random_qkv(seed, heads, kv_heads, dim=8, batch=B, length=N, keys=None):
    rng = np.random.default_rng(seed)
    keys = length if keys is None else keys
    q = rng.normal(size=(batch, length, heads, dim)).astype(np.float32)
    k = rng.normal(size=(batch, keys, kv_heads, dim)).astype(np.float32)
    v = rng.normal(size=(batch, keys, kv_heads, dim)).astype(np.float32)
    return q, k, v


# One compiled program per shape instead of one per primitive keeps the suite fast on CPU.
jit_attention = jax.jit(dot_product_attention)


def run_attention(q, k, v, mask):
    out = jit_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None if mask is None else jnp.asarray(mask)
    )
    return np.asarray(out)


MASK_KINDS = ["none", "causal", "bidirectional", "prefix", "semi_causal_span", "padding", "packed"]

# --------------------------------------------------------------------------------------------
# dot_product_attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(
    ("heads", "kv_heads"), [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "mqa"]
)
def test_attention_matches_loop_reference(kind, heads, kv_heads):
    q, k, v = random_qkv(10, heads, kv_heads)
    mask = mask_of_kind(kind)
    got = run_attention(q, k, v, mask)
    assert got.shape == (B, N, heads, 8) and got.dtype == np.float32
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref_attention(q, k, v, mask), rtol=RTOL, atol=ATOL)


def test_attention_with_different_key_length():
    q, k, v = random_qkv(11, 4, 2, keys=5)
    rng = np.random.default_rng(12)
    mask = rng.random((B, 1, N, 5)) > 0.3
    mask[..., 0] = True
    got = run_attention(q, k, v, mask)
    np.testing.assert_allclose(got, ref_attention(q, k, v, mask), rtol=RTOL, atol=ATOL)


def test_fully_padded_rows_get_uniform_weights_and_no_nan():
    q, k, v = random_qkv(13, 4, 2)
    valid = np.array([[1, 1, 1, 0, 0, 0, 0], [0] * 7], bool)  # row 1 entirely padding
    mask = padded(causal(B, N), valid)
    got = run_attention(q, k, v, mask)
    assert not np.isnan(got).any()
    # Padded queries have no allowed key: uniform average over all (padded too) values.
    group = 2
    for b, n in [(0, 3), (0, 6), (1, 0), (1, 6)]:
        for h in range(4):
            np.testing.assert_allclose(
                got[b, n, h], v[b, :, h // group].astype(np.float64).mean(0), rtol=RTOL, atol=ATOL
            )
    # Real queries still match the reference and ignore padded keys.
    np.testing.assert_allclose(
        got[0, :3], ref_attention(q, k, v, mask)[0, :3], rtol=RTOL, atol=ATOL
    )


def test_masked_keys_do_not_influence_output():
    q, k, v = random_qkv(14, 4, 2)
    mask = causal(B, N)
    base = run_attention(q, k, v, mask)
    k2, v2 = k.copy(), v.copy()
    k2[:, -1] += 100.0  # the last key is visible only to the last query
    v2[:, -1] -= 50.0
    moved = run_attention(q, k2, v2, mask)
    np.testing.assert_allclose(moved[:, :-1], base[:, :-1], rtol=RTOL, atol=ATOL)
    assert not np.allclose(moved[:, -1], base[:, -1])


def test_query_heads_are_grouped_consecutively_over_kv_heads():
    # kv head 0 values are all 0, kv head 1 values all 1: with H=4, K=2, heads 0,1 -> 0; 2,3 -> 1.
    q, k, _ = random_qkv(15, 4, 2)
    v = np.zeros_like(k)
    v[:, :, 1] = 1.0
    got = run_attention(q, k, v, causal(B, N))
    np.testing.assert_allclose(got[:, :, :2], 0.0, atol=ATOL)
    np.testing.assert_allclose(got[:, :, 2:], 1.0, rtol=RTOL)


def test_attention_rejects_heads_not_multiple_of_kv_heads():
    q, k, v = random_qkv(16, 3, 2)
    with pytest.raises(ValueError, match="do not group over"):
        run_attention(q, k, v, None)


# --------------------------------------------------------------------------------------------
# MultiHeadAttention module
# --------------------------------------------------------------------------------------------


def ref_module(params, x, mask, positions, use_rope, max_wavelength):
    x = np.asarray(x, np.float64)
    wq, wk, wv, wo = (
        np.asarray(params[name]["kernel"], np.float64) for name in ("query", "key", "value", "out")
    )
    q = np.einsum("bne,ehd->bnhd", x, wq)
    k = np.einsum("bne,ehd->bnhd", x, wk)
    v = np.einsum("bne,ehd->bnhd", x, wv)
    if use_rope:
        q = ref_rope(q, positions, max_wavelength)
        k = ref_rope(k, positions, max_wavelength)
    attn = ref_attention(q, k, v, mask)
    return np.einsum("bnhd,hde->bne", attn, wo)


# All module configurations share E=12, D=8, H=4 so that eager compilation of the
# initialisers is reused between tests; "rbg" keys only make that compilation cheaper.
EMBED, HEAD_DIM, HEADS = 12, 8, 4


def init_params(module, *args):
    variables = module.init(jax.random.key(0, impl="rbg"), *args)
    return nn.unbox(variables)["params"]


@pytest.mark.parametrize(
    ("kv_heads", "use_rope", "kind"),
    [
        (4, True, "causal"),
        (2, True, "packed"),
        (1, True, "prefix"),
        (2, False, "padding"),
        (2, True, "none"),
    ],
)
def test_multi_head_attention_matches_numpy(kv_heads, use_rope, kind):
    wavelength = 100.0
    rng = np.random.default_rng(20)
    x = rng.normal(size=(B, N, EMBED)).astype(np.float32)
    mask = mask_of_kind(kind)
    if kind == "packed":  # positions restart per segment
        positions = np.array([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 0, 1, 2]])
    else:
        positions = np.tile(np.arange(N), (B, 1)) + np.array([[0], [3]])
    module = MultiHeadAttention(
        num_heads=HEADS,
        num_kv_heads=kv_heads,
        head_dim=HEAD_DIM,
        use_rope=use_rope,
        rope_max_wavelength=wavelength,
    )
    args = (jnp.asarray(x), None if mask is None else jnp.asarray(mask), jnp.asarray(positions))
    params = init_params(module, *args)
    assert params["query"]["kernel"].shape == (EMBED, HEADS, HEAD_DIM)
    assert params["key"]["kernel"].shape == (EMBED, kv_heads, HEAD_DIM)
    assert params["value"]["kernel"].shape == (EMBED, kv_heads, HEAD_DIM)
    assert params["out"]["kernel"].shape == (HEADS, HEAD_DIM, EMBED)
    got = np.asarray(module.apply({"params": params}, *args))
    want = ref_module(params, x, mask, positions, use_rope, wavelength)
    assert got.shape == (B, N, EMBED)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("bias", ["qkv", "all"])
def test_multi_head_attention_biases_match_numpy(bias):
    """Qwen2 ("qkv": q, k, v biased) and CLIP/SigLIP ("all": the output projection too)."""
    rng = np.random.default_rng(21)
    x = rng.normal(size=(B, N, EMBED)).astype(np.float32)
    mask = mask_of_kind("causal")
    positions = np.tile(np.arange(N), (B, 1))
    module = MultiHeadAttention(num_heads=HEADS, num_kv_heads=2, head_dim=HEAD_DIM, bias=bias)
    args = (jnp.asarray(x), jnp.asarray(mask), jnp.asarray(positions))
    params = init_params(module, *args)
    biased = {"query": (HEADS, HEAD_DIM), "key": (2, HEAD_DIM), "value": (2, HEAD_DIM)}
    if bias == "all":
        biased["out"] = (EMBED,)
    assert {k: v["bias"].shape for k, v in params.items() if "bias" in v} == biased
    params = jax.tree_util.tree_map(  # biases start at zero: make them matter
        lambda a: a + 0.3 * rng.normal(size=a.shape).astype(np.float32), params
    )
    got = np.asarray(module.apply({"params": params}, *args))
    b = {k: np.asarray(v.get("bias", 0.0), np.float64) for k, v in params.items()}
    x64 = np.asarray(x, np.float64)
    q, k, v = (
        np.einsum("bne,ehd->bnhd", x64, np.asarray(params[n]["kernel"], np.float64)) + b[n]
        for n in ("query", "key", "value")
    )
    q, k = ref_rope(q, positions, 10_000.0), ref_rope(k, positions, 10_000.0)
    attended = ref_attention(q, k, v, mask)
    want = np.einsum("bnhd,hde->bne", attended, np.asarray(params["out"]["kernel"])) + b["out"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_attention_rejects_an_unknown_bias_kind():
    module = MultiHeadAttention(num_heads=2, num_kv_heads=2, head_dim=4, bias="q")
    with pytest.raises(ValueError, match="attention bias 'q' is not one of"):
        module.init(jax.random.key(0), jnp.ones((1, 2, 8)), None, jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("use_rope", [True, False])
def test_multi_head_attention_depends_on_positions_only_with_rope(use_rope):
    rng = np.random.default_rng(21)
    x = jnp.asarray(rng.normal(size=(B, N, EMBED)).astype(np.float32))
    mask = jnp.asarray(causal(B, N))
    pos_a = jnp.tile(jnp.arange(N), (B, 1))
    module = MultiHeadAttention(HEADS, num_kv_heads=2, head_dim=HEAD_DIM, use_rope=use_rope)
    params = {"params": init_params(module, x, mask, pos_a)}
    out_a = np.asarray(module.apply(params, x, mask, pos_a))
    # Shifting all positions together never matters (RoPE is relative) ...
    out_shift = np.asarray(module.apply(params, x, mask, pos_a + 7))
    np.testing.assert_allclose(out_shift, out_a, rtol=1e-4, atol=1e-5)
    # ... but stretching them does, and only with RoPE.
    out_b = np.asarray(module.apply(params, x, mask, pos_a * 2))
    assert np.allclose(out_a, out_b, rtol=RTOL, atol=ATOL) != use_rope
