"""MetricWriter: JSONL records, TensorBoard scalars read back by TensorBoard, resume, process 0."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mllm_jax.train.metric_writers import MetricWriter, read_jsonl


def _raw_lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def _strict_json(line):
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(line, parse_constant=reject)


def test_each_write_appends_one_json_object_with_python_numbers(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": np.float32(0.5), "lr": jnp.float32(1.25), "tokens": np.int64(7)})
        writer.write(jnp.int32(2), {"loss": 0.25, "skipped": np.bool_(True), "n": 3})
        # Flushed per write: a reader sees the records before close.
        assert len(_raw_lines(writer.jsonl_path)) == 2

    lines = _raw_lines(tmp_path / "metrics.jsonl")
    assert [_strict_json(line) for line in lines] == [
        {"step": 1, "loss": 0.5, "lr": 1.25, "tokens": 7},
        {"step": 2, "loss": 0.25, "skipped": 1, "n": 3},
    ]
    first = _strict_json(lines[0])
    assert type(first["loss"]) is float and type(first["tokens"]) is int
    assert read_jsonl(tmp_path / "metrics.jsonl") == [_strict_json(line) for line in lines]


def test_non_finite_values_are_strict_json_strings_and_read_back_as_floats(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(3, {"a": float("nan"), "b": np.float32(np.inf), "c": -math.inf, "d": 1.0})

    (line,) = _raw_lines(writer.jsonl_path)
    assert _strict_json(line) == {
        "step": 3,
        "a": "NaN",
        "b": "Infinity",
        "c": "-Infinity",
        "d": 1.0,
    }
    (record,) = read_jsonl(writer.jsonl_path)
    assert math.isnan(record["a"])
    assert record["b"] == math.inf and record["c"] == -math.inf and record["d"] == 1.0


def test_a_resumed_writer_continues_the_same_file(tmp_path):
    with MetricWriter(tmp_path, jsonl_name="train.jsonl", tensorboard=False) as writer:
        writer.write(1, {"loss": 2.0})
    with MetricWriter(tmp_path, jsonl_name="train.jsonl", tensorboard=False) as writer:
        writer.write(2, {"loss": 1.0})
    assert read_jsonl(tmp_path / "train.jsonl") == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.0},
    ]


def test_resume_step_drops_the_later_records_of_the_interrupted_run(tmp_path, caplog):
    # The interrupted run logged steps 1..5; its last checkpoint was at step 3.
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with MetricWriter(tmp_path, tensorboard=False, resume_step=3) as writer:
        assert [r["step"] for r in read_jsonl(writer.jsonl_path)] == [1, 2, 3]
        for step in range(4, 7):
            writer.write(step, {"loss": -float(step)})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": 1, "loss": 1.0},
        {"step": 2, "loss": 2.0},
        {"step": 3, "loss": 3.0},
        {"step": 4, "loss": -4.0},
        {"step": 5, "loss": -5.0},
        {"step": 6, "loss": -6.0},
    ]
    assert "dropped 2 records after step 3" in caplog.text


def test_resume_step_without_an_earlier_file_starts_a_new_one(tmp_path):
    with MetricWriter(tmp_path / "run", tensorboard=False, resume_step=7) as writer:
        writer.write(8, {"loss": 1.0})
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl") == [{"step": 8, "loss": 1.0}]


def test_after_a_resume_tensorboard_shows_one_value_per_step(tmp_path):
    with MetricWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with MetricWriter(tmp_path, resume_step=3) as writer:
        for step in range(4, 7):
            writer.write(step, {"loss": -float(step)})

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
        (4, -4.0),
        (5, -5.0),
        (6, -6.0),
    ]


def test_an_interrupted_last_record_is_dropped_when_the_file_is_reopened(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    fragment = '{"step": 2, "lo'
    path.write_text('{"step": 1, "loss": 2.0}\n' + fragment, encoding="utf-8")
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"loss": 1.5})
    assert read_jsonl(path) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    assert f"dropped an incomplete last record ({len(fragment)} bytes)" in caplog.text


def test_tensorboard_reads_back_the_scalar_tags_steps_and_values(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(10, {"loss": 2.5, "accuracy": np.float32(0.125)})
        writer.write(20, {"loss": jnp.float32(1.5)})
        writer.write(30, {"loss": 0.75, "accuracy": 0.5, "eval_loss": 1.0})

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["accuracy", "eval_loss", "loss"]
    series = {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in ("loss", "accuracy", "eval_loss")
    }
    assert series == {
        "loss": [(10, 2.5), (20, 1.5), (30, 0.75)],
        "accuracy": [(10, 0.125), (30, 0.5)],
        "eval_loss": [(30, 1.0)],
    }


def test_tensorboard_stores_non_finite_values_as_float_nan_and_inf(tmp_path):
    with MetricWriter(tmp_path) as writer:
        writer.write(1, {"a": float("nan"), "b": -math.inf})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert math.isnan(events.Scalars("a")[0].value)
    assert events.Scalars("b")[0].value == -math.inf


def test_without_tensorboard_no_event_files_are_written(tmp_path):
    with MetricWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "tensorboard").exists()


def test_processes_other_than_zero_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    logdir = tmp_path / "run"
    with MetricWriter(logdir) as writer:
        writer.write(1, {"loss": 1.0})
    assert not writer.active
    assert not logdir.exists()


@pytest.mark.parametrize(
    "metrics, error, match",
    [
        ({"loss": np.zeros(2)}, ValueError, r"'loss' must be a scalar, got shape \(2,\)"),
        ({"name": "abc"}, TypeError, "'name' must be a number"),
        ({"step": 1}, ValueError, "'step' is reserved"),
    ],
)
def test_bad_metrics_are_rejected_with_the_key_named(tmp_path, metrics, error, match):
    with MetricWriter(tmp_path, tensorboard=False) as writer, pytest.raises(error, match=match):
        writer.write(1, metrics)


def test_a_fractional_step_and_writing_after_close_are_errors(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    with pytest.raises(TypeError, match="step must be an integer"):
        writer.write(1.5, {"loss": 1.0})
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="is closed"):
        writer.write(2, {"loss": 1.0})


def test_read_jsonl_names_the_file_and_line_of_a_corrupt_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: expected a JSON object"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"step": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_jsonl(path)
