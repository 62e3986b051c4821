"""Templates ``v1`` and ``plain``: every literal piece is encoded on its own.

The ids of the pieces are concatenated, so the mask is exact by construction (LLaVA's
"tokenization mismatch" came from tokenizing the whole string and re-aligning it). Below, ``[X]``
is a special id, ``"..."`` a literal piece, ``*`` marks what a supervised turn trains on;
everything else is never supervised.

Template ``v1`` (LLaVA-1.5, vicuna_v1, on the project tokenizer). The rendered text is

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
The one-id markers need a ``MarkerTokenizer``: on an imported model's tokenizer, where "USER:" is
plain text, the same conversation is template ``llava_v1`` (``chat_templates.py``).

Template ``plain`` (LLaVA stage-1 alignment): no system prompt, no markers, no separators.

  [BOS]
  user       *text
  assistant  *text  *[EOS]
  text       *text
  end        *[EOS] if the last turn is a text turn (supervised iff that turn is)

In both, turn text is emitted verbatim (never stripped) and each ``<image>`` in any piece becomes
``tokens_per_image`` copies of ``image_id``, never supervised. With ``open_assistant_turn`` (a
generation prompt) ``v1`` ends with ``[ASSISTANT:]`` and ``plain`` adds nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from mllm_jax.data.sample import IMAGE_PLACEHOLDER, Turn
from mllm_jax.data.tokenizer_protocol import MarkerTokenizer, TextTokenizer

PIECEWISE_TEMPLATES = ("v1", "plain")


class _SequenceBuilder:
    """Accumulates ids and their supervision flags, expanding image placeholders."""

    def __init__(self, tokenizer: TextTokenizer, tokens_per_image: int):
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
    tok: MarkerTokenizer,
    turns: Sequence[Turn],
    system_prompt: str,
    *,
    open_assistant_turn: bool,
) -> None:
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


def render_piecewise(
    turns: Sequence[Turn],
    tokenizer: TextTokenizer,
    *,
    template: str,
    tokens_per_image: int,
    system_prompt: str,
    open_assistant_turn: bool,
) -> tuple[list[int], list[bool]]:
    """ids [T] and supervision flags [T] of ``turns`` under ``v1`` or ``plain``.

    Raises ValueError if ``template`` is ``v1`` and ``tokenizer`` has no one-id role markers.
    """
    builder = _SequenceBuilder(tokenizer, tokens_per_image)
    if template == "v1":
        if not (hasattr(type(tokenizer), "user_id") and hasattr(type(tokenizer), "assistant_id")):
            raise ValueError(
                f"template 'v1' needs the project tokenizer's one-id USER:/ASSISTANT: markers, "
                f"which {type(tokenizer).__name__} lacks; for an imported model's tokenizer use "
                "template 'llava_v1' (the same conversation, markers as text)"
            )
        marker_tokenizer = cast(MarkerTokenizer, tokenizer)
        _emit_v1(
            builder, marker_tokenizer, turns, system_prompt, open_assistant_turn=open_assistant_turn
        )
    else:
        _emit_plain(builder, turns, open_assistant_turn=open_assistant_turn)
    return builder.tokens, builder.supervised
