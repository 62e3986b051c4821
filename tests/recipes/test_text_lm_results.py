"""results.json of the text LM: final losses and the mean step time of the timed windows."""

import pytest

from mllm_jax.recipes.text_lm import final_results


def test_final_results_take_the_last_record_and_average_step_time_over_timed_windows():
    history = [
        {"step": 1, "loss": 6.0, "step_time_s": 9.0},  # first window: warm-up, left out
        {"step": 4, "loss": 5.0, "step_time_s": 1.0 / 3.0},  # 3 steps in 1 s
        {"step": 10, "loss": 4.0, "eval_loss": 4.5, "step_time_s": 0.5},  # 6 steps in 3 s
    ]
    assert final_results(history, num_params=123) == {
        "train_loss": 4.0,
        "eval_loss": 4.5,
        "num_steps": 10,
        "num_params": 123,
        "step_seconds": pytest.approx(4.0 / 9.0),
    }


def test_a_run_without_timed_windows_has_no_step_time():
    history = [{"step": 1, "loss": 6.0, "eval_loss": 6.5, "step_time_s": 2.0}]
    assert "step_seconds" not in final_results(history, num_params=1)
