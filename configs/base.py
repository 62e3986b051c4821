"""Decoder-only LM on a real offline text corpus: the base config every experiment extends.

Sizes (``--config configs/base.py:size=NAME``):
  test   ~0.03M params, seq 32: unit tests and CI.
  tiny   ~0.8M params, seq 128, batch 16: ``make demo`` on a 2-core CPU (a few minutes).
  small  ~26M params, seq 512, batch 8: the CPU benchmark size; a sensible TPU smoke test.

Other arguments: ``scan=true`` runs the layers under ``nn.scan`` (fast compiles on TPU, slower on
CPU), ``remat=dots`` picks a rematerialisation policy (see ``layers.transformer.REMAT_POLICIES``).
"""

import ml_collections

from mllm_jax.config_args import parse_config_arg

SIZES = {
    "test": dict(
        embed_dim=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        mlp_dim=64,
        seq_len=32,
        batch_size=8,
        num_steps=20,
        warmup_steps=2,
    ),
    "tiny": dict(
        embed_dim=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        mlp_dim=384,
        seq_len=128,
        batch_size=16,
        num_steps=300,
        warmup_steps=20,
    ),
    "small": dict(
        embed_dim=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=8,
        head_dim=64,
        mlp_dim=1408,
        seq_len=512,
        batch_size=8,
        num_steps=1000,
        warmup_steps=50,
    ),
}

# Logical axis -> mesh axes. Read top to bottom; for each array dimension the first rule whose
# mesh axes are still free in that array wins, a later rule for the same name is a fallback, and
# a name without a usable rule is replicated (see mllm_jax/sharding.py).
LOGICAL_AXIS_RULES = [
    # Activations. MoE expert buffers [B, E, C, D] put experts on `expert` first; their batch
    # dimension then falls back to (data, fsdp), so moving tokens to experts is an all-to-all.
    ("act_exp", "expert"),
    ("act_batch", ("data", "fsdp", "expert")),
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # Parameters.
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("expert", "expert"),
    ("exp", "expert"),  # MoE expert kernels [exp, embed, mlp] and the router's expert dim
    # Vision tower and VCE: small tables, replicated.
    ("patch", None),
    ("position", None),
    ("sampling", None),
    ("level_embed", None),
    ("lora_rank", None),
    ("lora_expert", None),  # LoRA-MoE adapters: small, replicated
]


def data_parallel_mesh() -> ml_collections.ConfigDict:
    """The ``mesh`` section of a data-parallel run: every device on the ``data`` axis.

    Override ``ici_parallelism`` / ``dcn_parallelism`` on the command line for FSDP, tensor or
    expert parallelism (``--config.mesh.ici_parallelism.fsdp=4`` ...).
    """
    return ml_collections.ConfigDict(
        dict(
            ici_parallelism=dict(data=-1, fsdp=1, tensor=1, expert=1),
            dcn_parallelism=dict(data=1, fsdp=1, tensor=1, expert=1),
            logical_axis_rules=LOGICAL_AXIS_RULES,
            # On a CPU host, split it into this many XLA devices (2 keeps both cores of a small
            # machine busy). Ignored on TPU/GPU.
            num_cpu_devices=2,
        )
    )


def training_section(**fields) -> ml_collections.ConfigDict:
    """The ``training`` section ``trainer.train`` reads, with these defaults, ``fields`` over them.

    log_every           steps per log record (the loop's one host sync per window)
    eval_every          steps between evaluations (0: only at the end)
    checkpoint_every    steps between Orbax saves (and one at the end and on SIGTERM)
    keep_checkpoints    how many step checkpoints to keep
    async_checkpoints   save in a background thread while training goes on
    accumulation_steps  micro-batches per step (gradient accumulation)
    cpu_peak_flops_per_host  the MFU denominator on CPU hosts (measured float32 matmul peak)
    progress_bar        the console progress bar
    profile_start_step  trace steps [start, start + profile_num_steps) with jax.profiler into
                        <workdir>/profile (0: no trace)
    """
    section = dict(
        log_every=50,
        eval_every=0,
        checkpoint_every=500,
        keep_checkpoints=2,
        async_checkpoints=True,
        accumulation_steps=1,
        cpu_peak_flops_per_host=140e9,  # measured float32 matmul ceiling of a 2-core host
        progress_bar=True,
        profile_start_step=0,
        profile_num_steps=3,
    )
    return ml_collections.ConfigDict(section | fields)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, size="tiny", scan=False, remat="none")
    if args.size not in SIZES:
        raise ValueError(f"unknown size {args.size!r}; choose one of {sorted(SIZES)}")
    size = SIZES[args.size]

    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(
        dict(
            vocab_size=264,  # 259 byte-level ids, padded to a multiple of 8 for the tensor axis.
            embed_dim=size["embed_dim"],
            num_layers=size["num_layers"],
            num_heads=size["num_heads"],
            num_kv_heads=size["num_kv_heads"],
            head_dim=size["head_dim"],
            mlp_dim=size["mlp_dim"],
            mlp_activation="swiglu",
            norm="rmsnorm",
            norm_epsilon=1e-6,
            rope_max_wavelength=10_000.0,
            tie_embeddings=True,
            scan_layers=args.scan,
            remat_policy=args.remat,
            dtype="float32",
            param_dtype="float32",
            # > 0: the training and eval cross-entropy compute logits this many positions at a
            # time (train/losses.py chunked_cross_entropy_loss), so the [B, N, V] float32 logits
            # never exist at once, forward or backward; 0: the plain loss over all logits.
            loss_chunk_size=0,
        )
    )

    config.mesh = data_parallel_mesh()

    config.optimizer = ml_collections.ConfigDict(
        dict(
            learning_rate=3e-3,
            warmup_steps=size["warmup_steps"],
            end_learning_rate_fraction=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,  # applied to matrices only (ndim >= 2)
            grad_clip_norm=1.0,
        )
    )

    config.data = ml_collections.ConfigDict(
        dict(
            corpus="python_stdlib_docstrings",
            seq_len=size["seq_len"],
            batch_size=size["batch_size"],  # global, across all devices and hosts
            eval_percent=5,
            seed=0,
            # Data shards the global batch is cut into (0: one per process). The data order
            # depends on this, not on the process count: a run resumes on any process count
            # that divides it (data/sharded_stream.py).
            num_data_shards=0,
        )
    )

    config.training = training_section(
        num_steps=size["num_steps"],
        log_every=max(size["num_steps"] // 12, 1),
        eval_every=max(size["num_steps"] // 3, 1),
        checkpoint_every=max(size["num_steps"] // 3, 1),
        eval_batches=4,
    )
    return config
