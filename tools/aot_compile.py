"""Compiles a config's real train step for a TPU topology on this host (no TPU needed).

  python tools/aot_compile.py --config configs/base.py:size=small --topology v5e:4x4
  python tools/aot_compile.py --config configs/moe_lm.py:ep=4 --topology v4:2x2x2 --num_slices 2
  python tools/aot_compile.py --config configs/base.py --topology v5e:16x16 \
      --config.model.dtype=bfloat16 --config.mesh.ici_parallelism.data=1 \
      --config.mesh.ici_parallelism.fsdp=-1
  python tools/aot_compile.py --config configs/llava15_7b.py --topology v5e:16x16   # stage 2
  python tools/aot_compile.py --config configs/moe_lm.py:size=mixtral_8x7b --topology v5p:4x4x4
  python tools/aot_compile.py --config configs/metalm_1b3.py --topology v5e:4x4

Every training config compiles: the text / MoE LM, the LLaVA recipe (its ``stage``: stage1 or
stage2, ``all`` compiles stage2) and METALM (semi_causal, text or vision-language pretraining);
see ``mllm_jax/aot.py``. Prints per-device argument / output / temporary bytes against the
chip's HBM, the step's FLOPs, the collectives in the compiled HLO and the compile time; exits 1
with a message when the step does not fit. Needs libtpu (``pip install 'mllm_jax[tpu]'``).
"""

import json
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ from anywhere

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config (path[:arg]).")
flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:4x4, v4:4x4x4, v5p:8x8x8.")
flags.DEFINE_integer("num_slices", 1, "Slices joined over DCN (data parallel across them).")
flags.DEFINE_string("json_out", None, "Optional path for the report as JSON.")
flags.mark_flags_as_required(["config", "topology"])
SHRINK_ADVICE = (
    "shard more (--config.mesh.ici_parallelism.fsdp=...), rematerialise "
    "(configs/base.py:remat=...), use bfloat16 or a smaller batch"
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from mllm_jax import aot

    aot.set_tpu_environment(FLAGS.topology)
    import dataclasses

    try:
        report = aot.compile_train_step(FLAGS.config, FLAGS.topology, FLAGS.num_slices)
    except aot.StepDoesNotFitError as error:
        sys.exit(f"error: {error}; {SHRINK_ADVICE}")
    print(report.format(), flush=True)
    if FLAGS.json_out:
        payload = dataclasses.asdict(report) | {"peak_bytes": report.peak_bytes}
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(payload, indent=2) + "\n")
    if not report.fits:
        sys.exit(
            f"error: the step needs {report.peak_bytes / aot.GIB:.2f} GiB per device but a "
            f"{report.device_kind} has {report.hbm_bytes / aot.GIB:.1f} GiB; {SHRINK_ADVICE}"
        )


if __name__ == "__main__":
    app.run(main)
