"""The seeds' ablations at small scale (issue 9), as named sweeps for ``python -m mllm_jax.sweeps``.

  python -m mllm_jax.sweeps --sweep experiments/ablations.py:moe_vs_dense \
      --workdir runs/ablations/moe_vs_dense

Every sweep holds the data and training budget fixed and varies one thing, over 3 seeds; the
tables (mean ± sample std) and the commands that produced them are in ``experiments/results/``.
"""

from mllm_jax.sweeps import Point, Sweep, seeds

NUM_SEEDS = 3


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
