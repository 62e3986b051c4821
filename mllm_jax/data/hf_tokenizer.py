"""An imported Hugging Face model's own tokenizer, loaded from its model directory.

The directory is what ``save_pretrained`` writes (or a hub snapshot holds):

  tokenizer.json           a fast tokenizer, read with the ``tokenizers`` package; preferred
  tokenizer.model          a sentencepiece model, used when there is no tokenizer.json
  tokenizer_config.json    optional: ``bos_token``, ``eos_token``, ``pad_token``, ``unk_token``,
                           ``image_token`` (or ``extra_special_tokens.image_token``) and
                           ``added_tokens_decoder`` (tokens added on top of a sentencepiece model,
                           e.g. llava-1.5's ``<image>`` = 32000)
  special_tokens_map.json  optional, older saves: the same ``*_token`` fields; it wins over
                           tokenizer_config.json, as in ``transformers``

A token is given as a string or as ``{"content": ...}``. Every token a file names must be in the
vocabulary, else loading fails naming the file and field. Without a named image token, an added
token ``<image>`` (llava-hf) is the image token. Tokens no file names (Qwen2 has no BOS, Llama 3
no padding) raise ValueError when read; ``load(pad_token=..., image_token=...)`` sets them.

Text is tokenized as ``transformers`` tokenizes a rendered chat template: every added token's
text becomes its id and nothing is added around it. On the sentencepiece path each stretch of text
between added tokens is encoded on its own, as ``transformers``' sentencepiece ("slow", legacy)
tokenizers do.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from mllm_jax.data.tokenizer import encode_with_offsets_sentencepiece
from mllm_jax.optional_packages import import_optional

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ROLE_FIELDS = {
    "bos": "bos_token",
    "eos": "eos_token",
    "pad": "pad_token",
    "unk": "unk_token",
    "image": "image_token",
}
DEFAULT_IMAGE_TOKEN = "<image>"


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a {type(content).__name__}, expected a JSON object")
    return content


def _token_text(value: Any, where: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} is {value!r}: expected a token string or {{'content': ...}}")


def _named_tokens(directory: pathlib.Path) -> dict[str, tuple[str, str]]:
    """role -> (token text, "file field 'name'") for every role the config files name."""
    named: dict[str, tuple[str, str]] = {}
    for filename in (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):  # the later file wins
        config = _read_json(directory / filename)
        extra = config.get("extra_special_tokens")
        for role, field in ROLE_FIELDS.items():
            where = f"{directory / filename} field {field!r}"
            if field in config:
                value = config[field]
            elif isinstance(extra, dict) and field in extra:
                value, where = extra[field], f"{directory / filename} field 'extra_special_tokens'"
            else:
                continue
            text = _token_text(value, where)
            if text is None:
                named.pop(role, None)
            else:
                named[role] = (text, where)
    return named


def _added_tokens_decoder(directory: pathlib.Path) -> dict[str, int]:
    """text -> id of tokenizer_config.json's ``added_tokens_decoder``."""
    path = directory / TOKENIZER_CONFIG
    decoder = _read_json(path).get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise ValueError(f"{path} field 'added_tokens_decoder' is not a JSON object")
    added = {}
    for key, value in decoder.items():
        text = _token_text(value, f"{path} field 'added_tokens_decoder'[{key!r}]")
        if text is None or not key.isdigit():
            raise ValueError(f"{path} field 'added_tokens_decoder' has a bad entry {key!r}")
        added[text] = int(key)
    return added


class _FastModel:
    """A ``tokenizers.Tokenizer`` (tokenizer.json)."""

    def __init__(self, path: pathlib.Path):
        tokenizers = import_optional(
            "tokenizers", extra="hf", needed_for="a Hugging Face tokenizer.json"
        )
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(
                f"{path} is not a tokenizer.json the tokenizers package reads: {e}"
            ) from e
        self.added = {t.content: i for i, t in self._tokenizer.get_added_tokens_decoder().items()}

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def id_to_piece(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(token_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)


class _SentencePieceModel:
    """A sentencepiece model (tokenizer.model) plus tokens added after its vocabulary."""

    def __init__(self, model_proto: bytes, added: dict[str, int]):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._added_by_id = {i: text for text, i in added.items()}
        pieces = range(self._sp.get_piece_size())
        self.added = {
            self._sp.id_to_piece(i): i
            for i in pieces
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        } | added

    @property
    def vocab_size(self) -> int:
        return max([self._sp.get_piece_size(), *(i + 1 for i in self._added_by_id)])

    def default_ids(self) -> dict[str, int]:
        """role -> id of the model's own bos/eos/pad/unk pieces (those it has)."""
        ids = {"bos": self._sp.bos_id(), "eos": self._sp.eos_id()}
        ids |= {"pad": self._sp.pad_id(), "unk": self._sp.unk_id()}
        return {role: i for role, i in ids.items() if i >= 0}

    def token_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        token_id = self._sp.piece_to_id(token)
        return token_id if self._sp.id_to_piece(token_id) == token else None

    def id_to_piece(self, token_id: int) -> str:
        return self._added_by_id.get(token_id) or self._sp.id_to_piece(token_id)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        return encode_with_offsets_sentencepiece(self._sp, text, self.added)

    def decode(self, ids: list[int]) -> str:
        parts, run = [], []
        for token_id in ids:
            if token_id in self._added_by_id:
                parts += [self._sp.decode(run), self._added_by_id[token_id]]
                run = []
            else:
                run.append(token_id)
        return "".join([*parts, self._sp.decode(run)])

    # Grain workers receive transforms by pickling; a SentencePieceProcessor does not pickle.
    def __getstate__(self) -> dict:
        return {"model": self._sp.serialized_model_proto(), "added": self._added_by_id}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], {text: i for i, text in state["added"].items()})


class HFTokenizer:
    """Text <-> ids with a Hugging Face model directory's tokenizer (a ``ChatTokenizer``)."""

    def __init__(
        self,
        model: _FastModel | _SentencePieceModel,
        role_ids: Mapping[str, int],
        *,
        name: str,
    ):
        self._model = model
        self._role_ids = dict(role_ids)
        self._name = name

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        image_token: str | None = None,
        pad_token: str | None = None,
    ) -> HFTokenizer:
        """Loads the tokenizer in ``directory``; ``image_token`` / ``pad_token`` name tokens of
        its vocabulary to use as the image / padding token instead of what the files name.

        Raises:
          FileNotFoundError: ``directory`` does not exist or has neither tokenizer.json nor
            tokenizer.model.
          ValueError: a file is malformed, or names a token that is not in the vocabulary.
        """
        directory = pathlib.Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
        named = _named_tokens(directory)
        if (directory / TOKENIZER_JSON).is_file():
            model: _FastModel | _SentencePieceModel = _FastModel(directory / TOKENIZER_JSON)
            vocabulary, role_ids = directory / TOKENIZER_JSON, {}
        elif (directory / SENTENCEPIECE_MODEL).is_file():
            vocabulary = directory / SENTENCEPIECE_MODEL
            try:
                model = _SentencePieceModel(
                    vocabulary.read_bytes(), _added_tokens_decoder(directory)
                )
            except RuntimeError as e:
                raise ValueError(f"{vocabulary} is not a sentencepiece model: {e}") from e
            role_ids = model.default_ids()
        else:
            raise FileNotFoundError(
                f"tokenizer directory {str(directory)!r} has neither {TOKENIZER_JSON} (a fast "
                f"tokenizer) nor {SENTENCEPIECE_MODEL} (sentencepiece): point it at the model "
                "directory that a tokenizer's save_pretrained wrote"
            )
        for role, text in (("image", image_token), ("pad", pad_token)):
            if text is not None:
                named[role] = (text, f"HFTokenizer.load({role}_token=...)")
        if "image" not in named and DEFAULT_IMAGE_TOKEN in model.added:
            named["image"] = (DEFAULT_IMAGE_TOKEN, f"the added token {DEFAULT_IMAGE_TOKEN!r}")
        for role, (text, where) in named.items():
            token_id = model.token_id(text)
            if token_id is None:
                raise ValueError(
                    f"{where} names the {role} token {text!r}, which is not in the vocabulary "
                    f"of {vocabulary}"
                )
            role_ids[role] = token_id
        return cls(model, role_ids, name=str(directory))

    def _role_id(self, role: str) -> int:
        if role not in self._role_ids:
            field = ROLE_FIELDS[role]
            raise ValueError(
                f"tokenizer {self._name!r} has no {role} token: neither {TOKENIZER_CONFIG} nor "
                f"{SPECIAL_TOKENS_MAP} sets {field!r} (pass HFTokenizer.load({field}=...) to use "
                "a token of its vocabulary)"
            )
        return self._role_ids[role]

    @property
    def name(self) -> str:
        """The directory the tokenizer was loaded from."""
        return self._name

    @property
    def vocab_size(self) -> int:
        return self._model.vocab_size

    @property
    def pad_id(self) -> int:
        return self._role_id("pad")

    @property
    def bos_id(self) -> int:
        return self._role_id("bos")

    @property
    def eos_id(self) -> int:
        return self._role_id("eos")

    @property
    def unk_id(self) -> int:
        return self._role_id("unk")

    @property
    def image_id(self) -> int:
        return self._role_id("image")

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Text -> id of every added token (the texts ``encode`` turns into single ids)."""
        return dict(self._model.added)

    def special_id(self, token: str) -> int:
        """The id of the added token ``token``; ValueError naming the directory if absent."""
        if token not in self._model.added:
            raise ValueError(
                f"tokenizer {self._name!r} has no special token {token!r} (it is not among the "
                f"added tokens of its {TOKENIZER_JSON} / {TOKENIZER_CONFIG})"
            )
        return self._model.added[token]

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, nothing added; each added token's text becomes its id."""
        return self._model.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """ids [T] of ``text`` (as ``encode``) and each id's (start, end) character span."""
        return self._model.encode_with_offsets(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """The text of ``ids``; padding, BOS and EOS decode to nothing, other special tokens to
        their text."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        outside = ids[(ids < 0) | (ids >= self.vocab_size)]
        if outside.size:
            raise ValueError(f"ids {outside[:5].tolist()} are outside [0, {self.vocab_size})")
        dropped = {self._role_ids[r] for r in ("pad", "bos", "eos") if r in self._role_ids}
        return self._model.decode([int(i) for i in ids if int(i) not in dropped])

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of one id (for inspection and debugging)."""
        return self._model.id_to_piece(token_id)
