"""The generate CLI refuses bad flags (a directory given as an image, an empty question) before it
loads a model, and a prompt longer than the model's context by name; a prompt past the length the
model was trained on is warned about."""

import logging

import numpy as np
import pytest
from absl import app, flags

from mllm_jax import generate as generate_cli
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.generate import _check_context, _read_images

SIZE = 16


def test_an_image_path_that_is_a_directory_or_missing_is_named(tmp_path):
    preprocessing = ImagePreprocessing(size=SIZE)
    with pytest.raises(app.UsageError, match=f"--image '{tmp_path}' is a directory"):
        _read_images([str(tmp_path)], preprocessing)
    with pytest.raises(app.UsageError, match="does not exist"):
        _read_images([str(tmp_path / "nope.png")], preprocessing)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(app.UsageError, match="empty.png'.*cannot decode image"):
        _read_images([str(tmp_path / "empty.png")], preprocessing)


def test_a_prompt_past_the_context_is_refused_and_past_the_training_length_warned(caplog):
    lengths = np.array([10, 40])
    _check_context(lengths, 8, context_length=48)
    with pytest.raises(ValueError, match=r"question\[1\]: a prompt of 40 tokens .* context of 47"):
        _check_context(lengths, 8, context_length=47)
    with caplog.at_level(logging.WARNING):
        _check_context(lengths, 8, context_length=47, strict=False)
    assert "question[1]" in caplog.text and "the 47 tokens the model was trained on" in caplog.text


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--image", "{tmp}", "--question", "what?"], "--image '{tmp}' is a directory"),
        (["--question", "  "], "--question is required and must not be empty"),
        (["--question", "what?", "--top_p", "0"], r"--top_p=0.0 must be in \(0, 1\]"),
    ],
    ids=["directory image", "empty question", "top_p"],
)
def test_the_command_line_refuses_bad_flags_before_loading_a_model(tmp_path, arguments, message):
    model_dir = str(tmp_path / "no_model_here")
    flags.FLAGS(
        ["mllm-generate", "--model_dir", model_dir, *(a.format(tmp=tmp_path) for a in arguments)]
    )
    try:
        with pytest.raises(app.UsageError, match=message.format(tmp=tmp_path)):
            generate_cli.main(["mllm-generate"])
    finally:
        flags.FLAGS.unparse_flags()
