"""Packages outside the core install, imported where they are used, named by their extra.

  demo     easy-vqa (the easy-VQA datasets), matplotlib            pip install 'mllm_jax[demo]'
  plots    matplotlib (PNG curves of runs and sweeps)               pip install 'mllm_jax[plots]'
  fusemix  scikit-learn (digits), tokenizers + safetensors (MiniLM) pip install 'mllm_jax[fusemix]'
  hf       tokenizers (an imported model's tokenizer.json)          pip install 'mllm_jax[hf]'

``pyproject.toml`` lists each extra's packages.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def import_optional(module: str, *, extra: str, needed_for: str) -> ModuleType:
    """``module`` imported; if it (or a package it needs) is not installed, a
    ModuleNotFoundError saying what needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{needed_for} needs the {e.name!r} package, which the core install leaves out: "
            f"pip install 'mllm_jax[{extra}]'",
            name=e.name,
        ) from e
