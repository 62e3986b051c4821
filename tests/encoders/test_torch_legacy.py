"""The restricted reader of legacy torch files: real weights load, code never runs."""

import os
import pickle

import numpy as np
import pytest

from mllm_jax.encoders import pretrained_files
from mllm_jax.encoders.torch_legacy import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    TorchFileError,
    load_legacy_state_dict,
)


@pytest.fixture(scope="module")
def weights_path():
    return pretrained_files.package_file(
        pretrained_files.MOBILENET_V2, pretrained_files.MOBILENET_V2_FILE
    )


def test_reads_every_tensor_of_the_mobilenet_file(weights_path):
    state = load_legacy_state_dict(weights_path)
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.1.num_batches_tracked"].dtype == np.int64
    # MobileNetV2 (width 1.0) has 3,504,872 parameters; the rest are BatchNorm statistics.
    params = sum(v.size for k, v in state.items() if not k.endswith(("running_mean",
                 "running_var", "num_batches_tracked")))  # fmt: skip
    assert params == 3_504_872
    assert all(np.isfinite(v).all() for v in state.values())


def _legacy_file(path, obj):
    with open(path, "wb") as file:
        for part in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}, obj, []):
            pickle.dump(part, file, protocol=2)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_refuses_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    _legacy_file(path, {"weight": _RunsCode(marker)})
    with pytest.raises(TorchFileError, match=r"evil\.pth.*refuses to load global .*system"):
        load_legacy_state_dict(path)
    assert not marker.exists()


def test_truncated_file_names_the_file_and_storage(tmp_path, weights_path):
    path = tmp_path / "cut.pth"
    path.write_bytes(weights_path.read_bytes()[:-1000])
    with pytest.raises(TorchFileError, match=r"cut\.pth: storage .* is truncated"):
        load_legacy_state_dict(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"hello, this is text")
    with pytest.raises(TorchFileError, match=r"notes\.pth"):
        load_legacy_state_dict(path)


def test_a_non_tensor_entry_is_an_error(tmp_path):
    path = tmp_path / "plain.pth"
    _legacy_file(path, {"weight": [1.0, 2.0]})
    with pytest.raises(TorchFileError, match=r"entry 'weight' is list, not a tensor"):
        load_legacy_state_dict(path)
