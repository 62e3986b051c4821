"""Safetensors box reads and sharded placement vs numpy on the same random tensors.

The files are written here byte by byte from the format's definition (8-byte little-endian
header length, JSON header, raw C-order data), independently of the reader. Every comparison
is exact: loading moves bytes, it does no arithmetic.
"""

from __future__ import annotations

import json
import math
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.checkpoint_conversion.sharded_load import (
    Source,
    TensorView,
    check_sources,
    load_params,
    stacked,
    view,
)
from mllm_jax.sharding import create_mesh

_NAMES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
H, D, E, X, F = 4, 6, 8, 4, 6  # heads, head dim, embed, experts, expert width


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


@pytest.fixture(scope="module")
def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)

    out = {
        "q_proj": normal(H * D, E),
        "gate_up": normal(X, 2 * F, E),
        "conv": normal(E, 3, 2, 2),  # [out, in, kh, kw]
        "bf16": normal(8, 4).astype(ml_dtypes.bfloat16),
        "cube": normal(6, 8, 10),
    }
    out |= {f"layer{i}.expert{e}": normal(F, E) for i in range(2) for e in range(X)}
    return out


@pytest.fixture(scope="module")
def directory(tensors, tmp_path_factory) -> SafetensorsDirectory:
    path = tmp_path_factory.mktemp("checkpoint")
    write_safetensors(path / "model.safetensors", tensors)
    return SafetensorsDirectory(path)


def test_box_read_returns_the_slice_and_reads_only_its_bytes(directory, tensors):
    for box in [
        (slice(1, 3), slice(2, 6), slice(0, 10)),
        (slice(0, 6), slice(0, 8), slice(3, 4)),
        (slice(5, 6), slice(0, 8), slice(0, 10)),
    ]:
        before = directory.bytes_read
        got = directory.read("cube", box)
        np.testing.assert_array_equal(got, tensors["cube"][box])
        assert directory.bytes_read - before == got.size * 4
    whole = directory.read("bf16")
    assert whole.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(whole, tensors["bf16"])


def _expected(t: dict[str, np.ndarray]) -> dict[str, tuple[Source, np.ndarray]]:
    """Target name -> (its source, the numpy result of the same transform)."""
    experts = [[t[f"layer{i}.expert{e}"].T for e in range(X)] for i in range(2)]
    return {
        "split_permute": (
            view("q_proj", split=((H, D), (E,)), permute=(2, 0, 1)),
            t["q_proj"].reshape(H, D, E).transpose(2, 0, 1),
        ),
        "select": (
            view("gate_up", select=(slice(None), slice(F, 2 * F), slice(None)), permute=(0, 2, 1)),
            t["gate_up"][:, F:].transpose(0, 2, 1),
        ),
        "merge": (
            view("conv", split=((E,), (3,), (2,), (2,)), permute=(2, 3, 1, 0), merge=(12, E)),
            t["conv"].transpose(2, 3, 1, 0).reshape(12, E),
        ),
        "stacked_axis1": (
            stacked([TensorView(f"layer0.expert{e}", permute=(1, 0)) for e in range(X)], axis=1),
            np.stack(experts[0], axis=1),
        ),
        "nested_stacks": (
            stacked(
                [
                    stacked([TensorView(f"layer{i}.expert{e}", permute=(1, 0)) for e in range(X)])
                    for i in range(2)
                ]
            ),
            np.stack([np.stack(layer) for layer in experts]),
        ),
        "bf16": (view("bf16", permute=(1, 0)), t["bf16"].T),
    }


def test_every_transform_reads_like_numpy(directory, tensors):
    rng = np.random.default_rng(1)
    for name, (source, want) in _expected(tensors).items():
        assert source.shape(directory) == want.shape, name
        whole = tuple(slice(0, d) for d in want.shape)
        np.testing.assert_array_equal(source.read(directory, whole), want, err_msg=name)
        for _ in range(3):
            box = []
            for d in want.shape:
                start = int(rng.integers(0, d))
                box.append(slice(start, int(rng.integers(start + 1, d + 1))))
            got = source.read(directory, tuple(box))
            np.testing.assert_array_equal(got, want[tuple(box)], err_msg=f"{name} {box}")


@pytest.mark.parametrize(
    "specs",
    [
        dict(split_permute=("a", "b", None), select=(None, ("a", "c"), None)),
        dict(split_permute=(("a", "b", "c"),), stacked_axis1=(None, "a", "b")),
        dict(nested_stacks=("a", "b", "c", None), merge=("a", "c"), bf16=()),
    ],
    ids=["2d", "one_axis_over_8", "stacks_and_merge"],
)
def test_load_params_on_a_2x2x2_mesh_matches_numpy(directory, tensors, devices, specs):
    mesh = create_mesh(dict(a=2, b=2, c=2), devices=devices, axes=("a", "b", "c"))
    expected = _expected(tensors)
    sources = {name: expected[name][0] for name in specs}
    targets = {
        name: jax.ShapeDtypeStruct(
            expected[name][1].shape,
            np.float32,
            sharding=NamedSharding(mesh, PartitionSpec(*spec)),
        )
        for name, spec in specs.items()
    }
    before = directory.bytes_read
    params = load_params(directory, sources, targets, ignored=[".*"])
    for name, array in params.items():
        want = expected[name][1].astype(np.float32)
        assert array.dtype == np.float32 and array.sharding == targets[name].sharding
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), want[shard.index], err_msg=name)
    # Devices holding the same box share one read, so untouched by select or merge, each
    # source byte is read once however the target is split.
    read_once = [n for n in specs if n not in ("select", "merge")]
    wanted = sum(math.prod(expected[n][1].shape) * expected[n][1].dtype.itemsize for n in read_once)
    if len(read_once) == len(specs):
        assert directory.bytes_read - before == wanted


def test_sharded_reads_touch_only_the_device_slices(directory, tensors, devices):
    """A target split 8 ways reads each byte once; one selected half reads half the tensor."""
    mesh = create_mesh(dict(a=8), devices=devices, axes=("a",))
    source, want = _expected(tensors)["select"]
    target = jax.ShapeDtypeStruct(
        want.shape, np.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "a"))
    )
    before = directory.bytes_read
    params = load_params(directory, {"select": source}, {"select": target}, ignored=[".*"])
    np.testing.assert_array_equal(np.asarray(params["select"]), want)
    assert directory.bytes_read - before == want.size * 4 == tensors["gate_up"].nbytes // 2


def test_check_sources_lists_every_problem(directory, tensors):
    targets = {
        "ok": jax.ShapeDtypeStruct((E, H, D), np.float32),
        "wrong_shape": jax.ShapeDtypeStruct((E, H * D), np.float32),
        "no_source": jax.ShapeDtypeStruct((1,), np.float32),
        "absent_tensor": jax.ShapeDtypeStruct((1,), np.float32),
    }
    sources = {
        "ok": view("q_proj", split=((H, D), (E,)), permute=(2, 0, 1)),
        "wrong_shape": view("cube"),
        "absent_tensor": view("nowhere"),
        "no_target": view("conv"),
    }
    with pytest.raises(ValueError) as error:
        check_sources(directory, sources, targets, ignored=[r"layer\d\..*"])
    message = str(error.value)
    for expected in [
        "no checkpoint tensor maps to parameter no_source",
        "the model has no parameter no_target (source conv)",
        "missing tensor nowhere (for parameter absent_tensor)",
        "shape mismatch for parameter wrong_shape",
        "unexpected tensor gate_up",
        "unexpected tensor bf16",
    ]:
        assert expected in message
    assert "layer0" not in message and "5 problem" not in message


def test_index_directory_reads_across_files(tmp_path, tensors):
    write_safetensors(tmp_path / "a.safetensors", {"cube": tensors["cube"]})
    write_safetensors(tmp_path / "b.safetensors", {"conv": tensors["conv"]})
    index = {"weight_map": {"cube": "a.safetensors", "conv": "b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    directory = SafetensorsDirectory(tmp_path)
    assert directory.names() == ["conv", "cube"]
    np.testing.assert_array_equal(directory.read("conv"), tensors["conv"])
    index["weight_map"]["extra"] = "c.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="c.safetensors"):
        SafetensorsDirectory(tmp_path)
