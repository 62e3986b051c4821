"""Sparse MoE decoder LM on the offline stdlib-docstring corpus: base.py plus a `model.moe`.

  python -m mllm_jax.train --config configs/moe_lm.py --workdir /tmp/moe_lm
  python -m mllm_jax.train --config configs/moe_lm.py:mode=capacity,ep=2 --workdir /tmp/moe_cap

Arguments (``key=value``, comma-separated), besides base's ``size``, ``scan``, ``remat``:
  experts=8 top_k=2   E and k of every MoE layer
  mode=dropless       or ``capacity`` (then ``capacity_factor``, default 1.25); capacity for
                      ``size=mixtral_8x7b``
  every=1             MoE feed-forward in blocks 0, every, 2·every, ...; the others stay dense
  shared=0            width of an always-on shared expert (0: none)
  ep=1                size of the ``expert`` mesh axis (experts sharded over it; the rest is
                      data parallel), e.g. ``ep=2`` on the 2-device CPU host; 8 for
                      ``size=mixtral_8x7b`` (the rest FSDP)

Each expert is ``mlp_dim / top_k`` wide, so a token's active feed-forward parameters equal the
dense base model's: the MoE run and ``configs/base.py`` of the same size compare at equal
FLOPs per token (plus the router). ``tiny`` trains 200 steps here (a few minutes on 2 cores).

``size=mixtral_8x7b`` is Mixtral-8x7B's shape for TPU slices (``tools/aot_compile.py``), not a
scaled base size: 32 layers, width 4096, 32 query / 8 key-value heads of 128, 8 SwiGLU experts
of width 14336 in every layer (top-2, renormalised gates), RMSNorm 1e-5, RoPE 1e6, untied
vocabulary of 32000: 46,702,792,704 params (12,879,925,248 active per token). It runs capacity
mode (the all-to-all dispatch of expert parallelism), bfloat16 compute with float32 params,
scanned layers, full rematerialisation and chunked cross-entropy, on a mesh of ``ep`` (default
8) expert shards times FSDP over the rest of the slice; 1 row of 4096 tokens per chip of a
64-chip slice (global batch 64). The corpus is base's byte-level docstrings: sizing only.
"""

import ml_collections

from configs import base
from mllm_jax.config_args import parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(
        arg,
        size="tiny",
        scan=False,
        remat="none",
        experts=8,
        top_k=2,
        mode="",
        capacity_factor=1.25,
        every=1,
        shared=0,
        ep=0,
    )
    if args.size == "mixtral_8x7b":
        args.mode, args.ep = args.mode or "capacity", args.ep or 8
        return mixtral_8x7b(args)
    args.mode, args.ep = args.mode or "dropless", args.ep or 1
    config = base.get_config(f"size={args.size},scan={args.scan},remat={args.remat}")
    if config.model.mlp_dim % args.top_k:
        raise ValueError(
            f"top_k={args.top_k} must divide model.mlp_dim={config.model.mlp_dim} "
            "(each expert is mlp_dim / top_k wide)"
        )
    config.model.moe = moe_section(args, expert_mlp_dim=config.model.mlp_dim // args.top_k)
    config.mesh.ici_parallelism = dict(data=-1, fsdp=1, tensor=1, expert=args.ep)
    if args.size == "tiny":
        config.training.num_steps = 200
        config.training.log_every = 20
        config.training.eval_every = 100
    return config


def moe_section(
    args: ml_collections.ConfigDict, *, expert_mlp_dim: int
) -> ml_collections.ConfigDict:
    """The ``model.moe`` section from the config arguments."""
    return ml_collections.ConfigDict(
        dict(
            num_experts=args.experts,
            top_k=args.top_k,
            mode=args.mode,
            capacity_factor=args.capacity_factor,
            renormalize_gates=True,
            every=args.every,
            expert_mlp_dim=expert_mlp_dim,
            shared_expert_mlp_dim=args.shared,
            router_init_std=0.02,
            load_balance_weight=0.01,
            z_loss_weight=1e-3,
        )
    )


MIXTRAL_8X7B = dict(
    vocab_size=32_000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
    mlp_dim=14_336, norm_epsilon=1e-5, rope_max_wavelength=1e6, tie_embeddings=False,
)  # fmt: skip


def mixtral_8x7b(args: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Mixtral-8x7B's shape (see the module docstring)."""
    config = base.get_config("size=small,scan=true,remat=full")
    config.model.update(MIXTRAL_8X7B)
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", loss_chunk_size=512))
    config.model.moe = moe_section(args, expert_mlp_dim=config.model.mlp_dim)
    config.data.update(dict(seq_len=4096, batch_size=64))
    config.mesh.ici_parallelism = dict(data=1, fsdp=-1, tensor=1, expert=args.ep)
    config.optimizer.update(dict(learning_rate=3e-4, warmup_steps=2000))
    config.training.update(dict(num_steps=100_000, log_every=50, eval_every=1000,
                                checkpoint_every=1000))  # fmt: skip
    return config
