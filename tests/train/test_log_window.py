"""LogWindow: the run-ahead of dispatched steps is bounded, and nothing newer is waited for."""

import numpy as np

from mllm_jax.train import log_window


class _Pending:
    """Stands in for a step's loss array; records when the host waits for it."""

    def __init__(self, step: int, waited: list[int]):
        self.step, self.waited = step, waited

    def block_until_ready(self):
        self.waited.append(self.step)
        return self


def test_adding_a_step_waits_only_for_the_step_max_steps_ahead_before_it():
    waited: list[int] = []
    window = log_window.LogWindow()
    ahead = log_window.MAX_STEPS_AHEAD
    for step in range(1, ahead + 4):
        window.add(step, {"loss": _Pending(step, waited)}, 0.0, np.zeros(2))
    # Steps 1..ahead+3 added: step k waited for k - ahead, for k > ahead only.
    assert waited == [1, 2, 3]
    assert len(window) == ahead + 3
