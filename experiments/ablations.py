"""The seeds' ablations at small scale (issue 9), as named sweeps for ``python -m mllm_jax.sweeps``.

  # once: the shared stage-0 base (and the stage 1 the adapter points start from)
  python -m mllm_jax.train --config configs/llava_vce.py:stage=stage0_vision --workdir BASE
  python -m mllm_jax.train --config configs/llava_vce.py:stage=stage0_lm --workdir BASE
  python -m mllm_jax.train --config configs/llava_vce.py:stage=stage1 --workdir BASE \
      --config.stage1.num_steps=60 --config.stage1.warmup_steps=6
  # then any of the sweeps (BASE = runs/ablations/base)
  python -m mllm_jax.sweeps --sweep experiments/ablations.py:NAME --workdir runs/ablations/NAME

NAME: projector, projector_grid_long, adapters, dual_lora_vs_lora_long, moe_vs_dense,
semi_causal.

Every sweep holds the data and training budget fixed and varies one thing, over 3 seeds; the
tables (mean ± sample std) and the commands that produced them are in ``experiments/results/``.
"""

from mllm_jax.sweeps import Point, Sweep, seeds

NUM_SEEDS = 3
LLAVA_BASE = "runs/ablations/base"
# The LLaVA ablations' budget: shorter than the demo's (stage 1: 100, stage 2: 300 steps) so the
# 27 points fit in a session, and so accuracies stay below the ceiling where differences vanish.
LLAVA_BUDGET = {
    "stage1.num_steps": 60,
    "stage1.warmup_steps": 6,
    "stage2.num_steps": 100,
    "stage2.warmup_steps": 5,
    "evaluate.test_examples": 2000,  # per test set (VQA and multi-image)
    "evaluate.vision_blind_examples": 500,
}
# The demo's stage 2 on top of LLAVA_BUDGET, for the comparisons 100 steps cannot separate.
LLAVA_LONG_BUDGET = LLAVA_BUDGET | {"stage2.num_steps": 300, "stage2.warmup_steps": 15}
LLAVA_METRICS = (
    "vqa_test_accuracy",
    "per_type/*",
    "vision_blind_accuracy",
    "multi_image_accuracy",
    "trainable_params",
)
ADAPTERS = {
    "qv_lora": {
        "model.adapter.kind": "lora",
        "model.adapter.rank": 16,
        "model.adapter.alpha": 32.0,
        "model.adapter.targets": ("query", "value"),
    },
    # Rank 24 on the seven projections: 233,472 params vs Dual-LoRA's 230,272
    # (mllm_jax/layers/adapter_budget.py); alpha keeps the demo's scale alpha / rank = 2.
    "lora_equal_params": {
        "model.adapter.kind": "lora",
        "model.adapter.rank": 24,
        "model.adapter.alpha": 48.0,
    },
    "dual_lora": {"model.adapter.kind": "dual_lora"},
    "lora_moe": {"model.adapter.kind": "lora_moe", "model.adapter.num_experts": 4},
    "full_ft": {"model.adapter.kind": "none", "stage2.train_lm": True},
}


def _projector_points(datasets: tuple[str, ...], budget: dict) -> list[Point]:
    return [
        Point(
            "configs/llava_vce.py",
            budget
            | {"reuse_stages_from": LLAVA_BASE, "data.vqa_dataset": dataset}
            | {"model.projector": projector_kind}
            | o,
            name=f"{dataset},{projector_kind},seed={o['seed']}",
        )
        for dataset in datasets
        for projector_kind in ("vce", "mlp")
        for o in seeds(NUM_SEEDS)
    ]


def projector() -> Sweep:
    """VCE vs LLaVA's MLP projector, on easy-VQA and on the fine-detail 2x2 grid set.

    Stage 0 comes from the shared base; stage 1 (the projector's alignment) and stage 2
    (Dual-LoRA + projector) are trained per point with the point's seed.
    """
    points = _projector_points(("easy_vqa_grid", "easy_vqa"), LLAVA_BUDGET)
    return Sweep(points, metrics=LLAVA_METRICS, plot_metrics=("vqa_test_accuracy", "per_type/*"))


def projector_grid_long() -> Sweep:
    """``projector`` on the grid set only, with the demo's 300-step stage 2.

    At 100 stage-2 steps both projectors stay near their vision-blind control on the grid, so
    the comparison needs the longer budget. Point names match ``projector``'s: use a fresh workdir.
    """
    points = _projector_points(("easy_vqa_grid",), LLAVA_LONG_BUDGET)
    return Sweep(points, metrics=LLAVA_METRICS, plot_metrics=("vqa_test_accuracy", "per_type/*"))


def _adapter_points(budget: dict, names: tuple[str, ...] = tuple(ADAPTERS)) -> list[Point]:
    reuse = {
        "reuse_stages_from": LLAVA_BASE,
        "reuse_stages": ("stage0_vision", "stage0_lm", "stage1"),
    }
    return [
        Point("configs/llava_vce.py", budget | reuse | adapter | o, name=f"{name},seed={o['seed']}")
        for name, adapter in ADAPTERS.items()
        if name in names
        for o in seeds(NUM_SEEDS)
    ]


def adapters() -> Sweep:
    """q,v-LoRA, LoRA at Dual-LoRA's parameter count, Dual-LoRA, LoRA-MoE (4 experts), full FT.

    All start from the base's stage 0 and stage 1 (VCE) and train stage 2 on easy-VQA.
    """
    points = _adapter_points(LLAVA_BUDGET)
    return Sweep(points, metrics=LLAVA_METRICS, plot_metrics=("vqa_test_accuracy",))


def dual_lora_vs_lora_long() -> Sweep:
    """The seed's central adapter claim, Dual-LoRA vs LoRA at equal parameter count, with the
    demo's 300-step stage 2 (long enough to learn yes/no questions).

    Point names match ``adapters``'s: use a fresh workdir.
    """
    points = _adapter_points(LLAVA_LONG_BUDGET, names=("lora_equal_params", "dual_lora"))
    return Sweep(points, metrics=LLAVA_METRICS, plot_metrics=("vqa_test_accuracy", "per_type/*"))


def moe_vs_dense() -> Sweep:
    """Dense tiny decoder vs 8-expert top-2 MoE with the same active feed-forward params.

    ``configs/moe_lm.py`` makes each expert ``mlp_dim / top_k`` wide, so every token passes
    through as many feed-forward parameters as in the dense model (plus the router); the MoE
    model holds 4x the feed-forward parameters in all. Capacity mode (factor 1.25), the mode a
    TPU run would use; same data, 200 steps, batch, optimizer.
    """
    budget = {
        "training.num_steps": 200,
        "training.eval_every": 100,
        "training.eval_batches": 16,
        "training.log_every": 20,
    }
    models = ("configs/base.py:size=tiny", "configs/moe_lm.py:size=tiny,mode=capacity")
    points = [
        Point(config, budget | overrides) for config in models for overrides in seeds(NUM_SEEDS)
    ]
    return Sweep(points, metrics=("eval_loss", "train_loss", "num_params", "step_seconds"))


def semi_causal() -> Sweep:
    """METALM causal vs prefix-LM vs semi-causal, language and vision-language, 3 seeds.

    Each point trains all three modes on the same data and budget (``configs/metalm_text.py``
    and ``configs/metalm_vl.py`` at ``size=small``; ``experiments/metalm_compare.py`` is seed 0
    of it with a longer write-up).
    """
    configs = ("configs/metalm_text.py:size=small", "configs/metalm_vl.py:size=small")
    points = [Point(config, overrides) for config in configs for overrides in seeds(NUM_SEEDS)]
    return Sweep(points, metrics=("*/heldout_loss", "*/zero_shot_accuracy", "*/finetuned_accuracy"))
