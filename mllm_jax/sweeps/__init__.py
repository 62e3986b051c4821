"""Config sweeps: points (config + overrides), a sequential runner and mean ± std reports.

A sweep file defines functions that yield ``Point``s; ``python -m mllm_jax.sweeps`` runs one of
them (see ``__main__.py`` and docs/sweeps.md).
"""

from mllm_jax.sweeps.definition import Sweep, load_sweep
from mllm_jax.sweeps.overrides import OverrideError, apply_overrides
from mllm_jax.sweeps.points import Point, grid, product, seeds

__all__ = [
    "OverrideError",
    "Point",
    "Sweep",
    "apply_overrides",
    "grid",
    "load_sweep",
    "product",
    "seeds",
]
