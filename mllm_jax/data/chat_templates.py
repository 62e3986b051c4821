"""Templates ``llava_v1``, ``llama3`` and ``chatml``: an imported model's own chat formats.

The conversation is rendered to the exact text the model's Jinja chat template renders, and that
whole text is tokenized by the model's tokenizer, so the ids equal ``transformers``'
``apply_chat_template(messages, tokenize=True)`` (each image token then repeated
``tokens_per_image`` times). Encoding pieces one by one would not: a sentencepiece tokenizer adds a
dummy prefix at every call, and a byte-level BPE can join whitespace across piece boundaries. The
supervision mask comes from each token's character span: a token is supervised iff the text it
covers is. A token covering both supervised and unsupervised text, or turn text that holds a
special token's text (``"<|im_end|>"`` in a user message), is a BadRecordError.

A supervised turn trains on its text and its end-of-turn token (assistant turns by default, see
``sample.py``); role headers, system prompts and image positions are never supervised.

``llava_v1`` (LLaVA-1.5 / Vicuna v1 on the model's tokenizer, e.g. llava-hf's; the conversation
of ``v1`` with the role markers as text and BOS/EOS as the tokenizer's own tokens)::

  {bos}{system} USER: {q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}

  supervised: " {a}" and its {eos}; " {q}" only for a supervised user turn (``v1`` also
  supervises the " " after it). ``text`` turns are raw, a final one followed by {eos}.

``llama3`` (Llama 3 instruct; turn text is stripped, as Meta's template does)::

  <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{system}<|eot_id|>
  <|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>\\n\\n{a}<|eot_id|>

  supervised: {a} and its <|eot_id|>.

``chatml`` (Qwen2; no BOS)::

  <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n
  <|im_start|>assistant\\n{a}<|im_end|>\\n

  supervised: {a} and its <|im_end|> (not the "\\n" after it).

Line breaks above are for reading; ``\\n`` is the only newline in the text. An empty system
prompt emits no system block. Generation prompts end with the assistant header ("ASSISTANT:",
``<|start_header_id|>assistant<|end_header_id|>\\n\\n``, ``<|im_start|>assistant\\n``). Each
``<image>`` placeholder is rendered as the tokenizer's image token. ``llama3`` and ``chatml`` have
no raw ``text`` turns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mllm_jax.data.sample import IMAGE_PLACEHOLDER, BadRecordError, Turn
from mllm_jax.data.tokenizer_protocol import ChatTokenizer

CHAT_TEMPLATES = ("llava_v1", "llama3", "chatml")
CHATML_SYSTEM_PROMPT = "You are a helpful assistant."
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


@dataclasses.dataclass(frozen=True)
class _Piece:
    text: str
    supervised: bool
    kind: str  # "markup" (template text), "content" (turn text) or "image"


class _Rendering:
    """The rendered text as pieces, each with its supervision and kind."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.pieces: list[_Piece] = []

    def markup(self, text: str, supervised: bool = False) -> None:
        self.pieces.append(_Piece(text, supervised, "markup"))

    def content(self, text: str, supervised: bool) -> None:
        for k, segment in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                image_text = _text_of(self.tokenizer, self.tokenizer.image_id, "image")
                self.pieces.append(_Piece(image_text, False, "image"))
            if segment:
                self.pieces.append(_Piece(segment, supervised, "content"))


def _text_of(tokenizer: ChatTokenizer, token_id: int, role: str) -> str:
    """The text of the special token ``token_id`` (the template writes it into the text)."""
    for text, special_id in tokenizer.special_tokens.items():
        if special_id == token_id:
            return text
    raise ValueError(
        f"the {role} id {token_id} is not one of the tokenizer's special tokens, so a chat "
        "template cannot write it as text"
    )


def _require(tokenizer: ChatTokenizer, template: str, tokens: Sequence[str]) -> None:
    for token in tokens:
        try:
            tokenizer.special_id(token)
        except ValueError as e:
            raise ValueError(f"template {template!r} needs the special token {token!r}: {e}") from e


def _split_system(turns: Sequence[Turn], default: str) -> tuple[str, Sequence[Turn]]:
    if turns and turns[0].role == "system":
        return turns[0].text, turns[1:]
    return default, turns


def _render_llava_v1(
    out: _Rendering, turns: Sequence[Turn], system_prompt: str, open_assistant_turn: bool
) -> None:
    tokenizer = out.tokenizer
    eos = _text_of(tokenizer, tokenizer.eos_id, "EOS")
    out.markup(_text_of(tokenizer, tokenizer.bos_id, "BOS"))
    is_chat = open_assistant_turn or any(t.role in ("user", "assistant") for t in turns)
    system, turns = _split_system(turns, system_prompt if is_chat else "")
    if system:
        out.content(system, False)
        out.markup(" ")
    for turn in turns:
        supervised = turn.is_supervised
        if turn.role == "user":
            out.markup("USER:")
            out.content(" " + turn.text, supervised)
            # Unlike v1's lone "▁" id, this space may join the next marker ("▁ASSISTANT").
            out.markup(" ")
        elif turn.role == "assistant":
            out.markup("ASSISTANT:")
            out.content(" " + turn.text, supervised)
            out.markup(eos, supervised)
        else:
            out.content(turn.text, supervised)
    if open_assistant_turn:
        out.markup("ASSISTANT:")
    elif turns and turns[-1].role == "text":
        out.markup(eos, turns[-1].is_supervised)


def _render_llama3(
    out: _Rendering, turns: Sequence[Turn], system_prompt: str, open_assistant_turn: bool
) -> None:
    def header(role: str) -> None:
        out.markup(f"<|start_header_id|>{role}<|end_header_id|>\n\n")

    out.markup("<|begin_of_text|>")
    system, turns = _split_system(turns, system_prompt)
    if system.strip():
        header("system")
        out.content(system.strip(), False)
        out.markup("<|eot_id|>")
    for turn in turns:
        header(turn.role)
        out.content(turn.text.strip(), turn.is_supervised)
        out.markup("<|eot_id|>", turn.is_supervised)
    if open_assistant_turn:
        header("assistant")


def _render_chatml(
    out: _Rendering, turns: Sequence[Turn], system_prompt: str, open_assistant_turn: bool
) -> None:
    system, turns = _split_system(turns, system_prompt)
    if system:
        out.markup("<|im_start|>system\n")
        out.content(system, False)
        out.markup("<|im_end|>")
        out.markup("\n")
    for turn in turns:
        out.markup(f"<|im_start|>{turn.role}\n")
        out.content(turn.text, turn.is_supervised)
        out.markup("<|im_end|>", turn.is_supervised)
        out.markup("\n")
    if open_assistant_turn:
        out.markup("<|im_start|>assistant\n")


_RENDERERS = {"llava_v1": _render_llava_v1, "llama3": _render_llama3, "chatml": _render_chatml}
_REQUIRED_TOKENS = {"llava_v1": (), "llama3": LLAMA3_TOKENS, "chatml": CHATML_TOKENS}


def _tokenize_pieces(
    pieces: Sequence[_Piece], tokenizer: ChatTokenizer, tokens_per_image: int, sample_id: str
) -> tuple[list[int], list[bool]]:
    text = "".join(piece.text for piece in pieces)
    piece_of_char = [i for i, piece in enumerate(pieces) for _ in piece.text]
    special_ids = set(tokenizer.special_tokens.values())
    num_images = sum(piece.kind == "image" for piece in pieces)
    image_id = tokenizer.image_id if num_images else None
    tokens: list[int] = []
    supervised: list[bool] = []
    last = len(text) - 1
    ids, offsets = tokenizer.encode_with_offsets(text)
    for token_id, (start, end) in zip(ids, offsets, strict=True):
        # A token covering no character (a dummy-prefix "▁") belongs to the piece it precedes.
        first = piece_of_char[min(start, last)]
        hit = pieces[first : (piece_of_char[end - 1] if end > start else first) + 1]
        kinds = {piece.kind for piece in hit}
        covered_text = text[start:end]
        if token_id == image_id and "image" in kinds:
            tokens += [token_id] * tokens_per_image
            supervised += [False] * tokens_per_image
            continue
        if "image" in kinds:
            raise BadRecordError(
                sample_id,
                "images",
                f"the image token text {covered_text!r} tokenized as id {token_id}, not as the "
                f"image id {image_id}",
            )
        if token_id in special_ids and "content" in kinds:
            raise BadRecordError(
                sample_id,
                "turns",
                f"turn text holds {covered_text!r}, which the tokenizer reads as the special "
                f"token {token_id}",
            )
        flags = {piece.supervised for piece in hit}
        if len(flags) > 1:
            raise BadRecordError(
                sample_id,
                "turns",
                f"the token {token_id} ({covered_text!r}) covers both supervised and "
                "unsupervised text, so the loss mask cannot split it",
            )
        tokens.append(token_id)
        supervised.append(flags.pop())
    if num_images and tokens.count(image_id) != num_images * tokens_per_image:
        raise BadRecordError(
            sample_id,
            "images",
            f"{num_images} image placeholders gave {tokens.count(image_id)} image ids, expected "
            f"{num_images} x {tokens_per_image}",
        )
    return tokens, supervised


def render_chat(
    sample_id: str,
    turns: Sequence[Turn],
    tokenizer: ChatTokenizer,
    *,
    template: str,
    tokens_per_image: int,
    system_prompt: str,
    open_assistant_turn: bool,
) -> tuple[list[int], list[bool]]:
    """ids [T] and supervision flags [T] of ``turns`` under ``llava_v1``, ``llama3`` or
    ``chatml``.

    Raises:
      ValueError: the tokenizer lacks a token the template writes (naming it).
      BadRecordError: a token straddles supervised and unsupervised text, or turn text holds a
        special token's text.
    """
    _require(tokenizer, template, _REQUIRED_TOKENS[template])
    rendering = _Rendering(tokenizer)
    _RENDERERS[template](rendering, turns, system_prompt, open_assistant_turn)
    pieces = [piece for piece in rendering.pieces if piece.text]
    return _tokenize_pieces(pieces, tokenizer, tokens_per_image, sample_id)
