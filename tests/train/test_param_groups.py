"""Param groups: per-group learning rates, frozen params outside the optimizer, exact gradient
accumulation, the non-finite guard, and bfloat16 compute over float32 params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import ADAPTER_PARAM_REGEX
from mllm_jax.layers.transformer import TransformerConfig
from mllm_jax.models import DecoderLM
from mllm_jax.train.losses import cross_entropy_loss
from mllm_jax.train.param_groups import FROZEN, ParamGroup, make_grouped_optimizer, tree_bytes
from mllm_jax.train.state import GroupedTrainState
from mllm_jax.train.step import check_finite, make_grouped_train_step

VOCAB, BATCH, LENGTH = 32, 8, 12


def _optimizer_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            learning_rate=1e-3,
            warmup_steps=0,
            end_learning_rate_fraction=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.0,
            grad_clip_norm=1e6,
        )
    )
    config.update(overrides)
    return config


def _model(adapter_kind="none", dtype=jnp.float32):
    transformer = TransformerConfig(
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        mlp_dim=32,
        dtype=dtype,
        adapter=AdapterConfig(kind=adapter_kind, rank=2, dropout=0.0),
    )
    return DecoderLM(vocab_size=VOCAB, embed_dim=16, transformer=transformer)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(BATCH, LENGTH), dtype=np.int32)
    # Rows train on different numbers of targets, so averaging per-micro-batch means would be
    # wrong: only sums divided once by the total count equal the whole-batch step.
    loss_mask = (np.arange(LENGTH)[None, :] < np.arange(2, 2 + BATCH)[:, None]).astype(np.float32)
    return {
        "tokens": jnp.asarray(tokens),
        "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
        "loss_mask": jnp.asarray(loss_mask),
    }


def _loss_fn(model):
    def loss_fn(params, batch, rng):
        del rng
        logits = model.apply({"params": params}, batch["tokens"])
        return cross_entropy_loss(logits, batch["targets"], batch["loss_mask"])

    return loss_fn


def _init(model, seed=0):
    boxed = model.init(jax.random.key(seed), jnp.zeros((1, LENGTH), jnp.int32))["params"]
    params = nn.meta.unbox(boxed)
    # lora_b starts at zero, which would make every lora_a gradient zero; perturb it so both
    # adapter matrices move.
    flat = traverse_util.flatten_dict(params, sep="/")
    for index, path in enumerate(sorted(flat)):
        if path.endswith("lora_b"):
            noise = jax.random.normal(jax.random.key(100 + index), flat[path].shape)
            flat[path] = 0.1 * noise
    return traverse_util.unflatten_dict(flat, sep="/")


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


TWO_GROUPS = (
    ParamGroup(name="embed", patterns=(r"^embedder/",), learning_rate=1e-2),
    ParamGroup(name="attention", patterns=(r"/attention/",), learning_rate=1e-4),
)


def test_each_group_moves_by_its_own_learning_rate_and_frozen_params_stay_bit_identical():
    model = _model()
    params = _init(model)
    grouped = make_grouped_optimizer(_optimizer_config(), TWO_GROUPS, num_steps=10)
    state = GroupedTrainState.create(params, grouped)
    step = jax.jit(make_grouped_train_step(_loss_fn(model), grouped))
    new_state, metrics = step(state, _batch(), jax.random.key(0))

    assert float(metrics["learning_rate/embed"]) == pytest.approx(1e-2)
    assert float(metrics["learning_rate/attention"]) == pytest.approx(1e-4)
    before, after = _flat(params), _flat(grouped.combine(new_state.trainable, new_state.frozen))
    moved = {"embed": 0.0, "attention": 0.0}
    for path, old in before.items():
        delta = np.abs(after[path] - old)
        if path.startswith("embedder/"):
            lr, group = 1e-2, "embed"
        elif "/attention/" in path:
            lr, group = 1e-4, "attention"
        else:
            np.testing.assert_array_equal(after[path], old, err_msg=path)
            continue
        # Adam's first step is lr * g / (|g| + eps): at most lr, and ~lr wherever |g| >> eps
        # (up to the float32 rounding of p - update, ~1e-4 of lr here).
        assert delta.max() <= lr * (1 + 1e-3), path
        moved[group] = max(moved[group], float(delta.max()))
    assert moved["embed"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["attention"] == pytest.approx(1e-4, rel=1e-3)


def test_optimizer_state_holds_two_moments_of_the_trainable_params_only():
    model = _model()
    params = _init(model)
    grouped = make_grouped_optimizer(_optimizer_config(), TWO_GROUPS, num_steps=10)
    trainable, frozen = grouped.split(params)
    opt_state = grouped.init(trainable)

    summary = grouped.summary(params)
    trainable_bytes = tree_bytes(trainable)
    assert summary["embed"].num_bytes + summary["attention"].num_bytes == trainable_bytes
    assert summary[FROZEN].num_bytes == tree_bytes(frozen) > 0
    assert summary["embed"].num_params == VOCAB * 16
    # Per group: Adam's mu and nu over its params, plus an int32 step count for Adam and one
    # for the schedule.
    counters = 2 * len(TWO_GROUPS) * 4
    assert tree_bytes(opt_state) == 2 * trainable_bytes + counters
    frozen_shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(frozen)}
    moment_leaves = [x for x in jax.tree_util.tree_leaves(opt_state) if x.ndim > 0]
    assert len(moment_leaves) == 2 * len(jax.tree_util.tree_leaves(trainable))
    assert {x.shape for x in moment_leaves} <= {
        x.shape for x in jax.tree_util.tree_leaves(trainable)
    }
    assert frozen_shapes - {x.shape for x in moment_leaves}  # some frozen shapes have no moments


def test_a_param_in_two_groups_is_an_error_naming_it():
    params = _init(_model())
    groups = TWO_GROUPS + (
        ParamGroup(name="queries", patterns=(r"layers_0/attention/query",), learning_rate=1e-3),
    )
    grouped = make_grouped_optimizer(_optimizer_config(), groups, num_steps=10)
    with pytest.raises(
        ValueError, match=r"layers_0/attention/query/kernel.*'attention', 'queries'"
    ):
        grouped.split(params)


def test_a_group_matching_no_param_is_an_error():
    params = _init(_model())
    groups = TWO_GROUPS + (ParamGroup(name="typo", patterns=(r"atention",), learning_rate=1e-3),)
    grouped = make_grouped_optimizer(_optimizer_config(), groups, num_steps=10)
    with pytest.raises(ValueError, match=r"\['typo'\] match no parameter"):
        grouped.split(params)


def test_duplicate_group_names_are_rejected():
    groups = (TWO_GROUPS[0], ParamGroup(name="embed", patterns=("x",), learning_rate=1.0))
    with pytest.raises(ValueError, match="unique"):
        make_grouped_optimizer(_optimizer_config(), groups, num_steps=10)


def _adapter_optimizer():
    adapters = ParamGroup(name="adapters", patterns=(ADAPTER_PARAM_REGEX,), learning_rate=1e-2)
    # eps comparable to the gradients keeps Adam's update a smooth function of them, so float
    # reordering between the two ways of summing cannot flip a near-zero entry to +-lr.
    config = _optimizer_config(eps=1e-3, weight_decay=0.1)
    return make_grouped_optimizer(config, (adapters,), num_steps=10)


def test_four_micro_batches_equal_one_big_batch_step_on_lora_adapters():
    model = _model("lora")
    grouped = _adapter_optimizer()
    state = GroupedTrainState.create(_init(model), grouped)
    assert all("lora" in path for path in _flat(state.trainable))
    batch, rng = _batch(), jax.random.key(0)

    whole_state, whole = jax.jit(make_grouped_train_step(_loss_fn(model), grouped))(
        state, batch, rng
    )
    micro_state, micro = jax.jit(make_grouped_train_step(_loss_fn(model), grouped, 4))(
        state, batch, rng
    )

    assert (
        float(micro["num_targets"])
        == float(whole["num_targets"])
        == float(batch["loss_mask"].sum())
    )
    np.testing.assert_allclose(float(micro["loss"]), float(whole["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(micro["grad_norm"]), float(whole["grad_norm"]), rtol=1e-5)
    moved = 0.0
    # atol: entries near zero differ by float32 reordering of the gradient sums, ~1e-5 of lr.
    for path, value in _flat(whole_state.trainable).items():
        np.testing.assert_allclose(
            _flat(micro_state.trainable)[path], value, rtol=1e-5, atol=1e-6, err_msg=path
        )
        moved = max(moved, float(np.abs(value - _flat(state.trainable)[path]).max()))
    assert moved > 1e-3  # the step did update the adapters
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max()),
        micro_state.opt_state,
        whole_state.opt_state,
    )


def test_accumulation_rejects_a_batch_not_divisible_into_micro_batches():
    model = _model("lora")
    grouped = _adapter_optimizer()
    state = GroupedTrainState.create(_init(model), grouped)
    with pytest.raises(ValueError, match="not divisible by accumulation_steps=3"):
        make_grouped_train_step(_loss_fn(model), grouped, 3)(state, _batch(), jax.random.key(0))


def test_nan_in_one_adapter_is_reported_by_path_and_step_and_not_applied():
    model = _model("lora")
    grouped = _adapter_optimizer()
    step = jax.jit(make_grouped_train_step(_loss_fn(model), grouped))
    state, _ = step(GroupedTrainState.create(_init(model), grouped), _batch(), jax.random.key(0))
    bad_path = "decoder/layers_0/attention/value/lora_a"
    flat = _flat(state.trainable)
    flat[bad_path] = flat[bad_path].copy()
    flat[bad_path][0, 0] = np.nan
    bad_state = state.replace(trainable=traverse_util.unflatten_dict(flat, sep="/"))

    after, metrics = step(bad_state, _batch(), jax.random.key(0))

    assert not bool(metrics["finite"])
    with pytest.raises(FloatingPointError, match=rf"^step 1: non-finite .*'{bad_path}'"):
        check_finite(metrics, int(bad_state.step))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(bad_state)
    assert treedef == jax.tree_util.tree_structure(after)
    for (path, value), new in zip(leaves, jax.tree_util.tree_leaves(after), strict=True):
        np.testing.assert_array_equal(new, value, err_msg=jax.tree_util.keystr(path))


def test_guard_names_exactly_the_leaf_with_a_non_finite_gradient():
    grouped = make_grouped_optimizer(
        _optimizer_config(),
        (ParamGroup(name="all", patterns=(r"^(a|b)$",), learning_rate=1e-2),),
        num_steps=10,
    )

    def loss_fn(params, batch, rng):
        del rng
        # sqrt has an infinite slope at 0: a finite loss whose gradient w.r.t. b is inf.
        loss = jnp.sum(params["a"] * batch["x"]) + jnp.sum(jnp.sqrt(params["b"]))
        return loss, jnp.ones(())

    params = {"a": jnp.ones(3), "b": jnp.zeros(2), "c": jnp.ones(2)}
    state = GroupedTrainState.create(params, grouped)
    step = make_grouped_train_step(loss_fn, grouped)
    after, metrics = step(state, {"x": jnp.ones((4, 3))}, jax.random.key(0))

    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(FloatingPointError, match=r"^step 0: non-finite .* in \['b'\] "):
        check_finite(metrics, 0)
    assert int(after.step) == 0
    np.testing.assert_array_equal(after.trainable["a"], params["a"])
    check_finite({**metrics, "finite": jnp.array(True)}, 0)  # silent when finite


def test_bfloat16_compute_with_float32_params_trains_adapters():
    model_bf16, model_f32 = _model("lora", jnp.bfloat16), _model("lora", jnp.float32)
    grouped = _adapter_optimizer()
    params = _init(model_f32)
    state = GroupedTrainState.create(params, grouped)
    step = jax.jit(make_grouped_train_step(_loss_fn(model_bf16), grouped, accumulation_steps=2))
    batch, rng = _batch(), jax.random.key(0)

    loss_sum, count = jax.jit(_loss_fn(model_f32))(params, batch, rng)
    losses = []
    for _ in range(5):
        state, metrics = step(state, batch, rng)
        check_finite(metrics, int(state.step))
        assert metrics["loss"].dtype == jnp.float32
        losses.append(float(metrics["loss"]))

    np.testing.assert_allclose(losses[0], float(loss_sum / count), rtol=2e-2)
    assert losses[-1] < losses[0]
    for leaf in jax.tree_util.tree_leaves((state.trainable, state.frozen, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32)
