"""Orbax checkpoints of the trainable adapters, their optimizer state and the data iterator.

A training checkpoint holds exactly four items per step, and never a frozen base weight:

  ``trainable``  the trainable params (adapters), arrays, via ``StandardSave``;
  ``opt_state``  the optimizer state of those params, arrays, via ``StandardSave``;
  ``data``       the data iterator's JSON-able state (``BatchStream.get_state()``);
  ``metadata``   JSON: the run config, the adapter spec and the path of the base weights.

The frozen base weights are written once per run by ``save_base_params`` and referenced from
``metadata["base_params_path"]``.

Atomicity is Orbax's: a step is written into a temporary directory and renamed to its final name
only after every item (and every host) has finished, so a save interrupted by preemption leaves
no half checkpoint that ``latest_step`` or ``restore`` could see. A step damaged after it was
written (a file emptied or overwritten, an item deleted) is what ``restore_latest_good`` is
for: it falls back to the newest step that restores, naming what was wrong with the others.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from mllm_jax.layers.lora import AdapterConfig

REQUIRED_METADATA_KEYS: tuple[str, ...] = ("config", "adapter", "base_params_path")
ITEMS: tuple[str, ...] = ("trainable", "opt_state", "data", "metadata")


def checkpoint_metadata(
    *, config: dict, adapter: AdapterConfig, base_params_path: str | pathlib.Path
) -> dict:
    """The ``metadata`` item of a training checkpoint: config, adapter spec, base-weights path."""
    names = ("kind", "rank", "alpha", "targets")
    if adapter.kind == "lora_moe":
        names += ("num_experts", "top_k")
    spec = {name: getattr(adapter, name) for name in names}
    spec["targets"] = list(spec["targets"])
    return {"config": config, "adapter": spec, "base_params_path": str(base_params_path)}


def read_metadata(step_dir: str | pathlib.Path) -> dict:
    """The ``metadata`` item of one committed step, ``<checkpoints>/<step>``: the config that
    trained it, the adapter spec and the base-weights path. Reads no array.

    Raises:
      FileNotFoundError: naming ``step_dir`` when it has no ``metadata`` item.
    """
    path = pathlib.Path(step_dir).absolute() / "metadata"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: {step_dir} is not a committed training step")
    return ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path)


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What ``TrainingCheckpointer.restore_latest_good`` read, and from which step."""

    step: int
    trainable: Any
    opt_state: Any
    data_state: dict
    metadata: dict


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


class TrainingCheckpointer:
    """Saves and restores training checkpoints under ``directory/<step>/``.

    Keeps the newest ``max_to_keep`` steps. With ``async_save`` the device-to-host copy happens
    in ``save`` and the file writes in a background thread; call ``wait_until_finished`` before
    reading the files and ``close`` before exiting.
    """

    def __init__(
        self, directory: str | pathlib.Path, *, max_to_keep: int = 3, async_save: bool = True
    ):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_names=ITEMS,
        )

    def save(
        self,
        step: int,
        *,
        trainable_params: Any,
        opt_state: Any,
        data_state: dict,
        metadata: dict,
        force: bool = False,
    ) -> bool:
        """Writes step ``step``; returns whether a save was started.

        ``metadata`` must carry ``REQUIRED_METADATA_KEYS`` (see ``checkpoint_metadata``).
        ``force`` overrides the manager's save policy (it does not overwrite an existing step).
        """
        missing = [k for k in REQUIRED_METADATA_KEYS if k not in metadata]
        if missing:
            raise ValueError(
                f"checkpoint metadata lacks {missing}; build it with checkpoint_metadata"
            )
        args = ocp.args.Composite(
            trainable=ocp.args.StandardSave(trainable_params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state),
            metadata=ocp.args.JsonSave(metadata),
        )
        return self._manager.save(int(step), args=args, force=force)

    def latest_step(self) -> int | None:
        """The newest fully committed step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every committed step still on disk, ascending."""
        return sorted(self._manager.all_steps())

    def restore(
        self, step: int | None = None, *, abstract_trainable: Any, abstract_opt_state: Any
    ) -> tuple[Any, Any, dict, dict]:
        """(trainable, opt_state, data_state, metadata) of ``step`` (default: the latest).

        The abstract trees (``jax.ShapeDtypeStruct``s, e.g. from ``jax.eval_shape``) give the
        structure, dtypes and, through their ``sharding``, where each array is placed: restoring
        onto a mesh other than the one that saved re-shards on read.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no committed checkpoint under {self.directory}")
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                trainable=ocp.args.StandardRestore(abstract_trainable),
                opt_state=ocp.args.StandardRestore(abstract_opt_state),
                data=ocp.args.JsonRestore(),
                metadata=ocp.args.JsonRestore(),
            ),
        )
        return restored["trainable"], restored["opt_state"], restored["data"], restored["metadata"]

    def restore_latest_good(
        self,
        *,
        abstract_trainable: Any,
        abstract_opt_state: Any,
        check: Callable[[RestoredCheckpoint], None] | None = None,
    ) -> RestoredCheckpoint | None:
        """The newest step that restores in full, trying the committed steps newest first;
        None when there is none.

        A step that fails to restore (a file emptied, truncated or overwritten, an item
        deleted), or whose restored content ``check`` rejects by raising (e.g. the data
        iterator refusing its saved state), is logged with what was wrong. Once an older step
        restores, each newer one that failed is moved aside to ``<directory>/unusable-<step>``
        (kept for inspection), so the run can save that step again.

        Raises:
          RuntimeError: every step fails (nothing is moved), naming each step and its problem.
            The cause is then rarely damage: typically a model or optimizer that differs from
            the one that saved (e.g. a changed config in the same workdir).
        """
        failed: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                missing = [
                    item for item in ITEMS if not (self.directory / str(step) / item).is_dir()
                ]
                if missing:
                    raise FileNotFoundError(f"its item(s) {missing} are missing")
                restored = RestoredCheckpoint(
                    step,
                    *self.restore(
                        step,
                        abstract_trainable=abstract_trainable,
                        abstract_opt_state=abstract_opt_state,
                    ),
                )
                if check is not None:
                    check(restored)
            # Orbax, TensorStore and JSON raise many kinds for damaged files; each is reported.
            except Exception as err:  # noqa: BLE001
                failed.append((step, _first_line(err)))
                logging.warning(
                    "checkpoint step %d in %s cannot be restored (%s); trying an older step",
                    step,
                    self.directory,
                    failed[-1][1],
                )
                continue
            if failed:
                self._move_aside([bad for bad, _ in failed])
                logging.warning(
                    "restored step %d in %s instead of the newest, unusable step(s) %s; they "
                    "were moved to %s/unusable-<step>",
                    step,
                    self.directory,
                    [bad for bad, _ in failed],
                    self.directory,
                )
            return restored
        if failed:
            problems = "; ".join(f"step {bad}: {problem}" for bad, problem in failed)
            raise RuntimeError(
                f"no checkpoint under {self.directory} can be restored ({problems}). If the "
                "model, its trainable params or the optimizer changed since they were saved, "
                "train in a new workdir; if the files are damaged, move the directory away to "
                "start over"
            )
        return None

    def _move_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"unusable-{step}"
                suffix = 0
                while target.exists():
                    suffix += 1
                    target = self.directory / f"unusable-{step}-{suffix}"
                (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mllm_jax checkpoint moved aside")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        """Blocks until a pending asynchronous save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager's resources."""
        self._manager.close()

    def __enter__(self) -> TrainingCheckpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _params_metadata(path: pathlib.Path, what: str) -> Any:
    """The Orbax metadata tree of the params checkpoint at ``path``; FileNotFoundError or
    ValueError naming ``what`` and ``path`` when it is missing or unreadable."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        metadata = ocp.StandardCheckpointer().metadata(path)
    except Exception as err:  # noqa: BLE001 - Orbax raises many kinds for a damaged directory
        raise ValueError(f"{what} {path} cannot be read ({_first_line(err)})") from err
    if metadata is None or getattr(metadata, "item_metadata", None) is None:
        raise ValueError(f"{what} {path} holds no params checkpoint (no Orbax metadata)")
    return metadata.item_metadata.tree


def _shape_table(tree: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {k: (tuple(v.shape), np.dtype(v.dtype).name) for k, v in flat.items()}


def save_base_params(directory: str | pathlib.Path, frozen_params: dict) -> str:
    """Writes the frozen base weights (a nested dict) once to ``directory``; returns its path.

    If ``directory`` already holds base weights, nothing is written, but their shapes and dtypes
    must equal ``frozen_params``'s (a ValueError names every difference), so a run never pairs
    its adapters with a different base model. A save interrupted midway leaves only Orbax's
    temporary directory, never ``directory`` itself.
    """
    path = pathlib.Path(directory).absolute()
    if path.exists():
        try:
            on_disk = _params_metadata(path, "the base params directory")
        except ValueError as err:
            raise ValueError(
                f"{err}; it holds the frozen weights, which a run writes again from its init "
                "and pretrained weights: delete it and rerun"
            ) from err
        found, wanted = _shape_table(on_disk), _shape_table(frozen_params)
        differences = [
            f"{k}: on disk {found.get(k)}, given {wanted.get(k)}"
            for k in sorted(set(found) | set(wanted))
            if found.get(k) != wanted.get(k)
        ]
        if differences:
            raise ValueError(
                f"base params at {path} differ from the given frozen params "
                f"({len(differences)} paths): " + "; ".join(differences[:10])
            )
        return str(path)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path, frozen_params)
    checkpointer.wait_until_finished()
    return str(path)


def load_base_params(path: str | pathlib.Path, abstract: Any) -> Any:
    """The base weights at ``path``, placed as ``abstract``'s ``ShapeDtypeStruct``s say.

    Raises:
      FileNotFoundError / ValueError: naming ``path`` when it is missing or unreadable.
    """
    path = pathlib.Path(path).absolute()
    _params_metadata(path, "the frozen base params (a checkpoint's base_params_path)")
    return ocp.StandardCheckpointer().restore(path, abstract)


def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct``s of ``tree``'s arrays, with ``shardings`` (a same-shaped tree) if
    given, else each array's own sharding."""
    if shardings is None:
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def read_params(
    path: str | pathlib.Path, shardings: Mapping[str, jax.sharding.Sharding] | None = None
) -> dict:
    """A params checkpoint (``save_base_params``, or a step's ``trainable`` item) read onto the
    first local device, whatever mesh wrote it; callers re-place it (``pretrained.overlay``).
    ``shardings`` ("/"-joined path -> sharding) reads each array straight onto its sharding."""
    path = pathlib.Path(path).absolute()
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    flat = traverse_util.flatten_dict(_params_metadata(path, "the params checkpoint"), sep="/")
    abstract = {
        name: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=(shardings or {}).get(name, device))
        for name, m in flat.items()
    }
    return checkpointer.restore(path, traverse_util.unflatten_dict(abstract, sep="/"))


def load_trainable_params(
    workdir: str | pathlib.Path, shardings: Mapping[str, jax.sharding.Sharding] | None = None
) -> dict:
    """The trainable params of the latest checkpoint a training run left in ``workdir`` (no
    base weights: a caller that holds them already, e.g. an imported model, adds them), read
    as ``read_params`` reads them.

    Raises:
      FileNotFoundError: naming ``workdir`` when it holds no committed checkpoint.
    """
    workdir = pathlib.Path(workdir).absolute()
    checkpoints = workdir / "checkpoints"
    steps = sorted(
        int(p.name)
        for p in (checkpoints.glob("*") if checkpoints.exists() else [])
        if p.name.isdigit() and (p / "trainable").exists()
    )
    if not steps:
        raise FileNotFoundError(f"no training checkpoint under {checkpoints}; run that stage first")
    return read_params(checkpoints / str(steps[-1]) / "trainable", shardings)


def load_trained_params(workdir: str | pathlib.Path) -> dict:
    """The full params a finished training run left in ``workdir``: its base weights (if any
    were frozen) combined with the trainable params of its latest checkpoint.

    Raises:
      FileNotFoundError: naming ``workdir`` when it holds no committed checkpoint, or its
        ``base_params/`` when the run froze weights there and the directory is gone.
    """
    workdir = pathlib.Path(workdir).absolute()
    flat = traverse_util.flatten_dict(load_trainable_params(workdir))
    base = workdir / "base_params"
    if base.exists() or _trained_with_base_params(workdir):
        flat |= traverse_util.flatten_dict(read_params(_checked_base_dir(base, workdir)))
    return traverse_util.unflatten_dict(flat)


def _trained_with_base_params(workdir: pathlib.Path) -> bool:
    """Whether the latest step's metadata says the run froze base weights."""
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())
    for step in reversed(steps):
        try:
            return bool(read_metadata(workdir / "checkpoints" / str(step))["base_params_path"])
        except (FileNotFoundError, ValueError, KeyError):
            continue
    return False


def _checked_base_dir(base: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    if not base.is_dir():
        raise FileNotFoundError(
            f"{base} is missing, but the run in {workdir} froze base weights there: its "
            "checkpoints hold the trainable params only. Restore that directory, or rerun the "
            f"stage in {workdir} (a resumed run writes it again)"
        )
    return base
