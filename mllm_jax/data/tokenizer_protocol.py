"""What templates and pipelines require of a tokenizer, as structural types.

Two implementations exist: the project's sentencepiece ``Tokenizer`` (``tokenizer.py``, fixed
special ids) and ``HFTokenizer`` (``hf_tokenizer.py``, an imported model's own tokenizer). Both
are ``ChatTokenizer``s; only the project tokenizer is a ``MarkerTokenizer`` (template ``v1``
needs its one-id ``USER:`` / ``ASSISTANT:`` markers).

A special id the tokenizer does not have (Qwen2 has no BOS, Llama 3 no padding, a text-only LLM
no image token) raises ValueError naming the tokenizer's files when it is read, not when the
tokenizer is loaded, so a template that never needs it still works.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np


class TextTokenizer(Protocol):
    """Text <-> ids, and the special ids the templates, packing and generation use."""

    @property
    def vocab_size(self) -> int:
        """Number of ids; every id is in [0, vocab_size)."""
        ...

    @property
    def pad_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def image_id(self) -> int:
        """The id one image position holds; templates repeat it once per image token."""
        ...

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without BOS or EOS added."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``; padding, BOS and EOS decode to nothing."""
        ...


class ChatTokenizer(TextTokenizer, Protocol):
    """A tokenizer that can encode a whole rendered conversation and locate every token in it."""

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Text -> id of every token that ``encode_with_offsets`` recognizes as one unit."""
        ...

    def special_id(self, token: str) -> int:
        """The id of the special token ``token`` (e.g. ``"<|im_start|>"``); ValueError naming
        the tokenizer's files if it has no such token."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids [T] of ``text`` as the model tokenizes a rendered chat (every ``special_tokens``
        text becomes its id; nothing is added), and each id's (start, end) character span in
        ``text`` (empty for a token such as a dummy-prefix "▁" that covers no character)."""
        ...


class MarkerTokenizer(ChatTokenizer, Protocol):
    """A tokenizer with one-id role markers (the project tokenizer's ``USER:``/``ASSISTANT:``)."""

    @property
    def user_id(self) -> int: ...

    @property
    def assistant_id(self) -> int: ...
