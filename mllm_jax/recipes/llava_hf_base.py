"""The LLaVA recipe on an imported llava-hf checkpoint: ``model.init_from = "hf:DIR"``.

DIR is a ``LlavaForConditionalGeneration`` directory as transformers saves it (config.json,
safetensors, the tokenizer's files, usually preprocessor_config.json). What a run takes from it:

  vision tower + LM  DIR's weights, frozen, read straight onto the run's mesh (each device reads
                     its own slice; no host holds a full copy). Their hyper-parameters are DIR's
                     config.json: they override the config's size fields (``vision.*``,
                     ``data.image_size``, ``model.vocab_size``, ``embed_dim``, ``num_layers``,
                     ...), and the fields that differ are logged.
  tokenizer          DIR's (``HFTokenizer``). ``data.template`` "v1" (the project tokenizer's
                     format) becomes "llava_v1", LLaVA-1.5's conversation in DIR's own tokens.
  images             DIR's image processor (``preprocessor_config.json``: CLIP's resize, crop and
                     mean / std). Without one: resized to the tower's image size, normalised with
                     the tower's statistics (CLIP's, or SigLIP's 0.5 / 0.5).
  projector          ``model.projector="vce"``: a fresh VCE + MLP, as from scratch; "mlp": DIR's
                     MLP projector is where stage 1 starts.

Kept from the config: ``model.dtype``, ``param_dtype``, ``scan_layers``, ``remat_policy``,
``loss_chunk_size``, ``projector``, ``adapter``, ``vce`` and every stage and mesh section. Both
stage-0 stages are skipped; stages 1 and 2 train the projector and adapters as from scratch, and
their checkpoints hold those trainable params alone. ``check_init_from`` refuses a bad value
before anything is compiled, naming ``model.init_from``.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from mllm_jax.checkpoint_conversion.hf_llava import (
    HFLlavaConfig,
    llava_config_from_hf,
    load_hf_llava,
)
from mllm_jax.data.hf_image_processor import (
    CLIP_MEAN,
    CLIP_STD,
    PREPROCESSOR_CONFIG,
    PROCESSOR_CONFIG,
    HFImageProcessor,
)
from mllm_jax.data.hf_tokenizer import HFTokenizer
from mllm_jax.json_files import read_json
from mllm_jax.sharding import LogicalRules

PREFIX = "hf:"
# The processor a tower's checkpoint would come with, for a DIR that saved none.
_TOWER_PROCESSORS = {
    "clip_vision_model": dict(
        image_processor_type="CLIPImageProcessor", do_center_crop=False,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
    ),
    "siglip_vision_model": dict(image_processor_type="SiglipImageProcessor"),
}  # fmt: skip
# (config field, what the imported model says) compared for the override log.
_VISION_FIELDS = ("patch_size", "width", "num_layers", "num_heads", "mlp_dim", "use_cls_token")
_LM_FIELDS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim", "norm_epsilon")


def hf_dir(config: Any) -> pathlib.Path | None:
    """DIR of ``model.init_from = "hf:DIR"``; None when it is empty (train from scratch).

    Raises:
      ValueError: naming ``model.init_from`` when it is set without the ``hf:`` prefix.
    """
    value = config.model.get("init_from", "")
    if not value:
        return None
    if not value.startswith(PREFIX) or not value[len(PREFIX) :]:
        raise ValueError(
            f"model.init_from={value!r}: expected 'hf:DIR' (DIR a llava-hf LLaVA checkpoint "
            "directory) or '' (the from-scratch recipe)"
        )
    return pathlib.Path(value[len(PREFIX) :]).expanduser()


def _problem(config: Any, text: str) -> str:
    return f"model.init_from={config.model.init_from!r}: {text}"


def hf_llava_config(config: Any) -> HFLlavaConfig:
    """What DIR's config.json says, with the config's dtypes and layer scanning."""
    return llava_config_from_hf(
        hf_dir(config),
        dtype=jnp.dtype(config.model.dtype),
        param_dtype=jnp.dtype(config.model.param_dtype),
        scan_layers=config.model.scan_layers,
    )


def chat_template(config: Any) -> str:
    """``data.template``, with "v1" (it needs the project tokenizer) as "llava_v1" on DIR's."""
    template = config.data.template
    return "llava_v1" if hf_dir(config) is not None and template == "v1" else template


def load_tokenizer(config: Any) -> HFTokenizer:
    """DIR's tokenizer, checked to hold config.json's image token and a padding token.

    Raises:
      ValueError: naming ``model.init_from``, for a tokenizer that does not fit the model.
    """
    directory = hf_dir(config)
    image_token_id = hf_llava_config(config).image_token_id
    try:
        tokenizer = HFTokenizer.load(directory)
        image_id, _ = tokenizer.image_id, tokenizer.pad_id
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(_problem(config, f"its tokenizer cannot be used: {e}")) from e
    if image_id != image_token_id:
        raise ValueError(
            _problem(
                config,
                f"config.json image_token_index={image_token_id}, but the tokenizer's image "
                f"token {tokenizer.id_to_piece(image_id)!r} is id {image_id}",
            )
        )
    return tokenizer


def image_processor_config(config: Any) -> dict[str, Any]:
    """DIR's image processor config (``preprocessor_config.json``, else ``processor_config.json``
    's ``image_processor``), or, without one, the tower type's at the tower's image size."""
    directory = hf_dir(config)
    for name, key in ((PREPROCESSOR_CONFIG, None), (PROCESSOR_CONFIG, "image_processor")):
        path = directory / name
        if path.is_file():
            content = read_json(path)
            if key is None:
                return content
            if key in content:
                return content[key]
    hf = hf_llava_config(config)
    size = hf.multimodal.vision.image_size
    height, width = (size, size) if isinstance(size, int) else size
    return _TOWER_PROCESSORS[hf.vision_model_type] | {"size": {"height": height, "width": width}}


def overridden_fields(config: Any, hf: HFLlavaConfig) -> list[str]:
    """The size fields DIR's config.json overrides with another value, each as
    "field: config value -> DIR's value"."""
    vision, lm = hf.multimodal.vision, hf.multimodal.transformer
    pairs = [(f"vision.{f}", config.vision.get(f), getattr(vision, f)) for f in _VISION_FIELDS]
    pairs += [("data.image_size", config.data.image_size, vision.image_size)]
    pairs += [(f"model.{f}", config.model.get(f), getattr(lm, f)) for f in _LM_FIELDS]
    pairs += [
        ("model.vocab_size", config.model.vocab_size, hf.multimodal.vocab_size),
        ("model.embed_dim", config.model.embed_dim, hf.multimodal.embed_dim),
        ("model.tie_embeddings", config.model.tie_embeddings, hf.multimodal.tie_embeddings),
        ("model.rope_max_wavelength", config.model.rope_max_wavelength, lm.rope_max_wavelength),
    ]
    return [f"{name}: {ours!r} -> {theirs!r}" for name, ours, theirs in pairs if ours != theirs]


def check_init_from(config: Any) -> None:
    """Checks ``model.init_from`` against DIR's files and the rest of the config, and logs what
    DIR overrides; nothing when it is empty. Reads config.json and the tokenizer, no weights.

    Raises:
      FileNotFoundError: naming ``model.init_from``, for a missing DIR or config.json.
      ValueError: naming ``model.init_from``, for a value without ``hf:``, a checkpoint that is
        not a supported LLaVA, a tokenizer or image processor that does not fit it, or config
        fields that cannot go with it (``reuse_stages_from``, MoE, a fusion other than early,
        VCE levels deeper than the tower).
    """
    directory = hf_dir(config)
    if directory is None:
        return
    if not directory.is_dir():
        raise FileNotFoundError(_problem(config, f"{str(directory)!r} is not a directory"))
    try:
        hf = hf_llava_config(config)
    except FileNotFoundError as e:
        raise FileNotFoundError(_problem(config, str(e))) from e
    except ValueError as e:
        raise ValueError(
            _problem(config, f"not a LLaVA checkpoint this recipe can load: {e}")
        ) from e
    if config.get("reuse_stages_from"):
        raise ValueError(
            _problem(config, "stage 0 is not trained, so there is nothing to reuse from "
                     f"reuse_stages_from={config.reuse_stages_from!r}; leave it empty")
        )  # fmt: skip
    if config.model.moe.num_experts:
        raise ValueError(_problem(config, "the LM is DIR's; model.moe.num_experts must be 0"))
    if config.model.fusion != "early":
        raise ValueError(
            _problem(config, f"LLaVA fuses early; model.fusion={config.model.fusion!r}")
        )
    depth = hf.multimodal.vision.num_layers
    if config.model.projector == "vce":
        deep = [i for i in config.vce.level_indices if not -depth - 1 <= i <= depth]
        if deep:
            raise ValueError(
                _problem(config, f"vce.level_indices {deep} are outside DIR's {depth}-layer tower")
            )
    load_tokenizer(config)
    size = hf.multimodal.vision.image_size
    try:
        output = HFImageProcessor.from_config(image_processor_config(config)).output_size
    except ValueError as e:
        raise ValueError(_problem(config, f"its image processor cannot be used: {e}")) from e
    if output != ((size, size) if isinstance(size, int) else tuple(size)):
        raise ValueError(
            _problem(config, f"its image processor gives {output} images, the tower takes {size}")
        )
    overrides = overridden_fields(config, hf)
    logging.info(
        "model.init_from: vision tower (%s) and LM (%s) from %s; its config.json overrides the "
        "config's size fields%s",
        hf.vision_model_type, hf.language_model.architecture, directory,
        ": " + "; ".join(overrides) if overrides else " (all equal)",
    )  # fmt: skip


def load_base_params(config: Any, mesh: Mesh, rules: LogicalRules) -> dict[str, Any]:
    """DIR's ``vision`` and ``lm`` params (and ``projector`` when ``model.projector="mlp"``),
    each read straight onto ``mesh`` as the logical ``rules`` shard it."""
    _, params, _ = load_hf_llava(
        hf_dir(config),
        mesh=mesh,
        rules=rules,
        dtype=jnp.dtype(config.model.dtype),
        param_dtype=jnp.dtype(config.model.param_dtype),
        scan_layers=config.model.scan_layers,
    )
    parts = ("vision", "lm", "projector") if config.model.projector == "mlp" else ("vision", "lm")
    return {part: params[part] for part in parts}
