"""Batched autoregressive generation with a KV cache: prefill once, then a jitted decode step.

Prompts are left-padded to a common length T, so every row's next token goes to the same cache
slot; ``prompt_mask`` hides the padding from attention and positions count real tokens only.
Works on embeddings, so a multimodal prompt (image tokens already in place) decodes the same way
as a text prompt.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mllm_jax.models.decoder_lm import DecoderLM
from mllm_jax.models.sampling import sample_next_token


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    """tokens [B, L] (pad after the stop token), lengths [B] (tokens up to and including the
    first stop token), and the logits [B, L, V] that chose each token (for testing and scoring)."""

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> ([B, T] int32 left-padded ids, [B, T] bool mask of real tokens)."""
    length = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = True
    return tokens, mask


def _decoding_lm(lm: DecoderLM) -> DecoderLM:
    return lm.clone(transformer=dataclasses.replace(lm.transformer, decode=True))


@functools.partial(jax.jit, static_argnames=("lm", "cache_length"))
def _prefill(lm, params, embeddings, prompt_mask, cache_length, cross):
    """Runs the prompt through the decoder, filling cache slots [0, T); last-token logits."""
    batch, length = prompt_mask.shape
    key_valid = jnp.concatenate(
        [prompt_mask, jnp.ones((batch, cache_length - length), bool)], axis=1
    )
    # The cache is shaped by an init call on a full-length input (see MultiHeadAttention).
    cache = jax.eval_shape(
        lambda: lm.init(
            jax.random.key(0),
            jnp.zeros((batch, cache_length, embeddings.shape[-1]), embeddings.dtype),
            method=lm.decode,
            **_cross_kwargs(cross, cache_length),
        )["cache"]
    )
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
    causal = jnp.arange(cache_length)[None, :] <= jnp.arange(length)[:, None]
    attention_mask = (causal[None] & key_valid[:, None, :])[:, None]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0)
    logits, mutated = lm.apply(
        {"params": params, "cache": cache},
        embeddings,
        attention_mask=attention_mask,
        positions=positions,
        method=lm.decode,
        mutable=["cache"],
        **_cross_kwargs(cross, length),
    )
    return logits[:, -1], mutated["cache"], key_valid, positions[:, -1]


def _cross_kwargs(cross, length):
    if cross is None:
        return {}
    context, visible = cross  # [B, C, E'], [B, C]: what the last prompt token may see
    batch, width = visible.shape
    mask = jnp.broadcast_to(visible[:, None, None, :], (batch, 1, length, width))
    return {"cross_inputs": context, "cross_mask": mask}


@functools.partial(jax.jit, static_argnames=("lm",), donate_argnums=(2,))
def _decode_step(lm, params, cache, token, step, key_valid, position, cross):
    """One new token per row at cache slot ``step``; returns its logits and the new cache."""
    attention_mask = (jnp.arange(key_valid.shape[1])[None, :] <= step) & key_valid
    embeddings = lm.apply({"params": params}, token[:, None], method=lm.embed)
    logits, mutated = lm.apply(
        {"params": params, "cache": cache},
        embeddings,
        attention_mask=attention_mask[:, None, None, :],
        positions=position[:, None],
        method=lm.decode,
        mutable=["cache"],
        **_cross_kwargs(cross, 1),
    )
    return logits[:, 0], mutated["cache"]


def generate(
    lm: DecoderLM,
    params: Any,
    prompt_embeddings: jnp.ndarray,
    prompt_mask: jnp.ndarray,
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    pad_id: int = 0,
    rng: jax.Array | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    cross: tuple[jnp.ndarray, jnp.ndarray] | None = None,
) -> GenerationResult:
    """Generates up to ``max_new_tokens`` per row, stopping a row at ``eos_id`` (one id, or
    several: EOS and a chat template's end-of-turn token).

    Args:
      lm: the DecoderLM (its ``decode`` flag is switched on here; params are unchanged).
      params: the DecoderLM's params.
      prompt_embeddings: [B, T, E] left-padded prompt embeddings (``lm.embed`` of the ids, with
        image tokens inserted for a multimodal prompt).
      prompt_mask: [B, T] bool, True on real prompt tokens.
      temperature, top_p: 0 is greedy; see ``models/sampling.py``.
      cross: for cross-attention fusion, (image tokens [B, C, E'], visible [B, C] bool).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lm = _decoding_lm(lm)
    rng = jax.random.key(0) if rng is None else rng
    batch, length = prompt_mask.shape
    logits, cache, key_valid, position = _prefill(
        lm,
        params,
        prompt_embeddings,
        jnp.asarray(prompt_mask, bool),
        length + max_new_tokens,
        cross,
    )
    stop_ids = np.asarray(eos_id, np.int64).reshape(-1)
    tokens, all_logits = [], []
    done = np.zeros(batch, bool)
    for step in range(max_new_tokens):
        token = sample_next_token(
            logits, jax.random.fold_in(rng, step), temperature=temperature, top_p=top_p
        )
        all_logits.append(np.asarray(logits))
        token_np = np.where(done, pad_id, np.asarray(token))
        tokens.append(token_np)
        done |= np.isin(token_np, stop_ids)
        if done.all() or step == max_new_tokens - 1:
            break
        position = position + 1
        logits, cache = _decode_step(
            lm, params, cache, jnp.asarray(token_np), length + step, key_valid, position, cross
        )
    tokens = np.stack(tokens, axis=1)
    is_eos = np.isin(tokens, stop_ids)
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, tokens.shape[1])
    return GenerationResult(tokens=tokens, lengths=lengths, logits=np.stack(all_logits, axis=1))
