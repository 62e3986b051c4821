"""Sweeps over the text decoder of ``configs/base.py``, run with ``python -m mllm_jax.sweeps``.

  # two 3-step points at test size (the CI smoke test; under a minute on 2 cores)
  python -m mllm_jax.sweeps --sweep experiments/lm_sweeps.py:smoke --workdir runs/sweeps/smoke
  # peak learning rate x 3 seeds, 100 steps of the tiny model each
  python -m mllm_jax.sweeps --sweep experiments/lm_sweeps.py:learning_rates \
      --workdir runs/sweeps/learning_rates
"""

from collections.abc import Iterator

from mllm_jax.sweeps import Point, Sweep, grid, product, seeds


def smoke() -> Iterator[Point]:
    """Seeds 0 and 1 of the test-size model for 3 steps."""
    for overrides in seeds(2):
        yield Point(
            "configs/base.py:size=test",
            {"training.num_steps": 3, "training.eval_batches": 1, **overrides},
        )


def learning_rates() -> Sweep:
    """Peak learning rate 1e-3, 3e-3, 1e-2 of the tiny model, 3 seeds, 100 steps each."""
    budget = {"training.num_steps": 100, "optimizer.warmup_steps": 10}
    points = [
        Point("configs/base.py:size=tiny", budget | overrides)
        for overrides in product(grid(**{"optimizer.learning_rate": [1e-3, 3e-3, 1e-2]}), seeds(3))
    ]
    return Sweep(
        points, metrics=("eval_loss", "train_loss", "step_seconds"), plot_metrics=("*loss",)
    )
