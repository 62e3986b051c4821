"""MultimodalLM (VCE projector, Dual-LoRA) forward and gradients: (2,2,2) mesh == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from configs import base
from mllm_jax import sharding
from mllm_jax.layers import TransformerConfig, VCEConfig, ViTConfig
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from tests.models.test_multimodal_lm import IMAGE_ID, SIZE, V, _batch, _model_inputs

CONFIG = MultimodalConfig(
    vocab_size=V,
    embed_dim=16,
    transformer=TransformerConfig(
        num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
        adapter=AdapterConfig(kind="dual_lora", rank=4),
    ),
    vision=ViTConfig(
        image_size=SIZE, patch_size=8, width=16, num_layers=2, num_heads=2, mlp_dim=32
    ),
    projector="vce",
    vce=VCEConfig(level_indices=(-1, -2), num_heads=2),
    freeze_vision=False,
)  # fmt: skip


def _loss(model, params, batch):
    logits = model.apply({"params": params}, batch["tokens"], **_model_inputs(batch))
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"]), logits


def test_sharded_forward_and_gradients_match_one_device(devices):
    assert IMAGE_ID == 4
    model = MultimodalLM(CONFIG)
    one_row = _batch()
    batch = {k: jnp.concatenate([v] * 4) for k, v in one_row.items()}
    batch["images"] = batch["images"] * jnp.arange(1, 5.0)[:, None, None, None, None]
    boxed = jax.jit(model.init)(jax.random.key(0, impl="rbg"), batch["tokens"],
                                **_model_inputs(batch))["params"]  # fmt: skip
    params = sharding.strip_boxes(boxed)
    grad_fn = jax.value_and_grad(lambda p, b: _loss(model, p, b), has_aux=True)
    (ref_loss, ref_logits), ref_grads = jax.jit(grad_fn)(params, batch)

    mesh = sharding.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.logical_rules_from_config(base.LOGICAL_AXIS_RULES)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    sharded_params = jax.device_put(params, shardings)
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("act_batch"), mesh,
                                                 rules)  # fmt: skip
    sharded_batch = jax.device_put(batch, batch_sharding)
    with sharding.mesh_context(mesh, rules):
        (loss, logits), grads = jax.jit(grad_fn)(sharded_params, sharded_batch)
    kernel = sharded_params["lm"]["decoder"]["layers_0"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    for path, ref in flat_ref:
        np.testing.assert_allclose(
            np.asarray(flat[path]), np.asarray(ref), rtol=1e-3, atol=1e-5,
            err_msg=jax.tree_util.keystr(path),
        )  # fmt: skip
    # Unfrozen here: the vision tower takes part in the comparison with real gradients.
    assert float(optax.tree.norm(ref_grads["vision"])) > 0
