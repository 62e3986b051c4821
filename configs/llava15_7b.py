"""LLaVA-1.5-7B + VCE + Dual-LoRA at the papers' size, for TPU pods (v5e-256, v4-64).

  python -m mllm_jax.train --config configs/llava15_7b.py --workdir gs://BUCKET/runs/llava15_7b \
      --config.model.init_from=hf:/mnt/llava-1.5-7b-hf --config.data.data_dir=/mnt/data

The model of SPEC §1-3, the recipe of ``configs/llava_vce.py`` (its stages, data and knobs):

  vision  CLIP ViT-L/14-336: 24 layers, width 1024, 16 heads, MLP 4096, patch 14, image 336,
          quick_gelu, biases, ln_pre; CLS dropped: 576 tokens per image
  VCE     levels (-2, -8, -14, -20) (anchor -2, LLaVA's feature layer), 16 heads, 4 points,
          then mlp2x_gelu to 4096; ``model.projector=mlp`` reads layer -2 alone
  LM      Vicuna-7B (Llama): 32 layers, width 4096, 32 heads, SwiGLU MLP 11008, RMSNorm eps 1e-5,
          RoPE 10000, untied head; vocabulary 32064 (32000 + <image> + <pad>, padded to a
          multiple of 64, as llava-1.5-7b-hf)
  adapter Dual-LoRA r=32, alpha=64 on the attention query and value projections
  compute bfloat16 with float32 params, scanned LM layers with full rematerialisation, chunked
          cross-entropy; FSDP over every chip of the slice (``mesh.ici_parallelism.fsdp=-1``)

``model.init_from`` is meant to be a llava-hf ``llava-1.5-7b-hf`` directory (config.json,
safetensors, tokenizer, preprocessor_config.json; the hub snapshot as it is, or one converted
by transformers). Its config.json describes exactly this architecture, so it overrides nothing;
the tower and LM load sharded onto the mesh, and stages 1 and 2 train VCE + Dual-LoRA on
easy-VQA in its own prompt format (``llava_v1`` with the Vicuna system prompt). Without it the
same architecture would be trained from scratch by stage 0, which is not what this config is for.

Global batches of 256 rows of 2048 tokens (up to 3 images per row) divide over 256 chips; on a
v4-64 (32 chips) they give 8 rows per chip. More slices: ``--config.mesh.dcn_parallelism.data=N``.
"""

import ml_collections

from configs import llava_vce
from mllm_jax.config_args import parse_config_arg
from mllm_jax.data.templates import V1_SYSTEM_PROMPT

IMAGE_SIZE = 336
STEPS = dict(stage1=100, stage2=300)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, stage="all", init_from="")
    config = llava_vce.get_config(f"size=demo,stage={args.stage}")

    config.data.update(
        dict(
            image_size=IMAGE_SIZE,
            template="llava_v1",
            system_prompt=V1_SYSTEM_PROMPT,
            read_threads=16,
            read_buffer_size=256,
        )
    )
    config.vision = ml_collections.ConfigDict(
        dict(
            patch_size=14,
            width=1024,
            num_layers=24,
            num_heads=16,
            mlp_dim=4096,
            use_cls_token=True,
            norm_epsilon=1e-5,
            mlp_activation="quick_gelu",
            attention_bias="all",
            mlp_bias=True,
            patch_bias=False,
            pre_norm=True,
        )
    )
    config.vce = ml_collections.ConfigDict(
        dict(level_indices=(-2, -8, -14, -20), num_heads=16, num_points=4, normalize_output=True)
    )
    config.model.update(
        dict(
            init_from=args.init_from,
            vocab_size=32064,
            embed_dim=4096,
            num_layers=32,
            num_heads=32,
            num_kv_heads=32,
            head_dim=128,
            mlp_dim=11008,
            norm_epsilon=1e-5,
            rope_max_wavelength=10_000.0,
            tie_embeddings=False,
            vision_feature_layer=-2,
            scan_layers=True,
            remat_policy="full",
            dtype="bfloat16",
            param_dtype="float32",
            loss_chunk_size=512,
            projector="vce",
        )
    )
    config.model.adapter.update(
        dict(kind="dual_lora", rank=32, alpha=64.0, dropout=0.05, targets=("query", "value"))
    )
    config.mesh.ici_parallelism.update(dict(data=1, fsdp=-1))

    # LLaVA's optimisation (SPEC §1, §3): cosine to zero, 3% warmup, no weight decay; stage 1
    # trains the fresh VCE + projector at 1e-3, stage 2 Dual-LoRA at 2e-4 and the projector at
    # 2e-5.
    config.optimizer.update(dict(weight_decay=0.0, end_learning_rate_fraction=0.0))
    for stage in ("stage1", "stage2"):
        config[stage].update(
            dict(
                num_steps=STEPS[stage],
                batch_size=256,
                seq_len=2048,
                max_images=3,
                warmup_steps=max(1, STEPS[stage] * 3 // 100),
            )
        )
    config.stage1.projector_learning_rate = 1e-3
    config.stage2.update(dict(adapter_learning_rate=2e-4, projector_learning_rate=2e-5))
    config.training.update(dict(log_every=10, checkpoint_every=100))
    config.evaluate.update(dict(batch_size=256, max_new_tokens=8))
    return config
