"""A Hugging Face causal-LM ``config.json`` as this library's ``DecoderLM`` hyper-parameters.

Supported architectures (``architectures[0]``): ``LlamaForCausalLM`` (Llama 1-3, Vicuna),
``MistralForCausalLM``, ``Qwen2ForCausalLM`` and ``MixtralForCausalLM``. Anything the
architecture allows that this library does not compute the same way (another activation, RoPE
type, partial rotary dimensions, a sliding window shorter than the sequences the model will see)
is refused with an error naming the config field, rather than loaded into a model that computes
something else.

RoPE is read from the transformers-5 ``rope_parameters`` ({rope_theta, rope_type, ...}) or the
legacy top-level ``rope_theta`` plus ``rope_scaling`` (whose ``rope_type`` may be spelled
``type``); when both dictionaries are present ``rope_scaling`` wins, as in transformers.

Sliding-window attention is not implemented in the attention mask. A checkpoint with a window
loads only when the longest sequence it will see (``max_length``, by default the config's
``max_position_embeddings``) fits in the window, where windowed and full causal attention are
the same computation; ``max_length`` is kept in the result for callers to respect.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from mllm_jax.layers.moe import MoEConfig
from mllm_jax.layers.rope import RopeScaling
from mllm_jax.layers.transformer import TransformerConfig
from mllm_jax.models.decoder_lm import DecoderLM

# architectures[0] -> the tensor-name family (see hf_lm.py).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "MixtralForCausalLM": "mixtral",
}
# transformers' defaults per family for fields a config.json may leave out.
_DEFAULT_ROPE_THETA = {"llama": 10_000.0, "mistral": 10_000.0, "qwen2": 10_000.0, "mixtral": 1e6}
_DEFAULT_RMS_EPS = {"llama": 1e-6, "mistral": 1e-6, "qwen2": 1e-6, "mixtral": 1e-5}
_SWIGLU_ACTIVATIONS = ("silu", "swish")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class HFLanguageModelConfig:
    """What ``DecoderLM`` needs to reproduce a Hugging Face causal LM.

    Attributes:
      architecture: ``architectures[0]`` of the config, e.g. "LlamaForCausalLM".
      family: "llama", "mistral", "qwen2" or "mixtral" (selects the tensor names).
      vocab_size, embed_dim: V and E.
      tie_embeddings: the output head is the input embedding (``tie_word_embeddings``).
      transformer: the block stack.
      max_length: the longest sequence the loaded model is meant for (RoPE has no hard limit;
        with a sliding window this is what made loading it exact).
    """

    architecture: str
    family: str
    vocab_size: int
    embed_dim: int
    tie_embeddings: bool
    transformer: TransformerConfig
    max_length: int

    def decoder_lm(self) -> DecoderLM:
        """The (unbound) ``DecoderLM`` with these hyper-parameters."""
        return DecoderLM(
            vocab_size=self.vocab_size,
            embed_dim=self.embed_dim,
            transformer=self.transformer,
            tie_embeddings=self.tie_embeddings,
        )


def read_hf_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A config dict as given, or read from ``<dir>/config.json`` (or a path to the file)."""
    if isinstance(config, Mapping):
        return dict(config)
    path = pathlib.Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Hugging Face config.json there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _field(config: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """config[name], or ``default`` when absent or null; a required field raises."""
    value = config.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"config.json has no {name!r} (a required field)")
        return default
    return value


def rope_from_hf(config: Mapping[str, Any], family: str) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from ``rope_parameters`` or legacy ``rope_theta`` + ``rope_scaling``.

    Raises a ValueError naming the field for RoPE types other than ``ROPE_TYPES`` (yarn,
    dynamic, longrope, ...), per-layer-type RoPE dictionaries and ``partial_rotary_factor`` < 1.
    """
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    params = dict(config.get(field) or {})
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"config.json {field} is per layer type {sorted(params)}; not supported")
    theta = float(
        params.get("rope_theta") or config.get("rope_theta") or _DEFAULT_ROPE_THETA[family]
    )
    partial = params.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ValueError(
            f"config.json partial_rotary_factor={partial}: RoPE on part of the head dimension "
            "is not supported"
        )
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(
            f"config.json {field}.rope_type={kind!r} is not supported; supported: {ROPE_TYPES}"
        )
    if kind == "default":
        return theta, None
    try:
        factor = float(params["factor"])
        if kind == "linear":
            return theta, RopeScaling(kind="linear", factor=factor)
        original = params.get("original_max_position_embeddings") or config.get(
            "max_position_embeddings"
        )
        return theta, RopeScaling(
            kind="llama3",
            factor=factor,
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(original),
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"config.json {field} of rope_type {kind!r} lacks {e}") from None


def _sliding_window(config: Mapping[str, Any], family: str) -> int | None:
    """The attention window, None for full causal attention (as transformers reads it)."""
    if family == "llama" or (family == "qwen2" and not config.get("use_sliding_window")):
        return None
    if family == "mistral" and "sliding_window" not in config:
        return 4096  # MistralConfig's default
    return config.get("sliding_window")


def lm_config_from_hf(
    config: Mapping[str, Any] | str | os.PathLike,
    *,
    dtype: DTypeLike = jnp.float32,
    param_dtype: DTypeLike = jnp.float32,
    scan_layers: bool = False,
    max_length: int | None = None,
) -> HFLanguageModelConfig:
    """Reads a Hugging Face causal-LM config (dict, ``config.json`` or its directory).

    Args:
      dtype: compute dtype of the model (float32 or bfloat16).
      param_dtype: dtype the parameters are stored in.
      scan_layers: scan the blocks (params stacked on a leading ``layers`` axis).
      max_length: the longest sequence the model will see; default ``max_position_embeddings``.

    Raises:
      ValueError: naming the field, for an unsupported architecture, ``hidden_act``, RoPE type,
        or a ``sliding_window`` shorter than ``max_length``.
    """
    config = read_hf_config(config)
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in ARCHITECTURES:
        raise ValueError(
            f"config.json architectures={architectures} is not supported; supported: "
            f"{sorted(ARCHITECTURES)}"
        )
    architecture = architectures[0]
    family = ARCHITECTURES[architecture]
    activation = config.get("hidden_act", "silu")
    if activation not in _SWIGLU_ACTIVATIONS:
        raise ValueError(
            f"config.json hidden_act={activation!r} is not supported for {architecture} "
            f"(only {_SWIGLU_ACTIVATIONS}: the SwiGLU feed-forward)"
        )
    embed_dim = int(_field(config, "hidden_size"))
    num_heads = int(_field(config, "num_attention_heads"))
    max_length = int(max_length or _field(config, "max_position_embeddings"))
    window = _sliding_window(config, family)
    if window is not None and max_length > window:
        raise ValueError(
            f"config.json sliding_window={window} is shorter than max_length={max_length} "
            "(max_position_embeddings unless given): sliding-window attention is not "
            f"implemented, so load with max_length <= {window} to use sequences the window "
            "does not cut"
        )
    rope_theta, rope_scaling = rope_from_hf(config, family)
    moe = None
    if family == "mixtral":
        moe = MoEConfig(
            num_experts=int(_field(config, "num_local_experts")),
            top_k=int(_field(config, "num_experts_per_tok")),
            mode="dropless",
            renormalize_gates=True,
            load_balance_weight=float(config.get("router_aux_loss_coef") or 0.0),
            z_loss_weight=0.0,
        )
    if family == "llama":
        attention_bias = "all" if config.get("attention_bias") else "none"
    else:
        attention_bias = "qkv" if family == "qwen2" else "none"
    transformer = TransformerConfig(
        num_layers=int(_field(config, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or embed_dim // num_heads),
        mlp_dim=int(_field(config, "intermediate_size")),
        mlp_activation="swiglu",
        norm="rmsnorm",
        norm_epsilon=float(_field(config, "rms_norm_eps", _DEFAULT_RMS_EPS[family])),
        use_rope=True,
        rope_max_wavelength=rope_theta,
        rope_scaling=rope_scaling,
        scan_layers=scan_layers,
        dtype=dtype,
        param_dtype=param_dtype,
        moe=moe,
        attention_bias=attention_bias,
        mlp_bias=family == "llama" and bool(config.get("mlp_bias")),
    )
    return HFLanguageModelConfig(
        architecture=architecture,
        family=family,
        vocab_size=int(_field(config, "vocab_size")),
        embed_dim=embed_dim,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        transformer=transformer,
        max_length=max_length,
    )
