"""Full models back to Hugging Face checkpoint directories that transformers loads.

``save_hf_lm`` / ``save_hf_llava`` write the params of a model imported with ``load_hf_lm`` /
``load_hf_llava`` (possibly fine-tuned; LoRA merged in with ``layers.lora_params.merge_lora``)
under the tensor names they were read from, so ``from_pretrained`` of the written directory gives
back the model. The source checkpoint's ``config.json`` and its tokenizer, processor and
generation files are copied alongside, and so are the tensors the import deliberately leaves out
(rotary buffers, a vision tower's unused final norm); an import followed by an export
reproduces every tensor bit for bit (in the checkpoint's dtype).
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np
from flax import traverse_util

from mllm_jax.checkpoint_conversion.export_tensors import tensors_from_params, write_safetensors
from mllm_jax.checkpoint_conversion.hf_config import lm_config_from_hf
from mllm_jax.checkpoint_conversion.hf_llava import hf_llava_sources, llava_config_from_hf
from mllm_jax.checkpoint_conversion.hf_lm import hf_lm_sources
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import Source

# Files of a checkpoint directory that describe it rather than hold weights.
COMPANION_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)
_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}


def _copy_companions(source_dir: pathlib.Path, out_dir: pathlib.Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in COMPANION_FILES:
        if (source_dir / name).is_file():
            shutil.copy2(source_dir / name, out_dir / name)


def _write(
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike,
    sources: Mapping[str, Source],
    params: Mapping[str, Any],
    dtype: str | None,
    max_shard_bytes: int,
) -> list[pathlib.Path]:
    out_dir, source_dir = pathlib.Path(out_dir), pathlib.Path(source_dir)
    if out_dir.resolve() == source_dir.resolve():
        raise ValueError(f"{out_dir}: refusing to overwrite the source checkpoint")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    original = SafetensorsDirectory(source_dir)
    flat = traverse_util.flatten_dict(dict(params), sep="/")

    def cast(name: str, array: np.ndarray) -> np.ndarray:
        # Each tensor in the checkpoint's own dtype unless another is asked for.
        return array.astype(_DTYPES[dtype] if dtype else original.entry(name).dtype)

    def tensors():
        written, embedding = set(), None
        for name, array in tensors_from_params(sources, flat):
            written.add(name)
            if name.endswith("embed_tokens.weight"):
                embedding = array
            yield name, cast(name, array)
        # Tensors the import leaves out on purpose (rotary buffers, a tower's unused final
        # norm, a pooling head) go back unchanged; a tied model's stored head is the embedding.
        for name in original.names():
            if name in written:
                continue
            if name.endswith("lm_head.weight") and embedding is not None:
                yield name, cast(name, embedding)
            else:
                yield name, original.read(name)

    _copy_companions(source_dir, out_dir)
    return write_safetensors(out_dir, tensors(), max_shard_bytes=max_shard_bytes)


def save_hf_lm(
    out_dir: str | os.PathLike,
    params: Mapping[str, Any],
    source_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 << 30,
) -> list[pathlib.Path]:
    """Writes a ``DecoderLM``'s params as the Hugging Face causal LM in ``source_dir``.

    Args:
      params: nested params laid out as ``load_hf_lm`` returns them (scanned or not, as the
        source mapping of the same config says); adapter leaves are not written.
      source_dir: the checkpoint the model was imported from (config, tensor names, dtypes,
        tokenizer files).
      dtype: "float32", "bfloat16" or "float16" for every tensor; None keeps each tensor's dtype
        in ``source_dir``.

    Returns:
      The safetensors files written.
    """
    directory = SafetensorsDirectory(source_dir)
    fused = "model.layers.0.mlp.experts.gate_up_proj" in directory
    scanned = "layers" in params.get("decoder", {})
    cfg = lm_config_from_hf(source_dir, scan_layers=scanned)
    sources, _ = hf_lm_sources(cfg, fused_experts=fused)
    return _write(out_dir, source_dir, sources, params, dtype, max_shard_bytes)


def save_hf_llava(
    out_dir: str | os.PathLike,
    params: Mapping[str, Any],
    source_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 5 << 30,
) -> list[pathlib.Path]:
    """Writes a LLaVA ``MultimodalLM``'s params (``load_hf_llava`` layout: MLP projector) as
    the checkpoint in ``source_dir``; arguments as ``save_hf_lm``."""
    scanned = "layers" in params.get("lm", {}).get("decoder", {})
    cfg = llava_config_from_hf(source_dir, scan_layers=scanned)
    sources, _ = hf_llava_sources(cfg, SafetensorsDirectory(source_dir))
    return _write(out_dir, source_dir, sources, params, dtype, max_shard_bytes)
