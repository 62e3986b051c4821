"""A self-contained model directory for inference: config, params and tokenizer.

  DIR/config.json       the MultimodalConfig as JSON (dtypes as names)
  DIR/params/           Orbax checkpoint of the full param tree
  DIR/tokenizer.model   the sentencepiece model the prompts are encoded with

Training checkpoints (adapters only, base weights by reference) are the training system's
business; this is what a finished run exports and what ``python -m mllm_jax.generate`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.transformer import TransformerConfig
from mllm_jax.layers.vce import VCEConfig
from mllm_jax.layers.vit import ViTConfig
from mllm_jax.models.multimodal_lm import MultimodalConfig

_NESTED = {"transformer": TransformerConfig, "vision": ViTConfig, "vce": VCEConfig}


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


def _dataclass_from(cls: type, fields: dict) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {unknown}")
    values = {}
    for name, value in fields.items():
        if name in ("dtype", "param_dtype"):
            value = jnp.dtype(value).type
        elif name == "adapter":
            value = _dataclass_from(AdapterConfig, value)
        elif isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def config_from_dict(fields: dict) -> MultimodalConfig:
    """Inverse of ``config_to_dict``."""
    fields = dict(fields)
    for name, cls in _NESTED.items():
        if fields.get(name) is not None:
            fields[name] = _dataclass_from(cls, fields[name])
    return _dataclass_from(MultimodalConfig, fields)


def save_model(
    directory: str | pathlib.Path, config: MultimodalConfig, params: Any, tokenizer_path: str
) -> None:
    """Writes config.json, params/ and tokenizer.model into ``directory`` (created if absent)."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    shutil.copyfile(tokenizer_path, directory / "tokenizer.model")


def load_model(directory: str | pathlib.Path) -> tuple[MultimodalConfig, Any, str]:
    """(config, params, tokenizer path) of a directory written by ``save_model``."""
    directory = pathlib.Path(directory).absolute()
    for required in ("config.json", "params", "tokenizer.model"):
        if not (directory / required).exists():
            raise FileNotFoundError(f"{directory} is not a saved model: {required} is missing")
    config = config_from_dict(json.loads((directory / "config.json").read_text()))
    params = ocp.StandardCheckpointer().restore(directory / "params")
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return config, params, str(directory / "tokenizer.model")
