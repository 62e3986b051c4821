"""Command line: ``python -m mllm_jax.train --config CONFIG --workdir DIR``.

  --config configs/base.py:size=tiny        the text decoder on the stdlib docstrings
  --config configs/moe_lm.py                the sparse-MoE decoder on the same corpus
  --config configs/llava_vce.py             the LLaVA + VCE + Dual-LoRA recipe (all stages)
  --config configs/llava_vce.py:stage=stage2   one stage of it (see configs/llava_vce.py)
  --config configs/metalm_text.py           METALM causal / prefix / semi-causal, language
  --config configs/metalm_vl.py             the same on easy-VQA (zero-shot and fine-tuned)

Any config field can be overridden, e.g. ``--config.model.num_layers=2``.

Several processes (one per host on a TPU pod; ``tools/launch_local.py`` runs them on one machine)
join through ``jax.distributed``: on a Cloud TPU VM automatically, elsewhere with
``--coordinator_address HOST:PORT --num_processes N --process_id I``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mllm_jax.command_line import run_command

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file (optionally :arg).")
flags.DEFINE_string("workdir", None, "Directory for config.json and metrics.jsonl.")
flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Multi-process runs (jax.distributed): auto = with --coordinator_address, or on a Cloud "
    "TPU VM from its metadata; on = always (JAX's cluster auto-detection); off = one process.",
)
flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0's coordinator (tools/launch_local.py)."
)
flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mllm_jax.train.trainer import check_local_workdir

    try:
        check_local_workdir(FLAGS.workdir)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    import jax

    # Must happen before the first device query initialises the CPU backend.
    if FLAGS.config.mesh.get("num_cpu_devices"):
        jax.config.update("jax_num_cpu_devices", FLAGS.config.mesh.num_cpu_devices)
    from mllm_jax.train import distributed

    distributed.initialize(
        FLAGS.distributed,
        coordinator_address=FLAGS.coordinator_address,
        num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id,
    )
    from mllm_jax.console_logging import quiet_library_logs

    quiet_library_logs()
    logging.info(
        "config %s, workdir %s", config_flags.get_config_filename(FLAGS["config"]), FLAGS.workdir
    )
    if FLAGS.config.get("recipe") == "llava_vce":
        from mllm_jax.recipes.llava_demo import run

        run(FLAGS.config, FLAGS.workdir)
    elif FLAGS.config.get("recipe") == "metalm":
        from mllm_jax.recipes.metalm import run as run_metalm

        run_metalm(FLAGS.config, FLAGS.workdir)
    else:
        from mllm_jax.recipes.text_lm import run as run_text_lm

        run_text_lm(FLAGS.config, FLAGS.workdir)


def run() -> None:
    """The ``mllm-train`` command."""
    run_command(main)


if __name__ == "__main__":
    run()
