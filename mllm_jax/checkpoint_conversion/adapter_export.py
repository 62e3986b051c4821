"""Adapters out of mllm_jax and back: LoRA as a Hugging Face PEFT adapter, Dual-LoRA as its own.

Both formats name each adapted projection by the Hugging Face module that holds its base
weight (``model.layers.3.self_attn.q_proj``), found through the import mapping: the ``Source``
of the projection's ``kernel`` names the checkpoint tensor ``<module>.weight``.

**LoRA -> PEFT** (``write_peft_lora``): ``adapter_config.json`` (``peft_type`` LORA, r,
lora_alpha, target_modules, ...) and ``adapter_model.safetensors`` with
``base_model.model.<module>.lora_A.weight`` [r, d_in] and ``.lora_B.weight`` [d_out, r]; ``peft``
loads it onto the Hugging Face base model (``PeftModel.from_pretrained``). Our ``lora_a``
(in_dims + (r,)) and ``lora_b`` ((r,) + out_dims) flatten their in/out dims in the order the
base kernel's Hugging Face weight [d_out, d_in] does, which is checked per projection.

**Dual-LoRA** (``write_dual_lora`` / ``read_dual_lora``) is not mergeable and PEFT has no
such adapter, so it has a layout of its own, in the same spirit: ``adapter_config.json`` with
``"adapter_type": "dual_lora"``, ``format_version`` 1, r, alpha, dropout, norm epsilon,
target_modules, and ``adapter_model.safetensors`` with, per module,

  <module>.dual_lora.skill.weight  [r, d_in]    W_A, skill space (applied after dropout)
  <module>.dual_lora.task.weight   [r, d_in]    W_T, task-activation space
  <module>.dual_lora.up.weight     [d_out, r]   W_B
  <module>.dual_lora.norm.weight   [r]          LayerNorm_r scale (gamma)
  <module>.dual_lora.norm.bias     [r]          LayerNorm_r shift (beta)

so that h = W0 x + b0 + (alpha / r) · up(relu(task(x)) ⊙ LayerNorm(skill(x))) (SPEC §3).
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mllm_jax.checkpoint_conversion.export_tensors import _undo_view
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import Source, TensorView
from mllm_jax.json_files import read_json
from mllm_jax.layers.lora import DUAL_LORA_NORM_EPSILON, PROJECTION_NAMES, AdapterConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DUAL_LORA_FORMAT_VERSION = 1
# our param name -> (suffix in the file, whether it is a down [r, d_in] or up [d_out, r] matrix)
_DUAL_LORA_MATRICES = {
    "dual_lora_skill": ("dual_lora.skill.weight", "down"),
    "dual_lora_task": ("dual_lora.task.weight", "down"),
    "dual_lora_up": ("dual_lora.up.weight", "up"),
}
_DUAL_LORA_NORM = {"scale": "dual_lora.norm.weight", "bias": "dual_lora.norm.bias"}


def _module_name(view: TensorView) -> str:
    if not view.name.endswith(".weight"):
        raise ValueError(f"{view.name!r} is not a Linear weight: cannot name its module")
    return view.name[: -len(".weight")]


def _check_linear_layout(view: TensorView, in_dims: tuple, out_dims: tuple) -> None:
    """The view's checkpoint weight must be kernel.reshape(d_in, d_out).T (nn.Linear's layout)."""
    probe = np.arange(math.prod(in_dims) * math.prod(out_dims)).reshape(in_dims + out_dims)
    want = probe.reshape(math.prod(in_dims), math.prod(out_dims)).T
    got = _undo_view(view, probe)
    if got.shape != want.shape or not np.array_equal(got, want):
        raise ValueError(
            f"{view.name}: the kernel's layout is not a Linear weight [d_out, d_in] flattened "
            "in order; this adapter cannot be written in that module's terms"
        )


def _adapted_projections(
    params: Mapping, sources: Mapping[str, Source], names: tuple[str, ...]
) -> Iterator[tuple[str, list[tuple[TensorView, dict[str, np.ndarray]]]]]:
    """(projection path, [(kernel view, {adapter param: array}) per layer]) for every
    projection of ``params`` that has all of ``names`` beside its kernel."""
    flat = traverse_util.flatten_dict(dict(params), sep="/")
    for path, source in sources.items():
        if not path.endswith("/kernel"):
            continue
        node = path[: -len("/kernel")]
        if f"{node}/{names[0]}" not in flat and f"{node}/{names[0]}/scale" not in flat:
            continue
        arrays = {}
        for name in names:
            key = f"{node}/{name}"
            if key not in flat:
                raise KeyError(f"{node}: has {names[0]} but no {name}")
            arrays[name] = np.asarray(jax.device_get(flat[key]))
        if source.stack_axis is None:
            yield node, [(source.views[0], arrays)]
        else:
            axis = source.stack_axis
            yield (
                node,
                [
                    (view, {k: np.take(v, i, axis=axis) for k, v in arrays.items()})
                    for i, view in enumerate(source.views)
                ],
            )


def _down(matrix: np.ndarray) -> np.ndarray:  # in_dims + (r,) -> [r, d_in]
    return matrix.reshape(-1, matrix.shape[-1]).T


def _up(matrix: np.ndarray) -> np.ndarray:  # (r,) + out_dims -> [d_out, r]
    return matrix.reshape(matrix.shape[0], -1).T


def _write(directory: pathlib.Path, tensors: dict[str, np.ndarray], config: dict) -> None:
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # save_file writes an array's buffer as is: a transposed view must be made C-ordered first.
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_peft_lora(
    directory: str | pathlib.Path,
    params: Mapping,
    sources: Mapping[str, Source],
    adapter: AdapterConfig,
    *,
    base_model_name_or_path: str = "",
    module_prefix: str = "",
) -> list[str]:
    """Writes the LoRA params of ``params`` as a PEFT adapter; returns the module names.

    Args:
      params: the model's nested params with ``lora_a`` / ``lora_b`` beside adapted kernels.
      sources: the import mapping of the same params (param path -> Source).
      adapter: the LoRA config (kind "lora"): rank, alpha, dropout.
      module_prefix: prepended to each module name, for a base model whose modules sit
        deeper than its checkpoint names say.
    """
    if adapter.kind != "lora":
        raise ValueError(f"PEFT export is for adapter kind 'lora', got {adapter.kind!r}")
    tensors, modules = {}, []
    for _, layers in _adapted_projections(params, sources, ("lora_a", "lora_b")):
        for view, arrays in layers:
            a, b = arrays["lora_a"], arrays["lora_b"]
            _check_linear_layout(view, a.shape[:-1], b.shape[1:])
            module = module_prefix + _module_name(view)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = _down(a)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = _up(b)
            modules.append(module)
    if not modules:
        raise ValueError("no LoRA params (lora_a/lora_b) beside any imported kernel")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    _write(pathlib.Path(directory), tensors, config)
    return modules


def write_dual_lora(
    directory: str | pathlib.Path,
    params: Mapping,
    sources: Mapping[str, Source],
    adapter: AdapterConfig,
    *,
    base_model_name_or_path: str = "",
) -> list[str]:
    """Writes the Dual-LoRA params of ``params`` in the layout of the module docstring;
    returns the module names. Arguments as ``write_peft_lora`` (``adapter.kind`` "dual_lora")."""
    if adapter.kind != "dual_lora":
        raise ValueError(f"Dual-LoRA export is for adapter kind 'dual_lora', got {adapter.kind!r}")
    names = (*_DUAL_LORA_MATRICES, "dual_lora_norm/scale", "dual_lora_norm/bias")
    tensors, modules = {}, []
    for _, layers in _adapted_projections(params, sources, names):
        for view, arrays in layers:
            skill, up = arrays["dual_lora_skill"], arrays["dual_lora_up"]
            _check_linear_layout(view, skill.shape[:-1], up.shape[1:])
            module = _module_name(view)
            for name, (suffix, side) in _DUAL_LORA_MATRICES.items():
                convert = _down if side == "down" else _up
                tensors[f"{module}.{suffix}"] = convert(arrays[name])
            for name, suffix in _DUAL_LORA_NORM.items():
                tensors[f"{module}.{suffix}"] = arrays[f"dual_lora_norm/{name}"]
            modules.append(module)
    if not modules:
        raise ValueError("no Dual-LoRA params beside any imported kernel")
    config = {
        "adapter_type": "dual_lora",
        "format_version": DUAL_LORA_FORMAT_VERSION,
        "r": adapter.rank,
        "alpha": adapter.alpha,
        "dropout": adapter.dropout,
        "norm_epsilon": DUAL_LORA_NORM_EPSILON,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "modules": modules,
        "base_model_name_or_path": base_model_name_or_path,
    }
    _write(pathlib.Path(directory), tensors, config)
    return modules


def read_dual_lora(
    directory: str | pathlib.Path, sources: Mapping[str, Source], like: Mapping
) -> tuple[AdapterConfig, dict[str, Any]]:
    """A Dual-LoRA adapter written by ``write_dual_lora``, as params shaped like ``like``.

    Args:
      sources: the import mapping of the base model (to find each module's kernel path).
      like: the model's params (or abstract params) with Dual-LoRA leaves: their shapes say
        how to fold [r, d_in] / [d_out, r] back into in_dims / out_dims.

    Returns:
      (adapter config, flat {"/"-path: np.ndarray} of every Dual-LoRA leaf).

    Raises:
      ValueError: a wrong ``adapter_type`` / ``format_version``, or a module of the file with
        no adapted projection in the model, or the reverse.
    """
    directory = pathlib.Path(directory)
    config = read_json(directory / ADAPTER_CONFIG)
    if config.get("adapter_type") != "dual_lora":
        raise ValueError(f"{directory / ADAPTER_CONFIG}: adapter_type is not 'dual_lora'")
    if config.get("format_version") != DUAL_LORA_FORMAT_VERSION:
        raise ValueError(
            f"{directory / ADAPTER_CONFIG}: format_version {config.get('format_version')!r}, "
            f"this reader knows {DUAL_LORA_FORMAT_VERSION}"
        )
    files = SafetensorsDirectory(directory / ADAPTER_WEIGHTS)
    flat_like = traverse_util.flatten_dict(dict(like), sep="/")
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()
    targets: set[str] = set()
    for path, source in sources.items():
        node = path[: -len("/kernel")] if path.endswith("/kernel") else None
        if node is None or f"{node}/dual_lora_skill" not in flat_like:
            continue
        targets.add(node.rsplit("/", 1)[-1])
        per_layer = []
        for view in source.views:
            module = _module_name(view)
            layer = {}
            for name, (suffix, _) in _DUAL_LORA_MATRICES.items():
                key = f"{module}.{suffix}"
                if key not in files:
                    raise ValueError(f"{directory}: no {key} for the model's {node}")
                used.add(key)
                layer[name] = files.read(key)
            for name, suffix in _DUAL_LORA_NORM.items():
                key = f"{module}.{suffix}"
                used.add(key)
                layer[f"dual_lora_norm/{name}"] = files.read(key)
            per_layer.append(layer)
        for name in (*_DUAL_LORA_MATRICES, "dual_lora_norm/scale", "dual_lora_norm/bias"):
            shape = tuple(flat_like[f"{node}/{name}"].shape)
            layers_shape = shape if source.stack_axis is None else shape[1:]
            values = []
            for layer in per_layer:
                value = layer[name]
                if name in _DUAL_LORA_MATRICES:
                    value = value.T  # [d_in, r] or [r, d_out]
                values.append(value.reshape(layers_shape))
            out[f"{node}/{name}"] = values[0] if source.stack_axis is None else np.stack(values)
    unused = sorted(set(files.names()) - used)
    if unused:
        raise ValueError(f"{directory}: tensors for modules the model does not adapt: {unused[:5]}")
    adapter = AdapterConfig(
        kind="dual_lora",
        rank=int(config["r"]),
        alpha=float(config["alpha"]),
        dropout=float(config["dropout"]),
        targets=tuple(name for name in PROJECTION_NAMES if name in targets),
    )
    return adapter, out
