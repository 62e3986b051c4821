"""An imported llava-hf checkpoint directory, ready to answer questions (``generate --hf_dir``).

The directory holds what transformers' ``LlavaForConditionalGeneration`` and its processor save
(or a llava-hf hub snapshot holds):

  config.json, *.safetensors    the model (``checkpoint_conversion/hf_llava.py``)
  tokenizer.json | tokenizer.model, tokenizer_config.json ...   (``data/hf_tokenizer.py``)
  preprocessor_config.json      or processor_config.json's ``image_processor``
                                (``data/hf_image_processor.py``)
  generation_config.json        optional: its ``eos_token_id`` also stops generation

The chat template, unless given, follows the tokenizer: ``llama3`` when it has Llama 3's header
tokens, ``chatml`` when it has ChatML's, else ``llava_v1`` (LLaVA-1.5's Vicuna v1 conversation,
for a Llama / Vicuna language model). Generation stops at the tokenizer's EOS, the template's
end-of-turn token (``<|eot_id|>``, ``<|im_end|>``) and the generation config's EOS ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.checkpoint_conversion.hf_llava import llava_config_from_hf, load_hf_llava
from mllm_jax.data.chat_templates import CHAT_TEMPLATES, CHATML_TOKENS, LLAMA3_TOKENS
from mllm_jax.data.hf_image_processor import HFImageProcessor
from mllm_jax.data.hf_tokenizer import HFTokenizer
from mllm_jax.models.multimodal_lm import MultimodalConfig

GENERATION_CONFIG = "generation_config.json"
END_OF_TURN = {"llava_v1": None, "llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImportedLlava:
    """Everything ``generate.answer_questions`` needs for an imported LLaVA.

    Attributes:
      config: the MultimodalLM config.
      params: its nested params.
      tokenizer: the checkpoint's own tokenizer.
      image_processor: encoded image -> [H, W, 3] pixels as the checkpoint's processor computes.
      template: the chat template the prompts are written in (one of ``CHAT_TEMPLATES``).
      stop_ids: ids that end an answer.
      context_length: the longest sequence (prompt + answer) the model is meant for.
    """

    config: MultimodalConfig
    params: Any
    tokenizer: HFTokenizer
    image_processor: HFImageProcessor
    template: str
    stop_ids: tuple[int, ...]
    context_length: int


def default_template(tokenizer: HFTokenizer) -> str:
    """The chat template a LLaVA with this tokenizer most likely speaks (module docstring)."""
    specials = tokenizer.special_tokens
    if all(token in specials for token in LLAMA3_TOKENS):
        return "llama3"
    if all(token in specials for token in CHATML_TOKENS):
        return "chatml"
    return "llava_v1"


def stop_ids(tokenizer: HFTokenizer, template: str, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """The ids that end an answer: EOS, the template's end-of-turn token, then ``extra``."""
    ids = [tokenizer.eos_id]
    if END_OF_TURN[template] is not None:
        ids.append(tokenizer.special_id(END_OF_TURN[template]))
    return tuple(dict.fromkeys([*ids, *extra]))


def _has_role(tokenizer: HFTokenizer, role: str) -> bool:
    try:
        getattr(tokenizer, f"{role}_id")
    except ValueError:
        return False
    return True


def _load_tokenizer(directory: pathlib.Path, image_token_id: int) -> HFTokenizer:
    tokenizer = HFTokenizer.load(directory)
    overrides = {}
    if not _has_role(tokenizer, "pad"):
        # Padding is masked out of attention and fills rows that have stopped: EOS serves.
        overrides["pad_token"] = tokenizer.id_to_piece(tokenizer.eos_id)
    if not _has_role(tokenizer, "image"):
        overrides["image_token"] = tokenizer.id_to_piece(image_token_id)
    elif tokenizer.image_id != image_token_id:
        raise ValueError(
            f"{directory}: config.json image_token_index={image_token_id}, but the tokenizer's "
            f"image token {tokenizer.id_to_piece(tokenizer.image_id)!r} is id "
            f"{tokenizer.image_id}"
        )
    return HFTokenizer.load(directory, **overrides) if overrides else tokenizer


def _generation_eos_ids(directory: pathlib.Path) -> list[int]:
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return []
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a JSON object: {e}") from e
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise ValueError(f"{path} field 'eos_token_id' is {eos!r}, expected ids")
    return eos


def load_imported_llava(
    hf_dir: str | os.PathLike,
    *,
    template: str | None = None,
    dtype: DTypeLike = jnp.float32,
) -> ImportedLlava:
    """Loads a llava-hf directory onto one device; ``template`` None picks the default.

    The tokenizer and image processor are read and checked against config.json before the
    weights.

    Raises:
      FileNotFoundError: the directory or one of its files is missing (naming it).
      ValueError: an unknown template, a tokenizer or image processor that does not fit the
        model (naming the numbers), or an unsupported config field.
    """
    directory = pathlib.Path(hf_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"LLaVA directory {str(directory)!r} does not exist")
    if template is not None and template not in CHAT_TEMPLATES:
        raise ValueError(
            f"template {template!r} is not one for an imported tokenizer; choose one of "
            f"{CHAT_TEMPLATES}"
        )
    hf_config = llava_config_from_hf(directory, dtype=dtype, param_dtype=dtype)
    config = hf_config.multimodal
    tokenizer = _load_tokenizer(directory, hf_config.image_token_id)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"{directory}: the tokenizer has {tokenizer.vocab_size} ids but the model's "
            f"embedding only {config.vocab_size}"
        )
    image_processor = HFImageProcessor.load(directory)
    size = config.vision.image_size
    expected = (size, size) if isinstance(size, int) else tuple(size)
    if image_processor.output_size != expected:
        raise ValueError(
            f"{directory}: the image processor gives images of size "
            f"{image_processor.output_size or 'depending on the input'} (H, W), but the vision "
            f"tower takes {expected}"
        )
    template = template or default_template(tokenizer)
    _, params, _ = load_hf_llava(directory, dtype=dtype, param_dtype=dtype)
    return ImportedLlava(
        config=config,
        params=params,
        tokenizer=tokenizer,
        image_processor=image_processor,
        template=template,
        stop_ids=stop_ids(tokenizer, template, _generation_eos_ids(directory)),
        context_length=hf_config.language_model.max_length,
    )
