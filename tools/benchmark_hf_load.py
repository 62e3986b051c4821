"""Peak host memory of importing a Hugging Face checkpoint, against the checkpoint's size.

  python tools/benchmark_hf_load.py                        # ~1 GB bfloat16 Llama, 8-way FSDP
  python tools/benchmark_hf_load.py --layers 16 --param_dtype bfloat16 --mesh fsdp=4,tensor=2

Writes a synthetic ``LlamaForCausalLM`` checkpoint (random bfloat16 tensors in shards of
``--shard_mb``, a config.json; no torch needed) into a temporary directory, then, in a fresh
process with ``--devices`` CPU devices, imports it with ``load_hf_lm`` onto a mesh and reports
from ``/proc/self/status``: the resident set before the load, its peak (VmHWM) and after. On
CPU the loaded parameters themselves live in host memory, so the figure of merit is the
transient overhead: peak − before − the parameters' bytes, against the checkpoint's bytes. A
loader that materialised the whole checkpoint on the host before placing it would show an
overhead of about one checkpoint (or more); reading box by box keeps it near one tensor.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("hidden", 2048, "Hidden size E.")
flags.DEFINE_integer("layers", 8, "Decoder blocks.")
flags.DEFINE_integer("heads", 16, "Query heads.")
flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
flags.DEFINE_integer("intermediate", 5632, "MLP width F.")
flags.DEFINE_integer("vocab", 32000, "Vocabulary V (untied head).")
flags.DEFINE_integer("shard_mb", 256, "Safetensors shard size of the synthetic checkpoint.")
flags.DEFINE_string("param_dtype", "float32", "Dtype of the loaded params (float32, bfloat16).")
flags.DEFINE_string("mesh", "fsdp=8", "Mesh axes, e.g. fsdp=8 or data=2,fsdp=2,tensor=2.")
flags.DEFINE_integer("devices", 8, "CPU devices of the loading process.")
flags.DEFINE_string("checkpoint_dir", None, "Reuse/keep the synthetic checkpoint here.")
flags.DEFINE_string("json_out", None, "Optional path for the result as JSON.")


def _tensor_shapes() -> dict[str, tuple[int, ...]]:
    e, f, v = FLAGS.hidden, FLAGS.intermediate, FLAGS.vocab
    head_dim = e // FLAGS.heads
    shapes = {
        "model.embed_tokens.weight": (v, e),
        "model.norm.weight": (e,),
        "lm_head.weight": (v, e),
    }
    for i in range(FLAGS.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (FLAGS.heads * head_dim, e),
            p + "self_attn.k_proj.weight": (FLAGS.kv_heads * head_dim, e),
            p + "self_attn.v_proj.weight": (FLAGS.kv_heads * head_dim, e),
            p + "self_attn.o_proj.weight": (e, FLAGS.heads * head_dim),
            p + "mlp.gate_proj.weight": (f, e),
            p + "mlp.up_proj.weight": (f, e),
            p + "mlp.down_proj.weight": (e, f),
            p + "input_layernorm.weight": (e,),
            p + "post_attention_layernorm.weight": (e,),
        }
    return shapes


def _write_checkpoint(directory: pathlib.Path) -> None:
    import ml_dtypes
    import numpy as np

    from mllm_jax.checkpoint_conversion.export_tensors import write_safetensors

    rng = np.random.default_rng(0)

    def tensors():
        for name, shape in _tensor_shapes().items():
            yield name, (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)

    write_safetensors(directory, tensors(), max_shard_bytes=FLAGS.shard_mb << 20)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": FLAGS.hidden,
        "intermediate_size": FLAGS.intermediate,
        "num_hidden_layers": FLAGS.layers,
        "num_attention_heads": FLAGS.heads,
        "num_key_value_heads": FLAGS.kv_heads,
        "vocab_size": FLAGS.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config))


# Run in a fresh interpreter so that the resident set measures the load alone.
_LOADER = r"""
import json, os, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)
import jax, jax.numpy as jnp
from configs.base import LOGICAL_AXIS_RULES
from mllm_jax.checkpoint_conversion.hf_lm import load_hf_lm
from mllm_jax.checkpoint_conversion.safetensors_files import SafetensorsDirectory
from mllm_jax.sharding import create_mesh, logical_rules_from_config
directory, mesh_spec, param_dtype = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
mesh = create_mesh(mesh_spec)
jnp.zeros(()).block_until_ready()
before = status("VmRSS")
rules = logical_rules_from_config(LOGICAL_AXIS_RULES)
model, params = load_hf_lm(directory, mesh=mesh, rules=rules, param_dtype=getattr(jnp, param_dtype))
jax.block_until_ready(params)
leaves = jax.tree_util.tree_leaves(params)
print(json.dumps(dict(
    before=before, peak=status("VmHWM"), after=status("VmRSS"),
    param_bytes=sum(x.nbytes for x in leaves),
    checkpoint_bytes=SafetensorsDirectory(directory).nbytes(),
    largest_tensor_bytes=max(x.nbytes for x in leaves) // len(jax.devices()),
    devices=len(jax.devices()),
)))
"""


def _mesh_spec(text: str) -> dict[str, int]:
    spec = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        spec[name.strip()] = int(size)
    return spec


def main(argv) -> None:
    del argv
    root = pathlib.Path(__file__).resolve().parent.parent
    keep = FLAGS.checkpoint_dir is not None
    directory = pathlib.Path(FLAGS.checkpoint_dir or tempfile.mkdtemp(prefix="hf_load_"))
    if not (directory / "config.json").is_file():
        print(f"writing a synthetic checkpoint to {directory} ...", flush=True)
        _write_checkpoint(directory)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(root))
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={FLAGS.devices}"
    command = [sys.executable, "-c", _LOADER, str(directory), json.dumps(_mesh_spec(FLAGS.mesh))]
    out = subprocess.run(
        command + [FLAGS.param_dtype], env=env, cwd=root, capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"loader failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gib = 1 << 30
    overhead = result["peak"] - result["before"] - result["param_bytes"]
    result |= dict(mesh=FLAGS.mesh, param_dtype=FLAGS.param_dtype, overhead=overhead)
    print(f"| checkpoint | {result['checkpoint_bytes'] / gib:.2f} GiB (bfloat16) |")
    print(
        f"| params on {result['devices']} CPU devices ({FLAGS.mesh}, {FLAGS.param_dtype}) | "
        f"{result['param_bytes'] / gib:.2f} GiB |"
    )
    print(
        f"| RSS before / peak / after | {result['before'] / gib:.2f} / "
        f"{result['peak'] / gib:.2f} / {result['after'] / gib:.2f} GiB |"
    )
    print(
        f"| transient overhead (peak - before - params) | {overhead / gib:.3f} GiB = "
        f"{overhead / result['checkpoint_bytes']:.1%} of the checkpoint |"
    )
    if FLAGS.json_out:
        pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=2))
    if not keep:
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


if __name__ == "__main__":
    app.run(main)
