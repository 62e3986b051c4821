"""Chat templates: a ``Sample`` becomes token ids plus a per-token supervision mask.

Sequences are built piece by piece: every literal piece is encoded on its own and the ids are
concatenated, so the mask is exact by construction (LLaVA's "tokenization mismatch" came from
tokenizing the whole string and re-aligning it). Below, ``[X]`` is a special id, ``"..."`` a
literal piece, ``*`` marks what a supervised turn trains on; everything else is never supervised.

Template ``v1`` (LLaVA-1.5, vicuna_v1). The rendered text is

  {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

and the pieces are

  [BOS]  system " "                                (only if the sample has a chat or system turn)
  user       [USER:]  *(" " + text)  *" "
  assistant  [ASSISTANT:]  *(" " + text)  *[EOS]
  text       *text                                 (raw document text, no markers, no separator)
  end        *[EOS] if the last turn is a text turn (supervised iff that turn is)

A leading ``system`` turn replaces the default system prompt; an empty system prompt emits
neither it nor its " ". A space is encoded as ``▁`` attached to the word after it (see
``tokenizer.py``), so ``" " + text`` gives the same ids as it does inside the rendered string and
the " " before a role marker is a lone ``▁`` id: the pieces concatenate to exactly
``tokenizer.encode`` of the rendered text, with ``[EOS]`` as an id rather than the text "</s>".

Template ``plain`` (LLaVA stage-1 alignment): no system prompt, no markers, no separators.

  [BOS]
  user       *text
  assistant  *text  *[EOS]
  text       *text
  end        *[EOS] if the last turn is a text turn (supervised iff that turn is)

In both, turn text is emitted verbatim (never stripped), ``*`` follows the turn's
``is_supervised`` (assistant and text turns by default, user turns only when asked, system turns
never), and each ``<image>`` in any piece becomes ``tokens_per_image`` copies of ``image_id``,
never supervised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from mllm_jax.data.sample import IMAGE_PLACEHOLDER, BadRecordError, Sample, Turn, validate_sample
from mllm_jax.data.tokenizer import Tokenizer

TEMPLATES = ("v1", "plain")
V1_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedSample:
    """A templated sample. T = sequence length, BOS included.

    ``supervised[t]`` is True where ``tokens[t]`` is a training target, predicted from
    ``tokens[:t]``; the batch contract's ``loss_mask`` at position t is ``supervised[t + 1]``.
    """

    id: str
    tokens: np.ndarray  # [T] int32
    supervised: np.ndarray  # [T] bool
    num_images: int


class _SequenceBuilder:
    """Accumulates ids and their supervision flags, expanding image placeholders."""

    def __init__(self, tokenizer: Tokenizer, tokens_per_image: int):
        self.tokenizer = tokenizer
        self.tokens_per_image = tokens_per_image
        self.tokens: list[int] = []
        self.supervised: list[bool] = []

    def add_ids(self, ids: Sequence[int], supervised: bool) -> None:
        self.tokens += ids
        self.supervised += [supervised] * len(ids)

    def add_text(self, text: str, supervised: bool) -> None:
        for k, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                self.add_ids([self.tokenizer.image_id] * self.tokens_per_image, False)
            if segment:
                self.add_ids(self.tokenizer.encode(segment), supervised)


def _emit_v1(
    builder: _SequenceBuilder,
    turns: Sequence[Turn],
    system_prompt: str,
    *,
    open_assistant_turn: bool,
) -> None:
    tok = builder.tokenizer
    builder.add_ids([tok.bos_id], False)
    if turns and turns[0].role == "system":
        system, turns = turns[0].text, turns[1:]
    elif open_assistant_turn or any(turn.role in ("user", "assistant") for turn in turns):
        system = system_prompt
    else:
        system = ""  # a pure document gets no chat preamble
    if system:
        builder.add_text(system, False)
        builder.add_text(" ", False)
    for turn in turns:
        supervised = turn.is_supervised
        if turn.role == "user":
            builder.add_ids([tok.user_id], False)
            builder.add_text(" " + turn.text, supervised)
            builder.add_text(" ", supervised)
        elif turn.role == "assistant":
            builder.add_ids([tok.assistant_id], False)
            builder.add_text(" " + turn.text, supervised)
            builder.add_ids([tok.eos_id], supervised)
        else:
            builder.add_text(turn.text, supervised)
    if open_assistant_turn:
        builder.add_ids([tok.assistant_id], False)
    elif turns and turns[-1].role == "text":
        builder.add_ids([tok.eos_id], turns[-1].is_supervised)


def _emit_plain(
    builder: _SequenceBuilder, turns: Sequence[Turn], *, open_assistant_turn: bool
) -> None:
    eos_id = builder.tokenizer.eos_id
    builder.add_ids([builder.tokenizer.bos_id], False)
    for turn in turns:
        builder.add_text(turn.text, turn.is_supervised)
        if turn.role == "assistant":
            builder.add_ids([eos_id], turn.is_supervised)
    if not open_assistant_turn and turns and turns[-1].role == "text":
        builder.add_ids([eos_id], turns[-1].is_supervised)


def _build(
    turns: Sequence[Turn],
    tokenizer: Tokenizer,
    template: str,
    tokens_per_image: int,
    system_prompt: str,
    *,
    open_assistant_turn: bool,
) -> _SequenceBuilder:
    builder = _SequenceBuilder(tokenizer, tokens_per_image)
    if template == "v1":
        _emit_v1(builder, turns, system_prompt, open_assistant_turn=open_assistant_turn)
    else:
        _emit_plain(builder, turns, open_assistant_turn=open_assistant_turn)
    return builder


def _check_sample(sample: Sample, template: str, tokens_per_image: int) -> None:
    """Raises ValueError for bad arguments and BadRecordError for a sample no template fits."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    if tokens_per_image < 1:
        raise ValueError(f"tokens_per_image must be >= 1, got {tokens_per_image}")
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
        if template == "plain":
            raise BadRecordError(
                sample.id, f"turns[{i}].role", "the plain template has no system prompt"
            )
        if turn.supervised:
            raise BadRecordError(
                sample.id, f"turns[{i}].supervised", "system turns are never supervised"
            )


def tokenize_sample(
    sample: Sample,
    tokenizer: Tokenizer,
    *,
    template: str,
    tokens_per_image: int,
    max_length: int | None = None,
    system_prompt: str = V1_SYSTEM_PROMPT,
) -> TokenizedSample:
    """Token ids [T] and supervision mask [T] of ``sample`` under ``template`` ("v1"/"plain").

    Raises BadRecordError (naming the sample id and the field) for an invalid sample, an empty
    answer, a sample ending in an unanswered question, no supervised token, or more than
    ``max_length`` tokens.
    """
    _check_sample(sample, template, tokens_per_image)
    last = len(sample.turns) - 1
    if sample.turns[last].role == "user" and not sample.turns[last].is_supervised:
        raise BadRecordError(
            sample.id,
            f"turns[{last}]",
            "the sample ends with a user turn: a question with no answer",
        )
    builder = _build(
        sample.turns,
        tokenizer,
        template,
        tokens_per_image,
        system_prompt,
        open_assistant_turn=False,
    )
    tokens = np.asarray(builder.tokens, np.int32)
    supervised = np.asarray(builder.supervised, np.bool_)
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
    tokenizer: Tokenizer,
    *,
    template: str,
    tokens_per_image: int,
    system_prompt: str = V1_SYSTEM_PROMPT,
) -> np.ndarray:
    """The ids [T] a model continues to answer ``sample``'s last question.

    A final assistant turn (the reference answer) is dropped; the rest is templated as in
    ``tokenize_sample`` and, for v1, followed by the ``ASSISTANT:`` marker, so the ids equal the
    training sequence up to and including that marker. ``plain`` adds nothing after the prompt.
    """
    _check_sample(sample, template, tokens_per_image)
    turns = sample.turns
    if turns[-1].role == "assistant":
        if IMAGE_PLACEHOLDER in turns[-1].text:
            raise BadRecordError(
                sample.id,
                f"turns[{len(turns) - 1}].text",
                f"the final answer, dropped for generation, holds an {IMAGE_PLACEHOLDER}",
            )
        turns = turns[:-1]
    builder = _build(
        turns, tokenizer, template, tokens_per_image, system_prompt, open_assistant_turn=True
    )
    return np.asarray(builder.tokens, np.int32)
