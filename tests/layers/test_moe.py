"""Sparse MoE feed-forward (SPEC §5): numerics vs a per-token reference, capacity, losses.

Tolerance: float32 layer vs float64 numpy (outputs) or a float32 jnp per-token loop (gradients),
atol 1e-5. Expert parallelism: tests/layers/test_moe_sharding.py.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mllm_jax.layers import moe_routing as routing
from mllm_jax.layers.moe import MOE_COLLECTION, MoEConfig, MoEFeedForward, summarize_moe
from mllm_jax.sharding import strip_boxes

B, N, D, F, E, K = 2, 6, 8, 12, 4, 2
ATOL = 1e-5


def _random_params(init_fn, *args, seed=0, scale=0.4):
    """Params shaped like ``init_fn(*args)["params"]`` drawn by numpy (no init compile)."""
    abstract = strip_boxes(jax.eval_shape(init_fn, *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), abstract
    )


def _layer(mode="dropless", renormalize=True, capacity_factor=1.25, activation="swiglu", k=K):
    config = MoEConfig(
        num_experts=E,
        top_k=k,
        mode=mode,
        renormalize_gates=renormalize,
        capacity_factor=capacity_factor,
        router_init_std=0.5,  # a wide router, so that top-k choices are far from ties
    )
    return MoEFeedForward(config=config, hidden_dim=F, activation=activation)


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(B, N, D)), jnp.float32)


@pytest.fixture(scope="module")
def params(x):
    return _random_params(_layer().init, jax.random.key(0), x)


@pytest.fixture(scope="module")
def cotangent():
    return jnp.asarray(np.random.default_rng(1).normal(size=(B, N, D)), jnp.float32)


def _choices(params, x, k, renormalize):
    """Per token: the chosen experts and their gates, by numpy in float64."""
    logits = np.asarray(x, np.float64).reshape(-1, D) @ np.asarray(params["router"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    experts = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return experts


def _reference(params, x, experts, renormalize, xp, activation="swiglu"):
    """y_t = Σ_{e in experts_t} gate_te · FFN_e(x_t), one token and one expert at a time."""
    tokens = x.reshape(-1, D)
    rows = []
    for t in range(tokens.shape[0]):
        logits = tokens[t] @ params["router"]
        probs = xp.exp(logits - xp.max(logits))
        probs = probs / xp.sum(probs)
        chosen = [probs[e] for e in experts[t]]
        total = sum(chosen) if renormalize else 1.0
        row = xp.zeros(D)
        for e in range(E):
            if e not in experts[t]:
                continue
            gate = chosen[list(experts[t]).index(e)] / total
            if activation == "swiglu":
                h = tokens[t] @ params["wi_gate"][e]
                h = h / (1 + xp.exp(-h)) * (tokens[t] @ params["wi_up"][e])
            else:
                h = tokens[t] @ params["wi"][e]
                h = 0.5 * h * (1 + jax.scipy.special.erf(h / np.sqrt(2.0)))
            row = row + gate * (h @ params["wo"][e])
        rows.append(row)
    return xp.stack(rows).reshape(x.shape)


def _apply(layer, params, x):
    return layer.apply({"params": params}, x)


def _grads(layer, params, x, cotangent):
    loss = lambda p, x: jnp.sum(_apply(layer, p, x) * cotangent)  # noqa: E731
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("renormalize", [True, False])
def test_dropless_output_equals_per_token_numpy_reference(params, x, renormalize):
    experts = _choices(params, x, K, renormalize)
    as64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    expected = _reference(as64, np.asarray(x, np.float64), experts, renormalize, np)
    out = jax.jit(lambda p, x: _apply(_layer(renormalize=renormalize), p, x))(params, x)
    np.testing.assert_allclose(out, expected, atol=ATOL, rtol=0)
    # Not a trivially small output: every token passes two experts.
    assert np.abs(expected).min(axis=-1).max() > 1e-2


def test_dropless_gradients_equal_per_token_reference(params, x, cotangent):
    experts = _choices(params, x, K, True)

    def reference_loss(p, x):
        return jnp.sum(_reference(p, x, experts, True, jnp) * cotangent)

    expected = jax.jit(jax.grad(reference_loss, argnums=(0, 1)))(params, x)
    got = _grads(_layer(), params, x, cotangent)
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
        have = dict(jax.tree_util.tree_flatten_with_path(got)[0])[path]
        np.testing.assert_allclose(have, want, atol=ATOL, rtol=0, err_msg=str(path))
    assert float(jnp.abs(got[0]["router"]).max()) > 1e-3  # the router does learn


def test_gelu_experts_match_reference(x):
    layer = _layer(activation="gelu")
    params = _random_params(layer.init, jax.random.key(3), x, seed=3)
    assert set(params) == {"router", "wi", "wo"}
    experts = _choices(params, x, K, True)
    expected = _reference(params, x, experts, True, jnp, activation="gelu")
    np.testing.assert_allclose(_apply(layer, params, x), expected, atol=ATOL, rtol=0)


def test_capacity_mode_with_room_for_every_token_equals_dropless(params, x, cotangent):
    roomy = _layer(mode="capacity", capacity_factor=E / K)  # C = N: nothing can drop
    out_c, stats = jax.jit(lambda p, x: roomy.apply({"params": p}, x, mutable=[MOE_COLLECTION]))(
        params, x
    )
    np.testing.assert_allclose(out_c, _apply(_layer(), params, x), atol=ATOL, rtol=0)
    assert float(stats[MOE_COLLECTION]["dropped_fraction"][0]) == 0.0
    for a, b in zip(
        jax.tree_util.tree_leaves(_grads(roomy, params, x, cotangent)),
        jax.tree_util.tree_leaves(_grads(_layer(), params, x, cotangent)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


# Hand-built routing of one group: N=4 tokens, E=2 experts, k=2, capacity C=2.
HAND_EXPERTS = np.array([[[0, 1], [0, 1], [0, 1], [1, 0]]])
# Top-1 choices first: expert 0 takes t0, t1 (t2 dropped), expert 1 takes t3. Then top-2:
# expert 1 takes t0 into its last slot; t1, t2 and t3's second choices find no room.
HAND_SLOTS = np.array([[[0, 1], [1, -1], [-1, -1], [0, -1]]])


def test_capacity_slots_follow_the_priority_rule_on_a_hand_built_routing():
    slots = routing.capacity_slots(jnp.asarray(HAND_EXPERTS), num_experts=2, capacity=2)
    np.testing.assert_array_equal(slots, HAND_SLOTS)
    # Token-order priority would have dropped t3's first choice; this rule keeps it.
    assert routing.expert_capacity(4, 2, 2, 0.5) == 2


def test_capacity_layer_drops_exactly_those_assignments():
    # x_t = one-hot(t), so the router's row t is token t's logits: the routing is hand-made.
    logits = np.array([[3.0, 1.0], [2.5, 0.5], [2.0, 1.5], [0.2, 1.2]])
    x = jnp.asarray(np.eye(4, 6)[None], jnp.float32)
    layer = MoEFeedForward(
        config=MoEConfig(num_experts=2, top_k=2, mode="capacity", capacity_factor=0.5),
        hidden_dim=5,
    )
    params = _random_params(layer.init, jax.random.key(0), x)
    router = np.zeros((6, 2), np.float32)
    router[:4] = logits
    params = {**params, "router": jnp.asarray(router)}
    apply = jax.jit(lambda p, x: layer.apply({"params": p}, x, mutable=[MOE_COLLECTION]))
    out, stats = apply(params, x)
    kept = HAND_SLOTS[0] >= 0
    experts = HAND_EXPERTS[0]
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t in range(4):
        want = np.zeros(6)
        for j in range(2):
            if kept[t, j]:
                e = experts[t, j]
                h = x[0, t] @ params["wi_gate"][e]
                h = h / (1 + np.exp(-h)) * (x[0, t] @ params["wi_up"][e])
                want += probs[t, e] / probs[t].sum() * (h @ params["wo"][e])
        np.testing.assert_allclose(out[0, t], want, atol=ATOL, rtol=0, err_msg=f"token {t}")
    assert np.all(np.asarray(out[0, 2]) == 0.0)  # dropped by both experts: the residual carries it
    assert float(stats[MOE_COLLECTION]["dropped_fraction"][0]) == pytest.approx(4 / 8)


# Router output for the loss tests: probabilities per token and a per-token logit offset.
FIXED_PROBS = np.array([[0.75, 0.25], [0.75, 0.25], [0.25, 0.75], [0.6, 0.4]])
FIXED_OFFSETS = np.array([1.0, 2.0, 0.0, -1.0])


def test_load_balance_and_z_loss_equal_hand_computed_values():
    logits = jnp.asarray(np.log(FIXED_PROBS) + FIXED_OFFSETS[:, None], jnp.float32)
    for k, expected in ((1, 1.0875), (2, 2.0)):
        _, experts, probs = routing.route_top_k(logits, k, renormalize=False)
        # k=1: f = (3/4, 1/4), P = (0.5875, 0.4125): 2 (3/4 · 0.5875 + 1/4 · 0.4125) = 1.0875.
        # k=2: f = (1, 1): 2 (0.5875 + 0.4125) = 2.
        assert float(routing.load_balance_loss(probs, experts)) == pytest.approx(expected)
    # logsumexp_e(log p_te + c_t) = c_t: mean(1, 4, 0, 1) = 1.5.
    assert float(routing.router_z_loss(logits)) == pytest.approx(1.5, rel=1e-6)
    entropy = -np.sum(FIXED_PROBS * np.log(FIXED_PROBS), axis=-1).mean()
    assert float(routing.router_entropy(routing.route_top_k(logits, 1, renormalize=False)[2])) == (
        pytest.approx(entropy, rel=1e-6)
    )


def test_uniform_routing_has_load_balance_loss_k():
    probs = jnp.full((8, 4), 0.25)
    experts = jnp.asarray(np.array([[t % 4, (t + 1) % 4] for t in range(8)]))
    assert float(routing.load_balance_loss(probs, experts)) == pytest.approx(2.0)


class TwoMoELayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = x + _layer(mode="capacity", capacity_factor=1.0)(x)
        return x


def test_sown_statistics_summarize_into_weighted_aux_loss_and_metrics(x):
    model = TwoMoELayers()
    params = _random_params(model.init, jax.random.key(0), x)
    _, state = jax.jit(lambda p: model.apply({"params": p}, x, mutable=[MOE_COLLECTION]))(params)
    aux_loss, metrics = summarize_moe(state[MOE_COLLECTION])
    layers = [state[MOE_COLLECTION][f"MoEFeedForward_{i}"] for i in range(2)]
    expected = sum(0.01 * s["load_balance_loss"][0] + 1e-3 * s["router_z_loss"][0] for s in layers)
    assert float(aux_loss) == pytest.approx(float(expected), rel=1e-6)
    loads = [metrics[f"moe/expert_load/{e}"] for e in range(E)]
    assert float(sum(loads)) == pytest.approx(1.0, rel=1e-6)
    dropped = np.mean([float(s["dropped_fraction"][0]) for s in layers])
    assert float(metrics["moe/dropped_fraction"]) == pytest.approx(dropped)
    assert 0.0 < float(metrics["moe/router_entropy"]) <= np.log(E) + 1e-6
    assert summarize_moe({})[1] == {}


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, top_k=5), "top_k"),
        (dict(num_experts=4, mode="sparse"), "mode"),
        (dict(num_experts=4, capacity_factor=0.0), "capacity_factor"),
        (dict(num_experts=4, every=0), "every"),
        (dict(num_experts=4, shared_expert_mlp_dim=-1), "shared_expert_mlp_dim"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**fields)
