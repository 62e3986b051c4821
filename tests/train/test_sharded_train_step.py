"""The same forward pass and train step on 1 device and on (8,), (2,4), (2,2,2) meshes agree."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import base
from mllm_jax import sharding
from mllm_jax.recipes import text_lm
from mllm_jax.train.partition import combine_params
from mllm_jax.train.trainer import prepare_step

MESHES = {
    "fsdp8": {"fsdp": 8},
    "data2_tensor4": {"data": 2, "tensor": 4},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
}
BATCH, LENGTH = 8, 16


def _config():
    config = base.get_config("size=test")
    config.model.num_heads = 8
    config.model.num_kv_heads = 4  # divisible by a 4-way tensor axis
    config.training.num_steps = 10
    # Adam divides by sqrt(v) + eps: with eps=1e-8 a gradient that is ~0 up to float32 reduction
    # order becomes a +-lr step, so 1-device and 8-device results could differ by a whole step on
    # such entries. A larger eps keeps the update a smooth function of the gradient.
    config.optimizer.eps = 1e-3
    return config


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, size=(BATCH, LENGTH), dtype=np.int32)
    segment_ids = np.repeat(np.array([[1] * 10 + [2] * 6]), BATCH, axis=0).astype(np.int32)
    positions = np.repeat(np.array([list(range(10)) + list(range(6))]), BATCH, axis=0)
    targets = np.roll(tokens, -1, axis=1)
    loss_mask = np.ones(tokens.shape, np.float32)
    loss_mask[:, [9, 15]] = 0  # last token of each segment predicts nothing
    return {
        "tokens": tokens,
        "targets": targets,
        "loss_mask": loss_mask,
        "segment_ids": segment_ids,
        "positions": positions.astype(np.int32),
    }


def _run(mesh):
    """Forward logits, then one train step; returns host copies of both plus the state."""
    config = _config()
    rules = sharding.logical_rules_from_config(config.mesh.logical_axis_rules)
    task = text_lm.text_lm_task(config, mesh, rules, train_set=None, eval_set=None)
    prepared = prepare_step(
        task, optimizer_config=config.optimizer, training_config=config.training, mesh=mesh,
        rules=rules,
    )  # fmt: skip
    model, state = text_lm.build_model(config.model), prepared.state
    shardings = prepared.shardings
    batch = {k: jax.device_put(v, prepared.batch_sharding) for k, v in _batch().items()}
    train_step = prepared.step_fn
    with sharding.mesh_context(mesh, rules):
        forward = jax.jit(
            lambda p, b: model.apply(
                {"params": p},
                b["tokens"],
                segment_ids=b["segment_ids"],
                positions=b["positions"],
            )
        )
        logits = np.asarray(forward(combine_params(state.trainable, state.frozen), batch))
        # Two steps: the first has learning rate 0 (warmup), the second moves the params.
        state, _ = train_step(state, batch, jax.random.key(1))
        state, metrics = train_step(state, batch, jax.random.key(1))
    params = combine_params(state.trainable, state.frozen)
    return logits, jax.device_get(params), jax.device_get(metrics), state, shardings


@pytest.fixture(scope="module")
def runs(devices):
    """Lazily computed and cached results per mesh name ("single" = one device)."""
    cache = {}

    def get(name):
        if name not in cache:
            if name == "single":
                mesh = sharding.create_mesh({}, devices=devices[:1])
            else:
                mesh = sharding.create_mesh(MESHES[name])
            cache[name] = _run(mesh)
        return cache[name]

    return get


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_forward_and_train_step_match_single_device(runs, mesh_name):
    ref_logits, ref_params, ref_metrics, _, _ = runs("single")
    logits, params, metrics, state, shardings = runs(mesh_name)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), params, ref_params)
    assert max(jax.tree_util.tree_leaves(moved)) < 1e-5
    # The state really lives where the rules table says.
    for path, array in jax.tree_util.tree_flatten_with_path(state.trainable)[0]:
        expected = jax.tree_util.tree_flatten_with_path(shardings.trainable)[0]
        assert array.sharding == dict(expected)[path], jax.tree_util.keystr(path)


def test_params_carry_the_rules_table_shardings(runs):
    _, _, _, state, _ = runs("data2_fsdp2_tensor2")
    wi = state.trainable["decoder"]["layers_0"]["mlp"]["wi_gate"]["kernel"]
    assert wi.sharding.spec == PartitionSpec("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (32 // 2, 64 // 2)
    query = state.trainable["decoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert query.sharding.spec == PartitionSpec("fsdp", "tensor", None)
    embedding = state.trainable["embedder"]["embedding"]
    assert embedding.sharding.spec == PartitionSpec("tensor", "fsdp")
    norm = state.trainable["decoder"]["final_norm"]["scale"]
    assert norm.sharding.spec == PartitionSpec(None)
    # Adam moments follow their params.
    adam = state.opt_state[1].inner_states["all"].inner_state[0]
    mu = adam.mu["decoder"]["layers_0"]["mlp"]["wi_gate"]["kernel"]
    assert mu.sharding.spec == PartitionSpec("fsdp", "tensor")
