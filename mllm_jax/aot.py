"""Ahead-of-time compilation of a config's real train step for a TPU topology, on any host.

``jax.experimental.topologies.get_topology_desc`` describes a TPU slice (or several) without
attaching to one, as long as libtpu is installed (``pip install 'mllm_jax[tpu]'``). The step is
the one ``trainer.train`` runs (``trainer.prepare_step(abstract=True)``: same model, loss,
optimizer groups, mesh and logical rules); it is lowered with abstract state and batch and
compiled by the TPU compiler, which reports per-device memory and FLOPs. The HLO's collectives
show how the rules shard the step (all-gathers of FSDP, all-to-alls of expert parallelism, ...).

``tools/aot_compile.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import sharding

GIB = 1024**3
# HBM per chip (public Cloud TPU specs), keyed by jax's device_kind.
HBM_BYTES_PER_CHIP = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,
}
# TPU_ACCELERATOR_TYPE values libtpu accepts per topology prefix (only its family matters).
ACCELERATOR_TYPES = {"v4": "v4-8", "v5e": "v5litepod-4", "v5p": "v5p-8", "v6e": "v6e-4"}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


class StepDoesNotFitError(RuntimeError):
    """The TPU compiler ran out of HBM for the step (its own message is kept)."""


def set_tpu_environment(topology_name: str) -> None:
    """Environment that stops libtpu probing GCE metadata on a host that is not a TPU VM.

    Call before jax initialises a backend. Existing values are kept.
    """
    family = topology_name.split(":")[0]
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", ACCELERATOR_TYPES.get(family, "v5litepod-4"))


def topology_devices(topology_name: str, num_slices: int = 1) -> list:
    """The devices of ``num_slices`` slices of ``topology_name`` (e.g. ``"v5e:16x16"``)."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=topology_name, num_slices=num_slices
        )
    except Exception as error:  # noqa: BLE001 - libtpu raises several types
        raise RuntimeError(
            f"cannot describe TPU topology {topology_name!r} x {num_slices} slice(s): {error}. "
            "Is libtpu installed (pip install 'mllm_jax[tpu]')?"
        ) from error
    return list(topology.devices)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the (optimized) HLO module text holds.

    Async pairs (``all-gather-start`` / ``-done``) count once, by their start.
    """
    counts = {}
    for name in COLLECTIVES:
        pattern = rf"=\s*\S+\s+{name}(?:-start)?\("
        counts[name] = len(re.findall(pattern, hlo_text))
    return counts


@dataclasses.dataclass(frozen=True)
class AOTReport:
    """What one compile reports, per device (bytes) and for the whole step (FLOPs)."""

    topology: str
    num_slices: int
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm_bytes: int | None
    flops_per_device: float | None
    collectives: dict[str, int]
    num_params: int

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs not aliased to (donated) arguments + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def fits(self) -> bool:
        return self.hbm_bytes is None or self.peak_bytes <= self.hbm_bytes

    def format(self) -> str:
        """A human-readable multi-line summary."""
        hbm = f"{self.hbm_bytes / GIB:.1f} GiB" if self.hbm_bytes else "unknown"
        flops = f"{self.flops_per_device:.3e}" if self.flops_per_device else "n/a"
        lines = [
            f"topology        {self.topology} x {self.num_slices} slice(s): "
            f"{self.num_devices} x {self.device_kind}",
            f"mesh            {self.mesh}",
            f"params          {self.num_params:,}",
            f"arguments       {self.argument_bytes / GIB:8.3f} GiB per device",
            f"outputs         {self.output_bytes / GIB:8.3f} GiB (aliased "
            f"{self.alias_bytes / GIB:.3f})",
            f"temporaries     {self.temp_bytes / GIB:8.3f} GiB",
            f"peak            {self.peak_bytes / GIB:8.3f} GiB of {hbm} HBM"
            f" -> {'fits' if self.fits else 'DOES NOT FIT'}",
            f"step FLOPs      {flops} per device",
            "collectives     " + ", ".join(f"{k} {v}" for k, v in self.collectives.items()),
        ]
        return "\n".join(lines)


def _hbm_per_device(devices: list, topology_name: str, num_slices: int) -> int | None:
    per_chip = HBM_BYTES_PER_CHIP.get(devices[0].device_kind)
    if per_chip is None:
        return None
    shape = topology_name.split(":")[1].split("x")
    chips = math.prod(int(n) for n in shape) * num_slices
    return per_chip * chips // len(devices)


def _mesh_config_for(mesh_config: Any, num_slices: int) -> ml_collections.ConfigDict:
    """The config's mesh; with several slices and no DCN split given, data parallel over DCN."""
    mesh_config = ml_collections.ConfigDict(mesh_config.to_dict())
    if num_slices > 1 and math.prod(dict(mesh_config.dcn_parallelism).values()) == 1:
        mesh_config.dcn_parallelism.data = num_slices
    return mesh_config


def compile_train_step(
    config: ml_collections.ConfigDict, topology_name: str, num_slices: int = 1
) -> AOTReport:
    """Lowers and compiles ``config``'s train step for the topology; returns its report.

    Supported: the text and MoE LM configs (``configs/base.py``, ``configs/moe_lm.py``), whose
    step ``recipes.text_lm`` builds. ``data.batch_size`` is the global batch.
    """
    from mllm_jax.recipes import text_lm
    from mllm_jax.train.trainer import prepare_step

    if config.get("recipe"):
        raise ValueError(
            f"AOT compilation supports the text/MoE LM configs; recipe={config.recipe!r} is not "
            "supported yet"
        )
    devices = topology_devices(topology_name, num_slices)
    mesh_config = _mesh_config_for(config.mesh, num_slices)
    mesh = sharding.create_mesh_from_config(mesh_config, devices=devices)
    rules = sharding.logical_rules_from_config(mesh_config.logical_axis_rules)
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    prepared = prepare_step(
        text_lm.text_lm_task(config, mesh, rules, train_set=None, eval_set=None),
        optimizer_config=config.optimizer,
        training_config=config.training,
        mesh=mesh,
        rules=rules,
        abstract=True,
    )
    batch_keys = {"tokens": jnp.int32, "targets": jnp.int32, "positions": jnp.int32,
                  "segment_ids": jnp.int32, "loss_mask": jnp.float32}  # fmt: skip
    batch = {
        key: jax.ShapeDtypeStruct((batch_size, seq_len), dtype, sharding=prepared.batch_sharding)
        for key, dtype in batch_keys.items()
    }
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(
        key_shape.shape, key_shape.dtype, sharding=NamedSharding(mesh, PartitionSpec())
    )
    with sharding.mesh_context(mesh, rules):
        lowered = prepared.step_fn.lower(prepared.state, batch, rng)
        try:
            compiled = lowered.compile()
        except Exception as error:  # noqa: BLE001 - XlaRuntimeError and friends
            message = str(error)
            if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message:
                raise
            raise StepDoesNotFitError(
                f"the step does not fit in HBM on {topology_name} x {num_slices} "
                f"(mesh {dict(mesh.shape)}): {message.strip().splitlines()[-1]}"
            ) from error
    memory = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    flops = float(analysis["flops"]) if analysis and "flops" in analysis else None
    num_params = sum(
        math.prod(leaf.shape)
        for part in (prepared.state.trainable, prepared.state.frozen)
        for leaf in jax.tree_util.tree_leaves(part)
    )
    return AOTReport(
        topology=topology_name,
        num_slices=num_slices,
        num_devices=len(devices),
        device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        hbm_bytes=_hbm_per_device(devices, topology_name, num_slices),
        flops_per_device=flops,
        collectives=count_collectives(compiled.as_text()),
        num_params=num_params,
    )
