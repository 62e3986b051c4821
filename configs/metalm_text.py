"""METALM, language: causal vs prefix-LM vs semi-causal LM on the stdlib docstrings (SPEC §4).

  python -m mllm_jax.train --config configs/metalm_text.py --workdir runs/metalm_text
  python -m mllm_jax.train --config configs/metalm_text.py:mode=semi_causal --workdir ...

Sizes: ``size=small`` (the experiment: width 128, 2 decoder layers, seq 256, a few minutes per
mode on a 2-core CPU) and ``size=test`` (CI smoke runs). Span lengths are the paper's 64-128
tokens at 2048 scaled to the sequence length (``scaled_span_lengths``), 25% of the tokens.
"""

import ml_collections

from configs.base import data_parallel_mesh, training_section
from mllm_jax.config_args import parse_config_arg
from mllm_jax.data.span_sampling import PAPER_FRACTION, scaled_span_lengths

MODES = ("causal", "prefix", "semi_causal")
SIZES = {
    "small": dict(width=128, layers=2, encoder_width=64, seq_len=256, batch=16, steps=400),
    "test": dict(width=32, layers=1, encoder_width=16, seq_len=64, batch=4, steps=3),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, size="small", mode="all")
    if args.size not in SIZES:
        raise ValueError(f"unknown size {args.size!r}; choose one of {sorted(SIZES)}")
    if args.mode != "all" and args.mode not in MODES:
        raise ValueError(f"unknown mode {args.mode!r}; choose 'all' or one of {MODES}")
    size = SIZES[args.size]
    width, seq_len = size["width"], size["seq_len"]
    low, high = scaled_span_lengths(seq_len)

    config = ml_collections.ConfigDict()
    config.recipe = "metalm"
    config.setting = "text"
    config.modes = MODES if args.mode == "all" else (args.mode,)
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=264,  # 259 byte ids, padded to a multiple of 8
            embed_dim=width, num_layers=size["layers"], num_heads=4, num_kv_heads=2,
            head_dim=width // 4, mlp_dim=3 * width, mlp_activation="swiglu", norm="rmsnorm",
            norm_epsilon=1e-6, rope_max_wavelength=10_000.0, tie_embeddings=True,
            scan_layers=False, remat_policy="none", dtype="float32", param_dtype="float32",
            loss_chunk_size=0,  # > 0: chunked cross-entropy, as configs/base.py
        )
    )  # fmt: skip
    # The bidirectional encoder: narrower than the decoder (METALM: 1024 vs 2048).
    enc = size["encoder_width"]
    config.encoder = ml_collections.ConfigDict(
        dict(embed_dim=enc, num_layers=size["layers"], num_heads=4, num_kv_heads=2,
             head_dim=enc // 4, mlp_dim=3 * enc)
    )  # fmt: skip
    config.connector = ml_collections.ConfigDict(dict(num_layers=1, hidden_dim=0))  # linear
    config.spans = ml_collections.ConfigDict(
        dict(
            min_length=low, max_length=high, fraction=PAPER_FRACTION,
            # Enough slots for the evaluation's one prefix per segment of >= low + 1 tokens.
            max_spans=seq_len // (low + 1) + 1, max_span_length=high,
        )
    )  # fmt: skip
    config.data = ml_collections.ConfigDict(
        dict(seq_len=seq_len, batch_size=size["batch"], eval_percent=5, eval_batches=16)
    )
    config.mesh = data_parallel_mesh()
    config.optimizer = ml_collections.ConfigDict(
        dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip_norm=1.0,
             end_learning_rate_fraction=0.1)
    )  # fmt: skip
    config.training = training_section(
        log_every=max(1, size["steps"] // 8), checkpoint_every=100_000, keep_checkpoints=1
    )
    config.train = ml_collections.ConfigDict(
        dict(num_steps=size["steps"], warmup_steps=max(1, size["steps"] // 20), learning_rate=3e-3)
    )
    return config
