"""A self-contained model directory for inference: config, params, tokenizer, image statistics.

  DIR/config.json       the MultimodalConfig as JSON (dtypes as names, nested configs as dicts)
  DIR/params/           Orbax checkpoint of the full param tree
  DIR/tokenizer.model   the project's sentencepiece tokenizer the prompts are encoded with, or
  DIR/tokenizer/        an imported model's Hugging Face tokenizer files (``HFTokenizer``)
  DIR/preprocessor_config.json  optional: how images are prepared, as a Hugging Face CLIP /
                        SigLIP image processor config (``HFImageProcessor``); absent: resized
                        to the tower's ``image_size``, normalised with mean 0.5, std 0.5

Training checkpoints (adapters only, base weights by reference) are the training system's
business; this is what a finished run exports and what ``python -m mllm_jax.generate`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import types
import typing
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mllm_jax.data.hf_image_processor import PREPROCESSOR_CONFIG, HFImageProcessor
from mllm_jax.data.hf_tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_JSON, HFTokenizer
from mllm_jax.data.images import ImagePreprocessing, ImageProcessor
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.json_files import read_json
from mllm_jax.models.multimodal_lm import MultimodalConfig

TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_DIR = "tokenizer"
# The files of a Hugging Face tokenizer directory that HFTokenizer reads (those present are kept).
HF_TOKENIZER_FILES = (
    TOKENIZER_JSON,
    SENTENCEPIECE_MODEL,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def _to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, type | np.dtype):
        return np.dtype(value).name
    return value


def config_to_dict(config: MultimodalConfig) -> dict:
    """MultimodalConfig -> JSON-able dict (nested configs as dicts, dtypes as names)."""
    return _to_jsonable(config)


def _nested_dataclass(hint: Any) -> type | None:
    """The dataclass a field annotated ``hint`` holds (``X`` or ``X | None``), else None."""
    candidates = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    classes = [c for c in candidates if dataclasses.is_dataclass(c)]
    return classes[0] if len(classes) == 1 else None


def _dataclass_from(cls: type, fields: dict) -> Any:
    """``cls(**fields)`` with nested dataclasses (an adapter, RoPE scaling, MoE, the tower ...)
    rebuilt from their dicts, lists as tuples and dtype names as dtypes."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in fields.items():
        nested = _nested_dataclass(hints[name])
        if name in ("dtype", "param_dtype"):
            value = jnp.dtype(value).type
        elif nested is not None and isinstance(value, dict):
            value = _dataclass_from(nested, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def config_from_dict(fields: dict) -> MultimodalConfig:
    """Inverse of ``config_to_dict``."""
    return _dataclass_from(MultimodalConfig, fields)


def save_model(
    directory: str | pathlib.Path,
    config: MultimodalConfig,
    params: Any,
    tokenizer_path: str | pathlib.Path,
    *,
    image_processor_config: Mapping[str, Any] | None = None,
) -> None:
    """Writes config.json, params/ and the tokenizer into ``directory`` (created if absent).

    ``tokenizer_path`` is a sentencepiece file (copied to ``tokenizer.model``) or a Hugging Face
    tokenizer directory (its ``HF_TOKENIZER_FILES`` copied to ``tokenizer/``).
    ``image_processor_config``: how the model's images were prepared (a Hugging Face image
    processor config, written as ``preprocessor_config.json``); None: the default.
    """
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    source = pathlib.Path(tokenizer_path)
    if source.is_dir():
        target = directory / TOKENIZER_DIR
        target.mkdir(exist_ok=True)
        for name in HF_TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, target / name)
    else:
        shutil.copyfile(source, directory / TOKENIZER_FILE)
    if image_processor_config is not None:
        HFImageProcessor.from_config(image_processor_config)  # refuse what cannot be read back
        (directory / PREPROCESSOR_CONFIG).write_text(json.dumps(dict(image_processor_config)))


def load_model(directory: str | pathlib.Path) -> tuple[MultimodalConfig, Any, str]:
    """(config, params, tokenizer path) of a directory written by ``save_model``; the path is
    the ``tokenizer.model`` file or the ``tokenizer/`` directory (``load_tokenizer`` reads
    either)."""
    directory = pathlib.Path(directory).absolute()
    for required in ("config.json", "params"):
        if not (directory / required).exists():
            raise FileNotFoundError(f"{directory} is not a saved model: {required} is missing")
    present = [directory / n for n in (TOKENIZER_FILE, TOKENIZER_DIR) if (directory / n).exists()]
    if not present:
        raise FileNotFoundError(
            f"{directory} is not a saved model: neither {TOKENIZER_FILE} nor {TOKENIZER_DIR}/ "
            "is there"
        )
    config = config_from_dict(read_json(directory / "config.json"))
    params = ocp.StandardCheckpointer().restore(directory / "params")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return config, params, str(present[0])


def load_tokenizer(path: str | pathlib.Path) -> Tokenizer | HFTokenizer:
    """The tokenizer at ``path``: a sentencepiece file (the project's ``Tokenizer``) or a
    Hugging Face tokenizer directory (``HFTokenizer``)."""
    return HFTokenizer.load(path) if pathlib.Path(path).is_dir() else Tokenizer.load(path)


def load_image_preprocessing(
    directory: str | pathlib.Path, config: MultimodalConfig
) -> ImageProcessor:
    """How a saved model's images are prepared: its ``preprocessor_config.json``, else resized
    to the tower's square ``image_size`` and normalised with mean 0.5, std 0.5."""
    if (pathlib.Path(directory) / PREPROCESSOR_CONFIG).is_file():
        return HFImageProcessor.load(directory)
    size = config.vision.image_size
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ValueError(f"{directory}: no {PREPROCESSOR_CONFIG} for a non-square tower {size}")
        size = size[0]
    return ImagePreprocessing(size=size)
