"""Mesh construction, logical-axis rules and sharding helpers."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import sharding

RULES = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("embed", "tensor"),  # fallback for `embed` when fsdp is taken
    ("vocab", ("tensor", "fsdp")),
)


def test_resolve_parallelism_fills_the_single_auto_axis():
    assert sharding.resolve_parallelism({"data": -1, "tensor": 2}, 8, group="ici") == (4, 1, 2, 1)
    assert sharding.resolve_parallelism({}, 1, group="dcn") == (1, 1, 1, 1)


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"data": 3}, "covers 3 devices, but there are 8"),
        ({"data": -1, "tensor": 3}, "do not divide"),
        ({"model": 8}, "unknown mesh axes"),
        ({"data": 0}, "positive or -1"),
    ],
)
def test_resolve_parallelism_rejects_bad_sizes_with_a_clear_error(sizes, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_parallelism(sizes, 8, group="ici")


def test_create_mesh_has_auto_axes_in_fixed_order(devices):
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": -1})
    assert mesh.axis_names == ("data", "fsdp", "tensor", "expert")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@dataclasses.dataclass(frozen=True)
class FakeTpuDevice:
    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"  # not "tpu": mesh_utils then keeps the given in-slice order
    device_kind: str = "fake"


def _fake_multislice(num_slices=2, per_slice=4):
    # Interleave slices in the input list so that the test sees any reordering.
    return [
        FakeTpuDevice(id=10 * s + i, slice_index=s)
        for i in range(per_slice)
        for s in range(num_slices)
    ]


def test_multislice_mesh_puts_dcn_outermost_on_the_same_axis():
    mesh = sharding.create_mesh({"data": 2, "fsdp": 2}, {"data": 2}, _fake_multislice())
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    # data index 0-1 live on slice 0, 2-3 on slice 1: the DCN factor is the outer one.
    np.testing.assert_array_equal(slices[:, :, 0, 0], [[0, 0], [0, 0], [1, 1], [1, 1]])


def test_multislice_mesh_dcn_axis_differs_from_ici_axis():
    mesh = sharding.create_mesh({"fsdp": 4}, {"data": 2}, _fake_multislice())
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    for data_index in range(2):
        row = mesh.devices[data_index, :, 0, 0]
        assert {d.slice_index for d in row} == {data_index}
        assert sorted(d.id for d in row) == [10 * data_index + i for i in range(4)]


def test_multislice_mesh_rejects_dcn_that_does_not_match_slices():
    with pytest.raises(ValueError, match="dcn_parallelism"):
        sharding.create_mesh({"fsdp": 4}, {"data": 4}, _fake_multislice())


def test_rules_first_usable_rule_wins_and_later_rules_are_fallbacks():
    to_spec = lambda names: nn.logical_to_mesh_axes(names, RULES)
    assert to_spec(("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    # heads takes tensor first (its rule comes before embed's fallback), embed still gets fsdp.
    assert to_spec(("heads", "embed")) == PartitionSpec("tensor", "fsdp")
    # vocab's only rule needs fsdp, already taken by embed (earlier rule): vocab is replicated.
    assert to_spec(("vocab", "embed")) == PartitionSpec(None, "fsdp")
    # An unknown name is replicated.
    assert to_spec(("nothing", "mlp")) == PartitionSpec(None, "tensor")


def test_rules_fallback_applies_when_the_first_rule_is_taken():
    rules = (("vocab", "fsdp"), ("embed", "fsdp"), ("embed", "tensor"))
    assert nn.logical_to_mesh_axes(("vocab", "embed"), rules) == PartitionSpec("fsdp", "tensor")


def test_rules_from_config_normalise_lists_and_reject_malformed_entries():
    assert sharding.logical_rules_from_config([["a", ["x", "y"]], ("b", None)]) == (
        ("a", ("x", "y")),
        ("b", None),
    )
    with pytest.raises(ValueError, match="logical_name, mesh_axes"):
        sharding.logical_rules_from_config([("a", "x", "y")])


class TwoKernels(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param(
            "w", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")), (8, 16)
        )
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (16,))
        return x @ w + b


def _abstract_params():
    return jax.eval_shape(lambda: TwoKernels().init(jax.random.key(0), jnp.ones((1, 8))))["params"]


def test_abstract_tree_to_named_shardings_and_unsharded_fraction(devices):
    mesh = sharding.create_mesh({"fsdp": 2, "tensor": 4})
    abstract = _abstract_params()
    shardings = sharding.logical_to_mesh_sharding(abstract, mesh, RULES)
    assert shardings["w"] == NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    assert shardings["b"].spec == PartitionSpec("tensor")
    assert sharding.unsharded_fraction(abstract, shardings) == 0.0

    replicated = sharding.logical_to_mesh_sharding(abstract, mesh, (("mlp", "tensor"),))
    assert replicated["w"].spec == PartitionSpec(None, "tensor")
    one_device = sharding.logical_to_mesh_sharding(abstract, mesh, (("embed", "fsdp"),))
    # b (16 floats) is replicated, w (128 floats) is split: 16 / 144 of the bytes.
    assert sharding.unsharded_fraction(abstract, one_device) == pytest.approx(16 / 144)
    with pytest.raises(AssertionError, match="replicated"):
        sharding.assert_mostly_sharded(abstract, one_device, max_unsharded=0.1)
    assert sharding.assert_mostly_sharded(abstract, one_device, 0.2) == pytest.approx(16 / 144)


def test_check_divisible_names_the_offending_parameter(devices):
    mesh = sharding.create_mesh({"tensor": 8})
    split_dim1 = {"w": NamedSharding(mesh, PartitionSpec(None, "tensor"))}
    sharding.check_divisible({"w": jax.ShapeDtypeStruct((8, 16), jnp.float32)}, split_dim1)
    with pytest.raises(ValueError, match=r"\['w'\]: dim 1 of shape \(8, 12\) is split 8 ways"):
        sharding.check_divisible({"w": jax.ShapeDtypeStruct((8, 12), jnp.float32)}, split_dim1)
