"""Where the LLaVA recipe's stages keep their results: this run's workdir, or a base run's.

Each stage trains in ``<workdir>/<stage>/``. A sweep whose points differ only in later stages
can train the early ones once: with ``config.reuse_stages_from = "<base workdir>"``, the stages
named in ``config.reuse_stages`` (any of ``REUSABLE_STAGES``) are read from the base run's
directories instead, never trained or written here. The base run must have finished them, with
the config fields they depend on (``stage_inputs``) equal to this run's; its seed may differ.
``stage1`` may only be reused together with both stage-0 stages, as it was trained on the base
run's.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from mllm_jax.train import checkpoint as checkpoint_lib

REUSABLE_STAGES = ("stage0_vision", "stage0_lm", "stage1")
REQUIRES = {"stage1": ("stage0_vision", "stage0_lm"), "stage2": ("stage1",)}


def stage_dir(workdir: str | pathlib.Path, name: str) -> pathlib.Path:
    """The directory stage ``name`` trains in under ``workdir``."""
    return pathlib.Path(workdir) / name


def reused_stages(config: Any) -> tuple[str, ...]:
    """The stages taken from ``config.reuse_stages_from`` (none when it is empty).

    Raises:
      ValueError: a stage that cannot be reused, or stage1 without both stage-0 stages.
    """
    if not config.reuse_stages_from:
        return ()
    stages = tuple(config.reuse_stages)
    unknown = [s for s in stages if s not in REUSABLE_STAGES]
    if unknown:
        raise ValueError(f"config.reuse_stages {unknown} cannot be reused; choose from "
                         f"{REUSABLE_STAGES}")  # fmt: skip
    if "stage1" in stages and not set(REQUIRES["stage1"]) <= set(stages):
        raise ValueError(
            f"config.reuse_stages={stages}: stage1 was trained on the base run's stage 0, "
            f"so reusing it needs {REQUIRES['stage1']} reused as well"
        )
    return stages


def results_dir(config: Any, workdir: str | pathlib.Path, name: str) -> pathlib.Path:
    """The directory stage ``name``'s results are read from: the base run's if it is reused."""
    if name in reused_stages(config):
        return stage_dir(config.reuse_stages_from, name)
    return stage_dir(workdir, name)


def final_checkpoint(config: Any, directory: pathlib.Path, name: str) -> pathlib.Path:
    """The trainable params a finished run of stage ``name`` leaves in ``directory``."""
    return directory / "checkpoints" / str(config[name].num_steps) / "trainable"


# The data fields that change what the early stages read (not where the files are).
_DATA_FIELDS = ("image_size", "template", "system_prompt", "max_examples",
                "multi_image_train_size", "tokenizer_vocab_size")  # fmt: skip


def stage_inputs(config: dict, stage: str) -> dict:
    """The fields of ``config`` (as a JSON dict) that decide what ``stage`` trains: its
    section, the shared optimizer, the data it reads and the model parts it builds."""
    # Runs from before model.init_from existed recorded none: "" is the same.
    model = {k: v for k, v in config["model"].items() if k != "init_from" or v}
    inputs = {
        stage: config[stage],
        "optimizer": config["optimizer"],
        "data": {k: config["data"][k] for k in _DATA_FIELDS},
    }
    if stage == "stage0_vision":
        inputs["vision"] = config["vision"]
        inputs["model"] = {k: model[k] for k in ("vocab_size", "dtype", "param_dtype")}
    elif stage == "stage0_lm":
        lm_only = ("adapter", "projector", "fusion")
        inputs["model"] = {k: v for k, v in model.items() if k not in lm_only}
    else:
        inputs |= {"vision": config["vision"], "vce": config["vce"]}
        inputs["model"] = {k: v for k, v in model.items() if k != "adapter"}
    return inputs


def _differences(base: Any, here: Any, prefix: str) -> list[str]:
    if isinstance(base, dict) and isinstance(here, dict):
        return [
            difference
            for key in sorted(set(base) | set(here))
            for difference in _differences(base.get(key), here.get(key), f"{prefix}.{key}")
        ]
    return [] if base == here else [f"{prefix.lstrip('.')}: base {base!r}, here {here!r}"]


def check_reused_stages(config: Any) -> None:
    """Checks that the base run finished each reused stage as this config would train it.

    Raises:
      FileNotFoundError: naming each reused stage without a final checkpoint in the base run,
        or a final checkpoint without its ``metadata`` item (the config that trained it).
      ValueError: naming the config fields a reused stage depends on that differ from the base.
    """
    if not reused_stages(config):
        return
    missing = [
        str(final_checkpoint(config, stage_dir(config.reuse_stages_from, name), name))
        for name in reused_stages(config)
        if not final_checkpoint(config, stage_dir(config.reuse_stages_from, name), name).exists()
    ]
    if missing:
        raise FileNotFoundError(
            f"config.reuse_stages_from={config.reuse_stages_from!r} lacks the final checkpoints "
            f"of the reused stages (looked for {missing}); finish them in the base run "
            "(same config, stage=all) or drop them from config.reuse_stages"
        )
    here = json.loads(config.to_json_best_effort())
    differences = []
    for stage in reused_stages(config):
        step_dir = final_checkpoint(config, stage_dir(config.reuse_stages_from, stage), stage)
        base = checkpoint_lib.read_metadata(step_dir.parent)["config"]
        differences += _differences(stage_inputs(base, stage), stage_inputs(here, stage), "")
    if differences:
        raise ValueError(
            f"config.reuse_stages_from={config.reuse_stages_from!r} trained the reused stages "
            f"with other settings than this config: {sorted(set(differences))}"
        )


def check_predecessors(config: Any, stage: str, workdir: pathlib.Path) -> None:
    """Raises FileNotFoundError naming the earlier stages ``stage`` needs and has not got
    (stage 1 needs none when ``model.init_from`` gives it its tower and LM)."""
    required = REQUIRES.get(stage, ())
    if stage == "stage1" and config.model.get("init_from"):
        required = ()
    directories = {name: results_dir(config, workdir, name) for name in required}
    missing = [
        name
        for name, directory in directories.items()
        if not list((directory / "checkpoints").glob("[0-9]*/trainable"))
    ]
    if missing:
        raise FileNotFoundError(
            f"{stage} starts from the results of {missing}, which have no checkpoint in "
            f"{[str(directories[name].absolute()) for name in missing]}; run "
            f"configs/llava_vce.py:stage={missing[0]} (or stage=all) with this workdir first"
        )
