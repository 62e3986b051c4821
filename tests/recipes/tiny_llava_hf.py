"""A tiny random llava-hf checkpoint directory written without torch or transformers.

The files are those ``LlavaForConditionalGeneration.save_pretrained`` and its processor write
for a CLIP tower under a Llama LM (llava-1.5's layout, tensor names as the hub's llava-hf
checkpoints spell them): config.json, model.safetensors, tokenizer.json + tokenizer_config.json
(a "▁" BPE over printable ASCII with llava's ``<image>`` and ``<pad>``), and
preprocessor_config.json (CLIP's resize, centre crop and mean / std). Whether the names and
shapes are right is checked by the importer itself, which refuses missing or unexpected tensors.
"""

from __future__ import annotations

import json
import pathlib
import string

import numpy as np
import tokenizers
from safetensors.numpy import save_file
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
IMAGE_SIZE, PATCH = 32, 8
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
CORPUS = [
    "What color is the shape? Is there a red circle? Does the image contain a blue triangle?",
    "a green rectangle. yes no gray black brown teal yellow Question: Answer: image",
]


def _save_tokenizer(directory: pathlib.Path) -> tuple[int, int]:
    """Writes the tokenizer files; (vocabulary size, image token id)."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=list(string.printable),
    )  # fmt: skip
    tokenizer.train_from_iterator(CORPUS * 3, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = dict(
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, tokenizer_class="LlamaTokenizer",
    )  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size(), tokenizer.token_to_id("<image>")


def _tensor_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    d, f, v = VISION["hidden_size"], VISION["intermediate_size"], "vision_tower.vision_model."
    shapes = {
        f"{v}embeddings.class_embedding": (d,),
        f"{v}embeddings.patch_embedding.weight": (d, 3, PATCH, PATCH),
        f"{v}embeddings.position_embedding.weight": ((IMAGE_SIZE // PATCH) ** 2 + 1, d),
    }
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes |= {f"{v}{norm}.weight": (d,), f"{v}{norm}.bias": (d,)}
    for i in range(VISION["num_hidden_layers"]):
        layer = f"{v}encoder.layers.{i}."
        for name, (out, inp) in {
            "self_attn.q_proj": (d, d), "self_attn.k_proj": (d, d), "self_attn.v_proj": (d, d),
            "self_attn.out_proj": (d, d), "mlp.fc1": (f, d), "mlp.fc2": (d, f),
        }.items():  # fmt: skip
            shapes |= {f"{layer}{name}.weight": (out, inp), f"{layer}{name}.bias": (out,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{layer}{norm}.weight": (d,), f"{layer}{norm}.bias": (d,)}
    e, m = TEXT["hidden_size"], TEXT["intermediate_size"]
    kv = e // TEXT["num_attention_heads"] * TEXT["num_key_value_heads"]
    shapes |= {
        "multi_modal_projector.linear_1.weight": (e, d),
        "multi_modal_projector.linear_1.bias": (e,),
        "multi_modal_projector.linear_2.weight": (e, e),
        "multi_modal_projector.linear_2.bias": (e,),
        "language_model.model.embed_tokens.weight": (vocab_size, e),
        "language_model.model.norm.weight": (e,),
        "language_model.lm_head.weight": (vocab_size, e),
    }
    for i in range(TEXT["num_hidden_layers"]):
        layer = f"language_model.model.layers.{i}."
        shapes |= {
            f"{layer}input_layernorm.weight": (e,),
            f"{layer}post_attention_layernorm.weight": (e,),
            f"{layer}self_attn.q_proj.weight": (e, e),
            f"{layer}self_attn.k_proj.weight": (kv, e),
            f"{layer}self_attn.v_proj.weight": (kv, e),
            f"{layer}self_attn.o_proj.weight": (e, e),
            f"{layer}mlp.gate_proj.weight": (m, e),
            f"{layer}mlp.up_proj.weight": (m, e),
            f"{layer}mlp.down_proj.weight": (e, m),
        }
    return shapes


def save_tiny_llava(directory: pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Writes the checkpoint into ``directory`` (created); returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab_size, image_id = _save_tokenizer(directory)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in _tensor_shapes(vocab_size).items():
        is_scale = ("norm" in name or "layrnorm" in name) and name.endswith(".weight")
        tensors[name] = (float(is_scale) + 0.1 * rng.normal(size=shape)).astype(np.float32)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": image_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "text_config": {
            "model_type": "llama", "vocab_size": vocab_size, "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5, **TEXT,
        },
        "vision_config": {
            "model_type": "clip_vision_model", "image_size": IMAGE_SIZE, "patch_size": PATCH,
            **VISION,
        },
    }  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    processor = dict(
        image_processor_type="CLIPImageProcessor", size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )  # fmt: skip
    (directory / "preprocessor_config.json").write_text(json.dumps(processor))
    return directory
