"""Sparse MoE decoder LM on the offline stdlib-docstring corpus: base.py plus a `model.moe`.

  python -m mllm_jax.train --config configs/moe_lm.py --workdir /tmp/moe_lm
  python -m mllm_jax.train --config configs/moe_lm.py:mode=capacity,ep=2 --workdir /tmp/moe_cap

Arguments (``key=value``, comma-separated), besides base's ``size``, ``scan``, ``remat``:
  experts=8 top_k=2   E and k of every MoE layer
  mode=dropless       or ``capacity`` (then ``capacity_factor``, default 1.25)
  every=1             MoE feed-forward in blocks 0, every, 2·every, ...; the others stay dense
  shared=0            width of an always-on shared expert (0: none)
  ep=1                size of the ``expert`` mesh axis (experts sharded over it; the rest is
                      data parallel), e.g. ``ep=2`` on the 2-device CPU host

Each expert is ``mlp_dim / top_k`` wide, so a token's active feed-forward parameters equal the
dense base model's: the MoE run and ``configs/base.py`` of the same size compare at equal
FLOPs per token (plus the router). ``tiny`` trains 200 steps here (a few minutes on 2 cores).
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
        mode="dropless",
        capacity_factor=1.25,
        every=1,
        shared=0,
        ep=1,
    )
    config = base.get_config(f"size={args.size},scan={args.scan},remat={args.remat}")
    if config.model.mlp_dim % args.top_k:
        raise ValueError(
            f"top_k={args.top_k} must divide model.mlp_dim={config.model.mlp_dim} "
            "(each expert is mlp_dim / top_k wide)"
        )
    config.model.moe = ml_collections.ConfigDict(
        dict(
            num_experts=args.experts,
            top_k=args.top_k,
            mode=args.mode,
            capacity_factor=args.capacity_factor,
            renormalize_gates=True,
            every=args.every,
            expert_mlp_dim=config.model.mlp_dim // args.top_k,
            shared_expert_mlp_dim=args.shared,
            router_init_std=0.02,
            load_balance_weight=0.01,
            z_loss_weight=1e-3,
        )
    )
    config.mesh.ici_parallelism = dict(data=-1, fsdp=1, tensor=1, expert=args.ep)
    if args.size == "tiny":
        config.training.num_steps = 200
        config.training.log_every = 20
        config.training.eval_every = 100
    return config
