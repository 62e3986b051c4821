"""Ahead-of-time compilation of a config's real train step for a TPU topology, on any host.

``jax.experimental.topologies.get_topology_desc`` describes a TPU slice (or several) without
attaching to one, as long as libtpu is installed (``pip install 'mllm_jax[tpu]'``). The step is
the one ``trainer.train`` runs (``trainer.prepare_step(abstract=True)``: same model, loss,
optimizer groups, mesh and logical rules); it is lowered with abstract state and batch and
compiled by the TPU compiler, which reports per-device memory. FLOPs are counted on the traced
step (``matmul_flops``). The HLO's collectives show how the rules shard the step (all-gathers of
FSDP, all-to-alls of expert parallelism, ...).

Every training config kind compiles, its task built by its recipe without data or weights:

  text / MoE LM (configs/base.py, moe_lm.py)   ``text_lm.text_lm_task``, batch [data.batch_size]
  LLaVA (configs/llava_vce.py, llava15_7b.py)  ``llava_stages.stage_step_task`` of ``stage``
                                               (stage1 or stage2; "all" compiles stage2)
  METALM (configs/metalm_*.py)                 ``metalm.step_task`` of semi_causal (or the one
                                               mode of ``modes``): text "train", vl "pretrain"

``tools/aot_compile.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.extend.core import ClosedJaxpr, Jaxpr
from jax.sharding import NamedSharding, PartitionSpec

from mllm_jax import sharding
from mllm_jax.data.batch import IMAGE_FIELDS, TEXT_FIELDS

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
# Families whose chips hold two TensorCores that JAX on a TPU VM drives as one device
# ("megacore"); libtpu's topology description otherwise lists every core as a device.
MEGACORE_FAMILIES = ("v4", "v5p")
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

    options = {}
    if topology_name.split(":")[0] in MEGACORE_FAMILIES:
        options["chip_config_name"] = "megacore"
    try:
        topology = topologies.get_topology_desc(
            platform="tpu", topology_name=topology_name, num_slices=num_slices, **options
        )
    except Exception as error:  # noqa: BLE001 - libtpu raises several types
        raise RuntimeError(
            f"cannot describe TPU topology {topology_name!r} x {num_slices} slice(s): {error}. "
            "Is libtpu installed (pip install 'mllm_jax[tpu]')?"
        ) from error
    return list(topology.devices)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """How many of each collective op the (optimized) HLO module text holds.

    Async pairs (``all-gather-start`` / ``-done``) count once, by their start; a combined
    collective over several arrays (a tuple-shaped op) counts once. An op inside a loop body
    (scanned layers) counts once, however many times the loop runs.
    """
    counts = {}
    for name in COLLECTIVES:
        pattern = rf"(?<![%\w.-]){name}(?:-start)?\("
        counts[name] = len(re.findall(pattern, hlo_text))
    return counts


def matmul_flops(jaxpr: Jaxpr | ClosedJaxpr) -> float:
    """FLOPs (2 per multiply-add) of the matrix products a jaxpr runs, on its global shapes.

    ``dot_general``, ``ragged_dot_general`` and convolutions, in sub-jaxprs too: a ``scan``'s
    body counts ``length`` times (scanned layers, accumulation micro-batches), a ``cond`` its
    costliest branch, a ``while`` body once (its trip count is not static). The rematerialised
    forward pass is in a gradient's jaxpr, so it counts. XLA's own cost analysis of the
    compiled TPU step counts every loop body once, far below this for scanned models.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name, params = eqn.primitive.name, eqn.params
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name in ("dot_general", "ragged_dot_general"):
            numbers = (
                params.get("dimension_numbers")
                or params["ragged_dot_dimension_numbers"].dot_dimension_numbers
            )
            (lhs_contracting, _), _ = numbers
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs[d] for d in lhs_contracting)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_features = rhs[params["dimension_numbers"].rhs_spec[0]]
            total += 2.0 * out * math.prod(rhs) / out_features
        elif name == "cond":
            total += max(matmul_flops(branch) for branch in params["branches"])
        else:
            inner = sum(
                matmul_flops(value)
                for value in params.values()
                if isinstance(value, Jaxpr | ClosedJaxpr)
            )
            total += inner * (params["length"] if name == "scan" else 1)
    return total


@dataclasses.dataclass(frozen=True)
class AOTReport:
    """What one compile reports, per device: bytes against HBM, FLOPs, collectives in the HLO."""

    topology: str
    num_slices: int
    num_devices: int
    device_kind: str
    mesh: dict[str, int]
    task: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    hbm_bytes: int | None
    flops_per_device: float
    xla_flops_per_device: float | None
    collectives: dict[str, int]
    num_params: int
    num_trainable_params: int
    compile_seconds: float

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
        xla_flops = f"{self.xla_flops_per_device:.3e}" if self.xla_flops_per_device else "n/a"
        lines = [
            f"topology        {self.topology} x {self.num_slices} slice(s): "
            f"{self.num_devices} x {self.device_kind}",
            f"mesh            {self.mesh}",
            f"step            {self.task}, compiled in {self.compile_seconds:.0f} s",
            f"params          {self.num_params:,} ({self.num_trainable_params:,} trainable)",
            f"arguments       {self.argument_bytes / GIB:8.3f} GiB per device",
            f"outputs         {self.output_bytes / GIB:8.3f} GiB (aliased "
            f"{self.alias_bytes / GIB:.3f})",
            f"temporaries     {self.temp_bytes / GIB:8.3f} GiB",
            f"peak            {self.peak_bytes / GIB:8.3f} GiB of {hbm} HBM"
            f" -> {'fits' if self.fits else 'DOES NOT FIT'}",
            f"step FLOPs      {self.flops_per_device:.3e} per device in matrix products "
            f"(XLA cost analysis, loop bodies once: {xla_flops})",
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


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """A config's train task built without data, its schedule, and its global batch's fields.

    ``batch``: field -> (global shape, dtype), the fields its data stream yields.
    """

    task: Any  # trainer.TrainTask
    optimizer: ml_collections.ConfigDict
    training: ml_collections.ConfigDict
    batch: dict[str, tuple[tuple[int, ...], Any]]


def _contract_fields(batch_size: int, seq_len: int, *, images: tuple[int, int] | None = None):
    """The batch contract's fields (``data/batch.py``); ``images``: (slots M, image size H)."""
    fields = {name: ((batch_size, seq_len), dtype) for name, dtype in TEXT_FIELDS.items()}
    if images is not None:
        slots, size = images
        shapes = {
            "images": (batch_size, slots, size, size, 3),
            "image_mask": (batch_size, slots),
            "image_slot": (batch_size, seq_len),
            "image_patch": (batch_size, seq_len),
        }
        fields |= {name: (shapes[name], dtype) for name, dtype in IMAGE_FIELDS.items()}
    return fields


def _llava_inputs(config: ml_collections.ConfigDict) -> StepInputs:
    from mllm_jax.recipes import llava_models, llava_stages

    stage = "stage2" if config.stage == "all" else config.stage
    if stage not in ("stage1", "stage2"):
        raise ValueError(
            f"AOT compilation of the LLaVA recipe covers stage1 and stage2, not {stage!r}"
        )
    section = config[stage]
    images = (section.max_images, llava_models.image_size(config))
    return StepInputs(
        task=llava_stages.stage_step_task(config, stage),
        optimizer=llava_stages.stage_optimizer(config, section),
        training=llava_stages.stage_training(config, section),
        batch=_contract_fields(section.batch_size, section.seq_len, images=images),
    )


def _metalm_inputs(config: ml_collections.ConfigDict) -> StepInputs:
    from mllm_jax.recipes import metalm

    mode = "semi_causal" if "semi_causal" in config.modes else config.modes[0]
    if config.setting == "text":
        stage = "train"
        batch = _contract_fields(config.data.batch_size, config.data.seq_len)
    else:
        stage = "pretrain"
        section = config[stage]
        images = (section.max_images, config.data.image_size)
        batch = _contract_fields(section.batch_size, section.seq_len, images=images)
    batch["span_ids"] = (batch["tokens"][0], jnp.int32)
    example = {name: jnp.zeros((1, *shape[1:]), dtype) for name, (shape, dtype) in batch.items()}
    optimizer, training = metalm.stage_schedule(config, config[stage])
    return StepInputs(metalm.step_task(config, mode, stage, example), optimizer, training, batch)


def step_inputs(config: ml_collections.ConfigDict, mesh, rules) -> StepInputs:
    """What ``compile_train_step`` lowers for ``config``: its recipe's task, schedule and batch."""
    from mllm_jax.recipes import text_lm

    recipe = config.get("recipe")
    if not recipe:
        return StepInputs(
            task=text_lm.text_lm_task(config, mesh, rules, train_set=None, eval_set=None),
            optimizer=config.optimizer,
            training=config.training,
            batch=_contract_fields(config.data.batch_size, config.data.seq_len),
        )
    if recipe == "llava_vce":
        return _llava_inputs(config)
    if recipe == "metalm":
        return _metalm_inputs(config)
    raise ValueError(f"AOT compilation does not know recipe={recipe!r}")


def compile_train_step(
    config: ml_collections.ConfigDict, topology_name: str, num_slices: int = 1
) -> AOTReport:
    """Lowers and compiles ``config``'s train step for the topology; returns its report.

    Any training config (``step_inputs``); batch sizes in the config are global.
    """
    from mllm_jax.train.trainer import prepare_step

    devices = topology_devices(topology_name, num_slices)
    mesh_config = _mesh_config_for(config.mesh, num_slices)
    mesh = sharding.create_mesh_from_config(mesh_config, devices=devices)
    rules = sharding.logical_rules_from_config(mesh_config.logical_axis_rules)
    inputs = step_inputs(config, mesh, rules)
    prepared = prepare_step(
        inputs.task,
        optimizer_config=inputs.optimizer,
        training_config=inputs.training,
        mesh=mesh,
        rules=rules,
        abstract=True,
    )
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=prepared.batch_sharding)
        for name, (shape, dtype) in inputs.batch.items()
    }
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(
        key_shape.shape, key_shape.dtype, sharding=NamedSharding(mesh, PartitionSpec())
    )
    started = time.perf_counter()
    with sharding.mesh_context(mesh, rules):
        traced = prepared.step_fn.trace(prepared.state, batch, rng)
        lowered = traced.lower()
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
    compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    xla_flops = float(analysis["flops"]) if analysis and "flops" in analysis else None
    num_trainable = _count(prepared.state.trainable)
    return AOTReport(
        topology=topology_name,
        num_slices=num_slices,
        num_devices=len(devices),
        device_kind=devices[0].device_kind,
        mesh=dict(mesh.shape),
        task=inputs.task.name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        hbm_bytes=_hbm_per_device(devices, topology_name, num_slices),
        flops_per_device=matmul_flops(traced.jaxpr) / len(devices),
        xla_flops_per_device=xla_flops,
        collectives=count_collectives(compiled.as_text()),
        num_params=num_trainable + _count(prepared.state.frozen),
        num_trainable_params=num_trainable,
        compile_seconds=compile_seconds,
    )


def _count(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))
