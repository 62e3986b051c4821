"""tools/aot_compile.py compiles the real train step of every config kind for TPU topologies on
this CPU host, and the real-scale configs it is meant for have their stated sizes.

Compiles run in subprocesses: the TPU environment must be set before jax starts, and this
session's jax is already on 8 fake CPU devices. They are skipped where libtpu is not installed.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import metalm_1b3, moe_lm
from mllm_jax.aot import count_collectives, matmul_flops
from mllm_jax.models.semi_causal_lm import SemiCausalLM
from mllm_jax.recipes import metalm, text_lm
from mllm_jax.sharding import strip_boxes

REPO = pathlib.Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="needs libtpu (mllm_jax[tpu])"
)


def _compile(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "tools/aot_compile.py", "--json_out", str(out), *args]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done, (json.loads(out.read_text()) if out.exists() else None)


@needs_libtpu
def test_text_lm_step_compiles_for_v5e_2x2_and_reports_memory_flops_collectives(tmp_path):
    done, report = _compile(tmp_path, "--config", "configs/base.py:size=test", "--topology",
                            "v5e:2x2")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["num_devices"] == 4 and report["device_kind"] == "TPU v5 lite"
    assert report["mesh"]["data"] == 4
    assert report["hbm_bytes"] == 16 * 1024**3
    # The donated state aliases its outputs; arguments hold params + Adam moments (3 x 27040
    # float32 replicated, plus the batch), so at least 3 x 27040 x 4 bytes.
    assert report["argument_bytes"] >= 3 * report["num_params"] * 4
    assert report["alias_bytes"] > 0 and report["flops_per_device"] > 0
    assert report["collectives"]["all-reduce"] >= 1  # data-parallel gradient reduction
    assert "fits" in done.stdout


@needs_libtpu
def test_two_slices_with_fsdp_and_an_expert_parallel_moe_compile(tmp_path):
    done, report = _compile(
        tmp_path, "--config", "configs/moe_lm.py:size=test,mode=capacity,ep=2",
        "--topology", "v5e:2x2", "--num_slices", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["num_devices"] == 8 and report["mesh"]["expert"] == 2
    assert report["mesh"]["data"] == 4  # 2 over DCN x 2 over ICI
    assert report["collectives"]["all-to-all"] > 0  # tokens move to their experts


@needs_libtpu
def test_a_step_that_does_not_fit_exits_non_zero_naming_the_memory(tmp_path):
    done, report = _compile(
        tmp_path, "--config", "configs/base.py:size=test", "--topology", "v5e:2x2",
        "--config.data.batch_size=4096", "--config.data.seq_len=2048",
        "--config.model.vocab_size=65536",
    )  # fmt: skip
    assert done.returncode == 1
    assert "does not fit in HBM on v5e:2x2" in done.stderr and "shard more" in done.stderr
    assert "Traceback" not in done.stderr and report is None


@needs_libtpu
def test_llava_stage2_with_dual_lora_compiles_for_two_v5e_slices(tmp_path):
    done, report = _compile(
        tmp_path, "--config", "configs/llava_vce.py:size=test,stage=stage2",
        "--topology", "v5e:2x2", "--num_slices", "2",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["task"] == "stage2" and report["num_devices"] == 8
    assert report["mesh"]["data"] == 8  # 2 slices over DCN x 4 chips
    # Only the projector (VCE) and the Dual-LoRA adapters train; tower and LM are frozen.
    assert 0 < report["num_trainable_params"] < report["num_params"] // 2
    assert report["collectives"]["all-reduce"] >= 1  # the trainable gradients, over all 8


@needs_libtpu
def test_metalm_semi_causal_step_compiles_for_v5e_2x2(tmp_path):
    done, report = _compile(
        tmp_path, "--config", "configs/metalm_text.py:size=test", "--topology", "v5e:2x2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["task"] == "text_semi_causal" and report["mesh"]["data"] == 4
    assert report["num_trainable_params"] == report["num_params"]
    assert report["flops_per_device"] > 0 and report["collectives"]["all-reduce"] >= 1


def test_collectives_are_counted_once_per_op_whatever_their_shape():
    hlo = """
  %all-reduce.9 = (f32[], f32[16]{0}) all-reduce(f32[] %a, f32[16]{0} %b), to_apply=%add
  %ag = f32[8]{0} all-gather-start(f32[2]{0} %x), dimensions={0}
  %done = f32[8]{0} all-gather-done(f32[8]{0} %all-gather-start.1)
  %fusion.2 = f32[16]{0} fusion(f32[16]{0} %all-reduce.9), calls=%fused_all-reduce
"""
    counts = count_collectives(hlo)
    assert counts["all-reduce"] == 1 and counts["all-gather"] == 1
    assert counts["all-to-all"] == counts["reduce-scatter"] == 0


def test_matmul_flops_count_every_scanned_layer_and_its_rematerialised_forward():
    batch, width, layers = 4, 8, 3

    def loss(kernels, x):
        layer = jax.checkpoint(lambda carry, kernel: (jnp.tanh(carry @ kernel), None))
        return jnp.sum(jax.lax.scan(layer, x, kernels)[0])

    grad = jax.jit(jax.grad(loss))
    jaxpr = jax.make_jaxpr(grad)(jnp.zeros((layers, width, width)), jnp.zeros((batch, width)))
    # Per layer: the forward product, its recomputation, and the backward's two (dx, dkernel).
    assert matmul_flops(jaxpr) == layers * 4 * (2 * batch * width * width)


def _param_count(model, *args, **kwargs) -> int:
    params = jax.eval_shape(lambda r: model.init(r, *args, **kwargs)["params"], jax.random.key(0))
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(strip_boxes(params)))


def test_mixtral_8x7b_config_has_mixtrals_46_7b_params_with_experts_sharded_8_ways():
    config = moe_lm.get_config("size=mixtral_8x7b")
    tokens = jnp.zeros((1, 8), jnp.int32)
    model = text_lm.build_model(config.model)
    assert _param_count(model, tokens, segment_ids=tokens, positions=tokens) == 46_702_792_704
    assert config.model.moe.mode == "capacity" and config.mesh.ici_parallelism.expert == 8


def test_metalm_1b3_config_has_a_1_3b_decoder_and_a_0_37b_encoder():
    config = metalm_1b3.get_config()
    tokens = jnp.zeros((1, 8), jnp.int32)
    model = SemiCausalLM(metalm.model_config(config, "semi_causal"))
    params = jax.eval_shape(
        lambda r: model.init(r, tokens, segment_ids=tokens, positions=tokens, span_ids=tokens),
        jax.random.key(0),
    )["params"]
    sizes = {k: sum(x.size for x in jax.tree_util.tree_leaves(strip_boxes(v)))
             for k, v in params.items()}  # fmt: skip
    assert sizes["lm"] == 1_339_131_904
    assert sizes["encoder"] + sizes["encoder_embedder"] == 367_576_064
    assert sum(sizes.values()) == 1_708_807_168
