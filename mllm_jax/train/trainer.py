"""The training loop every stage shares: sharded grouped state, checkpoints, metrics, evaluation.

A stage describes itself as a ``TrainTask`` (how to init its model, its loss, which parameters
train at which learning rate, its data stream, its evaluation); ``train`` does the rest:

  mesh + logical rules -> state born sharded (frozen params outside the optimizer)
  -> earlier stages' weights overlaid -> resume from the workdir's latest checkpoint if any
  -> jitted, donating grouped step (gradient accumulation, non-finite guard)
  -> per step: dispatch without waiting for the device, preemption check
  -> every ``log_every`` (the one host sync of a log window, see ``log_window.py``): non-finite
     guard, loss, learning rates, grad norm, tokens/s, examples/s, MFU over the window
     to TensorBoard + JSONL + the console progress bar; optional profiler trace of chosen steps
  -> every ``eval_every``: ``task.evaluate`` -> every ``checkpoint_every``: async Orbax save
  -> at the end (or on SIGTERM): a final save, PNG plots, a summary table.

Workdir layout::

  checkpoints/<step>/{trainable,opt_state,data,metadata}   adapter-only training checkpoints
  base_params/                                             the frozen weights, written once
  metrics.jsonl, tensorboard/, plots/*.png                 what the run logged

Resuming (same workdir) restores the trainable params, optimizer state, step and the data
iterator's position, and reads the frozen weights back from ``base_params``; the per-step rng is
``fold_in(seed, step)``, so a resumed run continues exactly where the interrupted one stood.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax import sharding
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.train import checkpoint as checkpoint_lib
from mllm_jax.train import mfu as mfu_lib
from mllm_jax.train import step as step_lib
from mllm_jax.train.log_window import LogWindow
from mllm_jax.train.metric_writers import MetricWriter
from mllm_jax.train.param_groups import (
    FROZEN,
    GroupedOptimizer,
    ParamGroup,
    make_grouped_optimizer,
    tree_bytes,
)
from mllm_jax.train.partition import combine_params
from mllm_jax.train.plots import plot_curves
from mllm_jax.train.preemption import PreemptionWatcher
from mllm_jax.train.pretrained import overlay_params
from mllm_jax.train.profiling import StepProfiler
from mllm_jax.train.progress import ProgressBar
from mllm_jax.train.state import GroupedTrainState
from mllm_jax.train.summary_table import format_key_values


class DataStream(Protocol):
    """An endless iterator of host batches (numpy, [B, ...]) whose position can be saved."""

    def __next__(self) -> dict[str, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainTask:
    """What one training stage trains, on what, and how it is judged.

    Attributes:
      name: shown on the progress bar and in the summary.
      init_params: ``rng -> params`` as ``model.init(...)["params"]`` returns them (logically
        partitioned boxes, so the state can be born sharded).
      loss_fn: ``(params, batch, rng) -> (loss_sum, num_targets)``, sums (see
        ``step.make_grouped_train_step``).
      param_groups: what trains, at which peak learning rate; everything else is frozen.
      make_train_stream: builds the training data stream (called once per run).
      pretrained: earlier stages' weights (a nested dict laid out like the params) put over the
        fresh init before training; paths it lacks keep their init.
      evaluate: ``params -> {name: value}`` run every ``eval_every`` steps and at the end.
      project_trainable: ``trainable -> trainable`` applied inside the jitted step after every
        optimizer update (a projection onto the feasible set, e.g. a clamped temperature).
      adapter: the adapter spec written into every checkpoint's metadata.
      config: the run config (JSON-able dict) for the checkpoint metadata.
    """

    name: str
    init_params: Callable[[jax.Array], Any]
    loss_fn: step_lib.SumLossFn
    param_groups: Sequence[ParamGroup]
    make_train_stream: Callable[[], DataStream]
    pretrained: Mapping | None = None
    evaluate: Callable[[Any], Mapping[str, float]] | None = None
    project_trainable: Callable[[Any], Any] | None = None
    adapter: AdapterConfig = AdapterConfig()
    config: Mapping = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train`` leaves behind.

    ``params`` are the full params (trainable + frozen) on their devices; ``history`` the logged
    records (also in ``metrics.jsonl``); ``preempted`` is True when a SIGTERM (or
    ``stop_after_steps``) ended the run early after saving.
    """

    params: Any
    step: int
    history: list[dict]
    preempted: bool
    trainable_params: int
    total_params: int
    checkpoint_dir: pathlib.Path
    base_params_path: str


def batch_counts(batch: Mapping[str, np.ndarray]) -> tuple[int, int]:
    """(examples, tokens) in a host batch: packed segments and non-padding positions for
    sequence batches, the leading dimension (and 0 tokens) otherwise."""
    if "segment_ids" in batch:
        segment_ids = np.asarray(batch["segment_ids"])
        return int(segment_ids.max(axis=1).sum()), int((segment_ids > 0).sum())
    first = next(iter(batch.values()))
    return int(np.shape(first)[0]), 0


def _global_batch(batch: Mapping[str, np.ndarray], batch_sharding: NamedSharding) -> dict:
    ways = math.prod(
        batch_sharding.mesh.shape[axis]
        for entry in batch_sharding.spec[:1]
        for axis in ((entry,) if isinstance(entry, str) else entry or ())
    )
    for key, value in batch.items():
        if (np.shape(value)[0] * jax.process_count()) % ways:
            raise ValueError(
                f"batch[{key!r}] has {np.shape(value)[0]} rows per process, which the "
                f"{ways}-way batch sharding {batch_sharding.spec} cannot split evenly; make the "
                "global batch size a multiple of the data-parallel mesh size"
            )
    return {
        key: jax.make_array_from_process_local_data(batch_sharding, np.asarray(value))
        for key, value in batch.items()
    }


def check_training_config(training_config: Any) -> None:
    """Raises ValueError naming the ``training.*`` field that cannot drive a run."""
    tc = training_config
    positive = ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints")
    for name in positive:
        if int(tc[name]) < 1:
            raise ValueError(f"training.{name}={tc[name]} must be >= 1")
    if int(tc.get("eval_every", 0)) < 0:
        raise ValueError(f"training.eval_every={tc.eval_every} must be >= 0 (0: only at the end)")
    if int(tc.get("accumulation_steps", 1)) < 1:
        raise ValueError(f"training.accumulation_steps={tc.accumulation_steps} must be >= 1")


def check_local_workdir(workdir: str | pathlib.Path) -> None:
    """Raises ValueError for a URL workdir (``gs://...``): the trainer writes its logs, plots and
    checkpoints through the local filesystem, and ``pathlib`` would quietly turn the URL into a
    local ``gs:/`` directory. Mount the bucket (e.g. ``gcsfuse``) or use a filesystem that every
    host shares and pass that path."""
    text = str(workdir)
    if "://" in text:
        raise ValueError(
            f"workdir {text!r}: URLs are not written to directly; mount the bucket on every "
            "host (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) or use a shared "
            "filesystem, and pass that path (docs/multi_process.md)"
        )


def _num_params(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _flops_of(compiled: Any, num_devices: int) -> float | None:
    """FLOPs of one step as XLA counts them in the compiled (per-device SPMD) program."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement cost analysis
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"]) * num_devices


def _init_state(task, grouped, mesh, rules, rng, *, abstract: bool = False):
    """The step-0 state born sharded and its shardings; with ``abstract``, ShapeDtypeStructs
    carrying those shardings instead of arrays (nothing is allocated or run)."""

    def init_state(rng):
        return GroupedTrainState.create(task.init_params(rng), grouped)

    with sharding.mesh_context(mesh, rules):
        shapes = jax.eval_shape(init_state, rng)
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(shapes), mesh, rules)
        sharding.check_divisible(sharding.strip_boxes(shapes), shardings)
        if abstract:
            state = jax.tree_util.tree_map(
                lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where),
                sharding.strip_boxes(shapes),
                shardings,
            )
        else:
            state = jax.jit(lambda r: nn.meta.unbox(init_state(r)), out_shardings=shardings)(rng)
    return state, shardings


def _overlay(state: GroupedTrainState, grouped, pretrained: Mapping, source: str):
    params, kept = overlay_params(
        combine_params(state.trainable, state.frozen), pretrained, source=source
    )
    trainable, frozen = grouped.split(params)
    return state.replace(trainable=trainable, frozen=frozen), kept


@dataclasses.dataclass(frozen=True)
class PreparedStep:
    """A task's step-0 state born sharded (pretrained weights overlaid) and its jitted step.

    ``step_fn(state, batch, step_rng) -> (state, metrics)`` donates ``state``; call it (or
    ``step_fn.lower(...)``) inside ``sharding.mesh_context(mesh, rules)``. ``batch`` leaves are
    global [B, ...] arrays laid out by ``batch_sharding``.
    """

    state: GroupedTrainState
    shardings: GroupedTrainState
    grouped: GroupedOptimizer
    step_fn: Callable
    step_rng: jax.Array
    batch_sharding: NamedSharding


def prepare_step(
    task: TrainTask,
    *,
    optimizer_config: Any,
    training_config: Any,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    seed: int = 0,
    abstract: bool = False,
) -> PreparedStep:
    """Everything ``train`` runs before its first step, for benchmarks, AOT compiles and tests.

    ``abstract=True`` gives the state as ShapeDtypeStructs with their shardings (no
    pretrained weights overlaid): enough to ``step_fn.lower(...)`` for devices that are not
    attached, e.g. a TPU topology (``mllm_jax.aot``).
    """
    num_steps = int(training_config.num_steps)
    grouped = make_grouped_optimizer(optimizer_config, task.param_groups, num_steps)
    init_rng, step_rng = jax.random.split(jax.random.key(seed))
    state, state_shardings = _init_state(task, grouped, mesh, rules, init_rng, abstract=abstract)
    if task.pretrained is not None and not abstract:
        state, kept = _overlay(state, grouped, task.pretrained, f"{task.name} pretrained weights")
        if kept:
            logging.info("%s: %d params keep their fresh init: %s", task.name, len(kept), kept)
    batch_sharding = step_lib.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_fn = jax.jit(
        step_lib.make_grouped_train_step(
            task.loss_fn,
            grouped,
            int(training_config.get("accumulation_steps", 1)),
            project_trainable=task.project_trainable,
        ),
        in_shardings=(state_shardings, batch_sharding, replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
    return PreparedStep(state, state_shardings, grouped, step_fn, step_rng, batch_sharding)


def train(
    task: TrainTask,
    *,
    optimizer_config: Any,
    training_config: Any,
    mesh: Mesh,
    rules: sharding.LogicalRules,
    workdir: str | pathlib.Path,
    seed: int = 0,
    stop_after_steps: int | None = None,
    step_callback: Callable[[int], None] | None = None,
) -> TrainResult:
    """Trains ``task`` for ``training_config.num_steps`` steps in ``workdir`` (resuming there).

    ``training_config`` fields: ``num_steps``, ``log_every``, ``eval_every`` (0: only at the
    end), ``checkpoint_every``, ``keep_checkpoints``, ``async_checkpoints``,
    ``accumulation_steps``, ``cpu_peak_flops_per_host`` (the MFU denominator on CPU),
    ``progress_bar`` and ``profile_start_step`` / ``profile_num_steps`` (``profiling.py``).
    A record is logged every ``log_every`` steps and at every evaluation, save and stop.

    ``stop_after_steps`` ends this invocation after that many steps *without* a final save (a
    hard kill, for tests); a SIGTERM ends it after saving. ``step_callback(step)`` runs after
    every step (tests use it to deliver signals).

    Raises:
      FloatingPointError: a step had a non-finite loss or gradient (names the step and the
        parameter paths); that update was not applied and nothing after it is saved.
    """
    tc = training_config
    check_training_config(tc)
    check_local_workdir(workdir)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    num_steps = int(tc.num_steps)
    prepared = prepare_step(
        task, optimizer_config=optimizer_config, training_config=tc, mesh=mesh, rules=rules,
        seed=seed,
    )  # fmt: skip
    state, state_shardings, grouped = prepared.state, prepared.shardings, prepared.grouped
    step_fn, step_rng, batch_sharding = prepared.step_fn, prepared.step_rng, prepared.batch_sharding

    checkpointer = checkpoint_lib.TrainingCheckpointer(
        workdir / "checkpoints",
        max_to_keep=int(tc.keep_checkpoints),
        async_save=bool(tc.async_checkpoints),
    )
    base_params_path = ""
    if jax.tree_util.tree_leaves(state.frozen):
        base_params_path = checkpoint_lib.save_base_params(workdir / "base_params", state.frozen)
    metadata = checkpoint_lib.checkpoint_metadata(
        config=dict(task.config), adapter=task.adapter, base_params_path=base_params_path
    )

    stream = task.make_train_stream()
    # The newest step that restores; a damaged newer one is named, logged and moved aside.
    restored = checkpointer.restore_latest_good(
        abstract_trainable=checkpoint_lib.abstract_like(state.trainable),
        abstract_opt_state=checkpoint_lib.abstract_like(state.opt_state),
    )
    start_step = 0
    if restored is not None:
        start_step = restored.step
        frozen = state.frozen
        if restored.metadata["base_params_path"]:
            frozen = checkpoint_lib.load_base_params(
                restored.metadata["base_params_path"], checkpoint_lib.abstract_like(state.frozen)
            )
        state = state.replace(
            step=jax.device_put(jnp.asarray(start_step, jnp.int32), state_shardings.step),
            trainable=restored.trainable,
            frozen=frozen,
            opt_state=restored.opt_state,
        )
        stream.set_state(restored.data_state)
        logging.info("%s: resumed from step %d in %s", task.name, start_step, workdir)

    sizes = grouped.summary(combine_params(state.trainable, state.frozen))
    trainable_params = sum(size.num_params for name, size in sizes.items() if name != FROZEN)
    total_params = trainable_params + sizes[FROZEN].num_params

    peak_flops = mfu_lib.total_peak_flops(jax.devices(), tc.get("cpu_peak_flops_per_host"))

    # Records an interrupted run logged past its last checkpoint are dropped: they are redone.
    writer = MetricWriter(workdir, resume_step=start_step)
    history: list[dict] = []
    progress = None
    if tc.get("progress_bar", True) and start_step < num_steps:
        progress = ProgressBar(num_steps, initial_step=start_step, description=task.name)

    def evaluate(step: int) -> dict:
        if task.evaluate is None:
            return {}
        started = time.perf_counter()
        results = task.evaluate(combine_params(state.trainable, state.frozen))
        record = {f"eval_{k}": float(v) for k, v in results.items()}
        record["eval_seconds"] = time.perf_counter() - started
        logging.info("%s step %d eval: %s", task.name, step, record)
        return record

    def save(step: int, force: bool = False) -> None:
        checkpointer.save(
            step,
            trainable_params=state.trainable,
            opt_state=state.opt_state,
            data_state=stream.get_state(),
            metadata=metadata,
            force=force,
        )

    compiled = None
    flops_per_step = None
    window = LogWindow()
    profiler = StepProfiler.from_config(tc, workdir / "profile")
    preempted = False
    step = start_step
    watcher = PreemptionWatcher()
    log_every = int(tc.log_every)
    eval_every = int(tc.get("eval_every", 0))
    checkpoint_every = int(tc.checkpoint_every)
    try:
        with sharding.mesh_context(mesh, rules):
            while step < num_steps:
                data_started = time.perf_counter()
                host_batch = next(stream)
                counts = batch_counts(host_batch)
                batch = _global_batch(host_batch, batch_sharding)
                data_seconds = time.perf_counter() - data_started
                if compiled is None:
                    compiled = step_fn.lower(state, batch, step_rng).compile()
                    flops_per_step = _flops_of(compiled, mesh.size)
                    window.restart_clock()
                profiler.before_step(step + 1)
                # Dispatch only: nothing here waits for the device (see LogWindow).
                state, metrics = compiled(state, batch, step_rng)
                step += 1
                profiler.after_step(step, metrics["loss"])
                window.add(step, metrics, data_seconds, counts)
                if step_callback is not None:
                    step_callback(step)

                is_last = step == num_steps
                is_eval = is_last or bool(eval_every and step % eval_every == 0)
                is_save = is_last or step % checkpoint_every == 0
                killed = stop_after_steps is not None and step - start_step >= stop_after_steps
                preempt = watcher.stop_at(step)  # every step, on every process
                stopping = preempt or killed
                if killed and not preempt:
                    preempted = True  # a simulated hard kill: no save, no final record
                    break
                record_due = is_eval or is_save or stopping or step == start_step + 1
                if not (record_due or step % log_every == 0):
                    if progress is not None:
                        progress.update(step, history[-1] if history else None)
                    continue
                window.check_finite()
                record = window.record(flops_per_step, peak_flops)
                if is_eval:
                    record |= evaluate(step)
                history.append(record)
                writer.write(step, {k: v for k, v in record.items() if k != "step"})
                if progress is not None:
                    progress.update(step, record)
                if preempt:
                    logging.warning("%s: SIGTERM; saving at step %d and stopping", task.name, step)
                    save(step, force=True)
                    preempted = True
                    break
                if is_save:
                    save(step, force=is_last)
                window.restart_clock()
    finally:
        profiler.close()
        watcher.close()
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()

    if not preempted and history and jax.process_index() == 0:
        plot_curves(history, workdir / "plots")
    final = history[-1] if history else {"step": step}
    summary = {
        "stage": task.name,
        "steps": step,
        "trainable params": trainable_params,
        "total params": total_params,
        "optimizer state bytes": tree_bytes(state.opt_state),
        **{k: v for k, v in final.items() if k != "step"},
    }
    if jax.process_index() == 0:
        print(format_key_values(summary, title=f"{task.name}: summary"), flush=True)
    return TrainResult(
        params=combine_params(state.trainable, state.frozen),
        step=step,
        history=history,
        preempted=preempted,
        trainable_params=trainable_params,
        total_params=total_params,
        checkpoint_dir=checkpointer.directory,
        base_params_path=base_params_path,
    )
