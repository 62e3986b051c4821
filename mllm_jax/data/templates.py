"""Chat templates: a ``Sample`` becomes token ids plus a per-token supervision mask.

  name      for                                             module
  v1        LLaVA-1.5 (vicuna_v1) on the project tokenizer  piecewise_templates.py
  plain     LLaVA stage-1 alignment: no prompt, no markers  piecewise_templates.py
  llava_v1  LLaVA-1.5 (vicuna_v1) on an imported tokenizer  chat_templates.py
  llama3    Llama 3 instruct                                chat_templates.py
  chatml    Qwen2 (ChatML)                                  chat_templates.py

Every template supervises what a turn's ``is_supervised`` says (assistant and text turns by
default, user turns only when asked, system turns never) together with that turn's end-of-turn
token, never role markers or headers, and expands each ``<image>`` placeholder into
``tokens_per_image`` copies of the tokenizer's ``image_id``, never supervised. The modules
describe each template's exact pieces. ``v1`` needs the project tokenizer (``MarkerTokenizer``);
``plain`` any ``TextTokenizer``; the others a ``ChatTokenizer`` holding their special tokens (an
imported model's ``HFTokenizer``; ``llava_v1`` also works on the project tokenizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import numpy as np

from mllm_jax.data.chat_templates import CHAT_TEMPLATES, CHATML_SYSTEM_PROMPT, render_chat
from mllm_jax.data.piecewise_templates import PIECEWISE_TEMPLATES, render_piecewise
from mllm_jax.data.sample import BadRecordError, Sample, Turn, validate_sample
from mllm_jax.data.tokenizer_protocol import ChatTokenizer, TextTokenizer

TEMPLATES = PIECEWISE_TEMPLATES + CHAT_TEMPLATES
V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
DEFAULT_SYSTEM_PROMPTS = {
    "v1": V1_SYSTEM_PROMPT,
    "plain": "",
    "llava_v1": V1_SYSTEM_PROMPT,
    "llama3": "",
    "chatml": CHATML_SYSTEM_PROMPT,
}
_NO_TEXT_TURNS = ("llama3", "chatml")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedSample:
    """A templated sample. T = sequence length (BOS included where the template has one).

    ``supervised[t]`` is True where ``tokens[t]`` is a training target, predicted from
    ``tokens[:t]``; the batch contract's ``loss_mask`` at position t is ``supervised[t + 1]``.
    """

    id: str
    tokens: np.ndarray  # [T] int32
    supervised: np.ndarray  # [T] bool
    num_images: int


def _build(
    sample: Sample,
    turns: Sequence[Turn],
    tokenizer: TextTokenizer,
    template: str,
    tokens_per_image: int,
    system_prompt: str | None,
    *,
    open_assistant_turn: bool,
) -> tuple[list[int], list[bool]]:
    if system_prompt is None:
        system_prompt = DEFAULT_SYSTEM_PROMPTS[template]
    if template in PIECEWISE_TEMPLATES:
        return render_piecewise(
            turns,
            tokenizer,
            template=template,
            tokens_per_image=tokens_per_image,
            system_prompt=system_prompt,
            open_assistant_turn=open_assistant_turn,
        )
    if not hasattr(type(tokenizer), "encode_with_offsets"):
        raise ValueError(
            f"template {template!r} needs a ChatTokenizer (encode_with_offsets, special_tokens), "
            f"which {type(tokenizer).__name__} is not"
        )
    return render_chat(
        sample.id,
        turns,
        cast(ChatTokenizer, tokenizer),
        template=template,
        tokens_per_image=tokens_per_image,
        system_prompt=system_prompt,
        open_assistant_turn=open_assistant_turn,
    )


def _check_turns(sample: Sample) -> None:
    """The turn rules every template shares (``validate_sample``, answers, system turns)."""
    for i, turn in enumerate(sample.turns):
        if turn.role == "assistant" and not turn.text.strip():
            raise BadRecordError(
                sample.id, f"turns[{i}].text", "empty assistant turn: a question with no answer"
            )
    validate_sample(sample)
    for i, turn in enumerate(sample.turns):
        if turn.role != "system":
            continue
        if i > 0:
            raise BadRecordError(sample.id, f"turns[{i}].role", "a system turn must come first")
        if turn.supervised:
            raise BadRecordError(
                sample.id, f"turns[{i}].supervised", "system turns are never supervised"
            )


def _check_sample(sample: Sample, template: str, tokens_per_image: int) -> None:
    """Raises ValueError for bad arguments and BadRecordError for a sample no template fits."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
    _check_turns(sample)
    for i, turn in enumerate(sample.turns):
        if turn.role == "text" and template in _NO_TEXT_TURNS:
            raise BadRecordError(
                sample.id, f"turns[{i}].role", f"the {template} template has no raw text turns"
            )
        if turn.role == "system" and template == "plain":
            raise BadRecordError(
                sample.id, f"turns[{i}].role", "the plain template has no system prompt"
            )


def _check_answered(sample: Sample) -> None:
    last = len(sample.turns) - 1
    if sample.turns[last].role == "user" and not sample.turns[last].is_supervised:
        raise BadRecordError(
            sample.id,
            f"turns[{last}]",
            "the sample ends with a user turn: a question with no answer",
        )


def check_trainable(sample: Sample) -> None:
    """Raises BadRecordError (naming the sample id and field) for a sample that no template can
    train on: the rules of ``tokenize_sample`` that need no tokenizer (``validate_sample``, an
    empty answer, a misplaced or supervised system turn, a sample ending in an unanswered
    question, no supervised turn). Dataset builders run it when the data is made."""
    _check_turns(sample)
    _check_answered(sample)
    if not any(turn.is_supervised for turn in sample.turns):
        roles = [turn.role for turn in sample.turns]
        raise BadRecordError(
            sample.id, "turns", f"no supervised turn among {roles}: nothing to train on"
        )


def tokenize_sample(
    sample: Sample,
    tokenizer: TextTokenizer,
    *,
    template: str,
    tokens_per_image: int,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> TokenizedSample:
    """Token ids [T] and supervision mask [T] of ``sample`` under ``template`` (one of
    ``TEMPLATES``); ``system_prompt`` None is the template's ``DEFAULT_SYSTEM_PROMPTS`` entry.

    Raises BadRecordError (naming the sample id and the field) for an invalid sample, an empty
    answer, a sample ending in an unanswered question, no supervised token, or more than
    ``max_length`` tokens; ValueError for an unknown template or a tokenizer it cannot use.
    """
    _check_sample(sample, template, tokens_per_image)
    _check_answered(sample)
    ids, flags = _build(
        sample,
        sample.turns,
        tokenizer,
        template,
        tokens_per_image,
        system_prompt,
        open_assistant_turn=False,
    )
    tokens = np.asarray(ids, np.int32)
    supervised = np.asarray(flags, np.bool_)
    if not supervised.any():
        roles = [f"{turn.role}(supervised={turn.is_supervised})" for turn in sample.turns]
        raise BadRecordError(
            sample.id,
            "turns",
            f"no supervised tokens: turns {roles} under template {template!r} leave the loss "
            "nothing to train on",
        )
    if max_length is not None and len(tokens) > max_length:
        raise BadRecordError(
            sample.id,
            "tokens",
            f"{len(tokens)} tokens ({len(sample.images)} images x {tokens_per_image}) exceed "
            f"max_length {max_length}",
        )
    return TokenizedSample(
        id=sample.id, tokens=tokens, supervised=supervised, num_images=len(sample.images)
    )


def prompt_for_generation(
    sample: Sample,
    tokenizer: TextTokenizer,
    *,
    template: str,
    tokens_per_image: int,
    system_prompt: str | None = None,
) -> np.ndarray:
    """The ids [T] a model continues to answer ``sample``'s last question.

    A final assistant turn (the reference answer) is dropped; the rest is templated as in
    ``tokenize_sample`` and followed by the assistant's role marker or header (``ASSISTANT:``
    for v1 and llava_v1, the assistant header for llama3 and chatml), so the ids equal the
    training sequence up to and including it. ``plain`` adds nothing after the prompt.
    """
    _check_sample(sample, template, tokens_per_image)
    turns = sample.turns
    if turns[-1].role == "assistant":
        turns = turns[:-1]
    ids, _ = _build(
        sample,
        turns,
        tokenizer,
        template,
        tokens_per_image,
        system_prompt,
        open_assistant_turn=True,
    )
    return np.asarray(ids, np.int32)
