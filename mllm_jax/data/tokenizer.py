"""A sentencepiece tokenizer carrying the project's special tokens at fixed ids.

  id 0 ``<pad>``  padding (the batch contract pads with 0)
  id 1 ``<unk>``  never produced by ``encode`` (byte fallback covers every character)
  id 2 ``<s>``    BOS, added by the templates, never by ``encode``
  id 3 ``</s>``   EOS, added by the templates; the text "</s>" encodes as plain characters
  id 4 ``<image>``     an image placeholder; expanded to the image's tokens by the templates
  id 5 ``USER:``       the v1 template's role markers, one token each
  id 6 ``ASSISTANT:``

``<image>``, ``USER:`` and ``ASSISTANT:`` are user-defined symbols: wherever they occur in a text
they become their single id. The model keeps text exactly: no normalization, no dummy prefix, no
whitespace collapsing, so ``decode(encode(text)) == text`` and a space is ``▁`` attached to the
start of the word that follows it. That is what lets templates encode their pieces one by one.
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import sentencepiece as spm

PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE = "<pad>", "<unk>", "<s>", "</s>"
IMAGE_PIECE, USER_PIECE, ASSISTANT_PIECE = "<image>", "USER:", "ASSISTANT:"
USER_DEFINED_PIECES = (IMAGE_PIECE, USER_PIECE, ASSISTANT_PIECE)
SPECIAL_PIECES = (PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE, *USER_DEFINED_PIECES)
_NUM_BYTE_PIECES = 256


def train_tokenizer(
    texts: Iterable[str],
    model_path_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    max_sentence_length: int = 1 << 16,
) -> str:
    """Trains a sentencepiece model on ``texts`` and returns the path of ``<prefix>.model``.

    The ids of ``SPECIAL_PIECES`` are 0..6, then 256 byte pieces, then the learned pieces.
    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus, such as
    easy-VQA's ~40 distinct words, yields fewer pieces. Training is single-threaded and reads
    every text, so the same texts in the same order give the same vocabulary. BPE is the
    default because on small, repetitive corpora (easy-VQA) unigram stops early and splits
    frequent words ("▁ye" "s"), while BPE keeps merging up to ``vocab_size``. Empty texts are
    skipped, and so are texts longer than ``max_sentence_length`` bytes (counted in a warning).
    """
    minimum = len(SPECIAL_PIECES) + _NUM_BYTE_PIECES + 1
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is below {minimum}: byte fallback alone takes "
            f"{_NUM_BYTE_PIECES} ids and the special tokens {len(SPECIAL_PIECES)}"
        )
    pathlib.Path(model_path_prefix).parent.mkdir(parents=True, exist_ok=True)
    num_texts = num_too_long = 0

    def usable_texts() -> Iterator[str]:
        nonlocal num_texts, num_too_long
        for text in texts:
            if len(text.encode()) > max_sentence_length:
                num_too_long += 1
            elif text:
                num_texts += 1
                yield text

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=usable_texts(),
            model_prefix=model_path_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            hard_vocab_limit=False,
            byte_fallback=True,
            character_coverage=character_coverage,
            max_sentence_length=max_sentence_length,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=PAD_PIECE,
            unk_piece=UNK_PIECE,
            bos_piece=BOS_PIECE,
            eos_piece=EOS_PIECE,
            user_defined_symbols=list(USER_DEFINED_PIECES),
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as error:
        if num_texts == 0:
            raise ValueError(
                f"train_tokenizer got no usable texts ({num_too_long} longer than "
                f"max_sentence_length {max_sentence_length} bytes, the rest empty)"
            ) from error
        raise
    if num_too_long:
        logging.warning(
            "train_tokenizer skipped %d texts longer than max_sentence_length %d bytes",
            num_too_long,
            max_sentence_length,
        )
    return f"{model_path_prefix}.model"


def encode_with_offsets_sentencepiece(
    processor: spm.SentencePieceProcessor, text: str, special_tokens: Mapping[str, int]
) -> tuple[list[int], list[tuple[int, int]]]:
    """ids [T] of ``text`` and their (start, end) character spans, each ``special_tokens`` text
    becoming its id and every stretch between them encoded by ``processor`` on its own (as
    Hugging Face's sentencepiece tokenizers do, dummy prefix included)."""
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pattern = "|".join(re.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
    position = 0
    for match in re.finditer(pattern, text) if special_tokens else ():
        _encode_stretch(processor, text, position, match.start(), ids, offsets)
        ids.append(special_tokens[match.group()])
        offsets.append(match.span())
        position = match.end()
    _encode_stretch(processor, text, position, len(text), ids, offsets)
    return ids, offsets


def _encode_stretch(
    processor: spm.SentencePieceProcessor,
    text: str,
    start: int,
    end: int,
    ids: list[int],
    offsets: list[tuple[int, int]],
) -> None:
    if start == end:
        return
    stretch = text[start:end]
    # sentencepiece reports byte offsets; char_bytes[c] is where character c starts.
    char_bytes = np.cumsum([0] + [len(c.encode()) for c in stretch])
    for piece in processor.encode(stretch, return_type="proto").pieces:
        begin = int(np.searchsorted(char_bytes, piece.begin, side="right")) - 1
        finish = int(np.searchsorted(char_bytes, piece.end, side="left"))
        ids.append(piece.id)
        offsets.append((start + begin, start + max(begin, finish)))


class Tokenizer:
    """Text <-> ids with a model from ``train_tokenizer`` (or any model with the same specials)."""

    def __init__(self, processor: spm.SentencePieceProcessor, *, name: str = "<in memory>"):
        self._sp = processor
        self._name = name
        self._check_special_pieces()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a ``.model`` file; raises FileNotFoundError naming the path if it is absent."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model file {path!r} does not exist")
        return cls(spm.SentencePieceProcessor(model_file=path), name=path)

    def _check_special_pieces(self) -> None:
        size = self._sp.get_piece_size()
        problems = []
        for i, piece in enumerate(SPECIAL_PIECES):
            found = self._sp.id_to_piece(i) if i < size else None
            if found != piece:
                problems.append(f"id {i} is {found!r}, expected {piece!r}")
            # A piece of the right name that is not user-defined would be split by the encoder.
            elif piece in USER_DEFINED_PIECES and self._sp.encode(piece) != [i]:
                problems.append(f"{piece!r} is not a user-defined symbol")
        control = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if control != (0, 1, 2, 3):
            problems.append(f"(pad, unk, bos, eos) ids are {control}, expected (0, 1, 2, 3)")
        if problems:
            raise ValueError(
                f"tokenizer model {self._name!r} lacks the required special tokens: "
                + "; ".join(problems)
                + " (train it with mllm_jax.data.tokenizer.train_tokenizer)"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 2

    @property
    def eos_id(self) -> int:
        return 3

    @property
    def image_id(self) -> int:
        return 4

    @property
    def user_id(self) -> int:
        return 5

    @property
    def assistant_id(self) -> int:
        return 6

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, without BOS or EOS; each "<image>" becomes ``image_id``."""
        return self._sp.encode(text)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """The texts of the special pieces (ids 0..6) -> their ids."""
        return {piece: i for i, piece in enumerate(SPECIAL_PIECES)}

    def special_id(self, token: str) -> int:
        """The id of one of ``SPECIAL_PIECES``; ValueError for any other text."""
        if token not in SPECIAL_PIECES:
            raise ValueError(
                f"tokenizer model {self._name!r} has no special token {token!r}: its special "
                f"tokens are {list(SPECIAL_PIECES)}"
            )
        return SPECIAL_PIECES.index(token)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids [T] and character spans of ``text`` in which, unlike ``encode``, the texts of
        all ``SPECIAL_PIECES`` ("<s>", "</s>" too) become their ids."""
        return encode_with_offsets_sentencepiece(self._sp, text, self.special_tokens)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``; padding, BOS and EOS (control pieces) decode to nothing."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        outside = ids[(ids < 0) | (ids >= self.vocab_size)]
        if outside.size:
            raise ValueError(f"ids {outside[:5].tolist()} are outside [0, {self.vocab_size})")
        return self._sp.decode(ids.tolist())

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (for inspection and debugging)."""
        return self._sp.id_to_piece(token_id)

    # Grain workers receive transforms by pickling; carry the model bytes, not the file path.
    def __getstate__(self) -> dict:
        return {"model": self._sp.serialized_model_proto(), "name": self._name}

    def __setstate__(self, state: dict) -> None:
        self._sp = spm.SentencePieceProcessor(model_proto=state["model"])
        self._name = state["name"]
