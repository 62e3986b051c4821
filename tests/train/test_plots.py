"""plot_curves: valid PNGs for loss and accuracy, no file for a plot without data, no pyplot."""

import math

import numpy as np
import pytest
from PIL import Image

from mllm_jax.train.plots import plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(losses, accuracies=None):
    records = []
    for step, loss in enumerate(losses, start=1):
        record = {"step": step, "loss": loss, "learning_rate": 1e-3}
        if accuracies is not None:
            record["accuracy"] = accuracies[step - 1]
        records.append(record)
    return records


def _pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_loss_and_accuracy_plots_are_valid_pngs(tmp_path):
    records = _records([3.0, 2.0, 1.5, 1.2], accuracies=[0.1, 0.2, 0.4, 0.5])
    records.append({"step": 4, "eval_loss": 1.4, "eval_accuracy": 0.45})
    paths = plot_curves(records, tmp_path / "plots", prefix="run1_")
    assert paths == [tmp_path / "plots" / "run1_loss.png", tmp_path / "plots" / "run1_accuracy.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (800, 500)


def test_the_image_depends_on_the_data(tmp_path):
    # Same axes range, opposite slopes: a blank or data-independent plot would be identical.
    (rising,) = plot_curves(_records([1.0, 2.0, 3.0]), tmp_path, prefix="rising_")
    (falling,) = plot_curves(_records([3.0, 2.0, 1.0]), tmp_path, prefix="falling_")
    assert not np.array_equal(_pixels(rising), _pixels(falling))


@pytest.mark.parametrize(
    "records",
    [
        _records([2.0, 1.0]),
        _records([2.0, 1.0], accuracies=[math.nan, math.nan]),
        _records([2.0, 1.0], accuracies=[None, "n/a"]),
    ],
)
def test_a_plot_without_data_is_not_written(tmp_path, records):
    assert plot_curves(records, tmp_path) == [tmp_path / "loss.png"]
    assert not (tmp_path / "accuracy.png").exists()


def test_no_records_write_nothing(tmp_path):
    assert plot_curves([], tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


def test_plotting_leaves_pyplot_state_alone(tmp_path):
    import matplotlib
    import matplotlib.pyplot as plt

    backend, figures = matplotlib.get_backend(), plt.get_fignums()
    plot_curves(_records([2.0, 1.0], accuracies=[0.1, 0.2]), tmp_path)
    assert plt.get_fignums() == figures
    assert matplotlib.get_backend() == backend


def test_a_record_without_step_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="metric record 1 has no 'step'"):
        plot_curves([{"step": 1, "loss": 1.0}, {"loss": 0.5}], tmp_path)
