"""The main job: the LLaVA-1.5 recipe at tiny scale with a VCE projector and Dual-LoRA, easy-VQA.

  python -m mllm_jax.train --config configs/llava_vce.py --workdir runs/demo            # all
  python -m mllm_jax.train --config configs/llava_vce.py:stage=stage2 --workdir runs/demo

Stages (each reads the earlier stages' results from sibling directories of the workdir):
  prepare        build the datasets and train the tokenizer into ``data.data_dir`` (if absent)
  stage0_vision  CLIP-style contrastive pretraining of the ViT on the image captions
  stage0_lm      next-token pretraining of the LM on the training text (questions, answers)
  stage1         VCE + projector, vision tower and LM frozen, on the captions
  stage2         Dual-LoRA + projector on easy-VQA conversations mixed with multi-image documents
  evaluate       easy-VQA test accuracy (per type, vision-blind control), multi-image accuracy,
                 ``results.json``

``stage=all`` runs them in order, skipping a stage whose final checkpoint already exists.
Sizes: ``size=demo`` (``make demo``: minutes on a 2-core CPU) and ``size=test`` (CI smoke runs
on a few hundred records). ``moe_experts=E`` (default 0: a dense LM) gives the LM sparse MoE
feed-forwards in every other block (top-2, dropless, experts half as wide as the dense MLP; see
``docs/moe.md``); they train with the LM in stage 0 and stay frozen afterwards.
Learning rates are scaled for these tiny models and short schedules:
the paper's LLaVA-scale values (projector 2e-5 / adapter 2e-4) barely move a width-128 model in
a few hundred steps.

Ablation knobs (defaults reproduce the demo):
  --config.data.vqa_dataset=easy_vqa_grid    stage 2 and evaluate on the fine-detail grid set
  --config.model.projector=mlp                LLaVA's MLP projector instead of VCE
  --config.model.adapter.kind=lora            or dual_lora / lora_moe / none
  --config.model.adapter.kind=none --config.stage2.train_lm=True   full fine-tuning of the LM
  --config.reuse_stages_from=runs/base        take stage0_vision + stage0_lm (config.reuse_stages)
                                              from a finished base run instead of training them
  --config.seed=1                             every stage's init, data order and dropout

Pretrained start (docs/llava_recipe.md, configs/llava15_7b.py for the paper's 7B model):
  --config.model.init_from=hf:DIR             DIR a llava-hf LLaVA checkpoint: its vision tower,
                                              LM (frozen), tokenizer and image processor; its
                                              config.json overrides the size fields (logged);
                                              stage 0 is skipped, stages 1-2 train as above
"""

import ml_collections

from configs.base import data_parallel_mesh, training_section
from mllm_jax.config_args import parse_config_arg


def optional_int(value: int | None):
    """``value``, or an int-typed None the command line can still set (``--config.x=100``)."""
    return ml_collections.config_dict.placeholder(int) if value is None else value


STAGES = ("prepare", "stage0_vision", "stage0_lm", "stage1", "stage2", "evaluate")

SIZES = {
    "demo": dict(
        width=128,
        vit_layers=4,
        lm_layers=4,
        max_examples=None,
        steps=dict(stage0_vision=600, stage0_lm=100, stage1=100, stage2=300),
        batch=dict(stage0_vision=128, stage0_lm=32, stage1=32, stage2=32),
        eval_examples=512,
        test_examples=None,
        vision_blind_examples=2000,
        log_every=25,
        eval_every=150,
    ),
    "test": dict(
        width=32,
        vit_layers=2,
        lm_layers=2,
        max_examples=64,
        steps=dict(stage0_vision=4, stage0_lm=4, stage1=4, stage2=4),
        batch=dict(stage0_vision=16, stage0_lm=8, stage1=8, stage2=8),
        eval_examples=8,
        test_examples=16,
        vision_blind_examples=None,
        log_every=2,
        eval_every=0,
    ),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, size="demo", stage="all", moe_experts=0)
    if args.size not in SIZES:
        raise ValueError(f"unknown size {args.size!r}; choose one of {sorted(SIZES)}")
    if args.stage != "all" and args.stage not in STAGES:
        raise ValueError(f"unknown stage {args.stage!r}; choose 'all' or one of {STAGES}")
    size = SIZES[args.size]
    width = size["width"]

    config = ml_collections.ConfigDict()
    config.recipe = "llava_vce"
    config.stage = args.stage
    config.seed = 0
    # A finished run whose `reuse_stages` this run reads instead of training them ("": none).
    # Stage 0 does not depend on the projector, adapter or VQA set, so one base serves sweeps
    # over those; the base's seed, not this run's, then decides the reused stages.
    config.reuse_stages_from = ""
    config.reuse_stages = ("stage0_vision", "stage0_lm")

    config.data = ml_collections.ConfigDict(
        dict(
            data_dir="data",
            tokenizer="",  # default: <data_dir>/tokenizer.model, trained by `prepare` if absent
            tokenizer_vocab_size=512,
            image_size=64,
            # LLaVA-1.5's conversation format (USER: ... ASSISTANT: ...), without the 147-token
            # vicuna system prompt: with 16 image tokens per sample it would triple the cost.
            template="v1",
            system_prompt="",
            # cap per split (None: all); CI uses a few
            max_examples=optional_int(size["max_examples"]),
            multi_image_train_size=20_000,
            # The VQA set of stage 2 and evaluate ("vqa" in the stage-2 mixture): "easy_vqa" or
            # "easy_vqa_grid" (2x2 grids of easy-VQA images at image_size, questions about one
            # quadrant; built by `prepare` when used, grid_*_size questions per split).
            vqa_dataset="easy_vqa",
            grid_train_size=20_000,
            grid_test_size=2_000,
            worker_count=0,
            prefetch_batches=2,
            read_threads=1,  # threads reading + preprocessing samples (Grain's default is 16)
            read_buffer_size=16,
            # Data shards each global batch is cut into (0: one per process). The data order
            # depends on this, not on the process count: a run resumes on any process count
            # that divides it (data/sharded_stream.py).
            num_data_shards=0,
        )
    )

    config.vision = ml_collections.ConfigDict(
        dict(
            patch_size=16,
            width=width,
            num_layers=size["vit_layers"],
            num_heads=4,
            # 3x, not 4x: at width 128 a 512-wide MLP took 1.25x the step time of 384 on a
            # 2-core CPU for the same zero-shot accuracy (experiments/stage0_vision_sweep.py).
            mlp_dim=3 * width,
            use_cls_token=False,  # nothing reads it: CLIP pools the patch mean, VCE the patches
        )
    )
    config.vce = ml_collections.ConfigDict(
        dict(level_indices=(-1, -2, -3), num_heads=4, num_points=4, normalize_output=True)
    )

    config.model = ml_collections.ConfigDict(
        dict(
            # "hf:DIR": start from a llava-hf checkpoint (mllm_jax/recipes/llava_hf_base.py);
            # "": train the tower and LM here (stage 0).
            init_from="",
            vocab_size=512,
            embed_dim=width,
            num_layers=size["lm_layers"],
            num_heads=4,
            num_kv_heads=2,
            head_dim=width // 4,
            mlp_dim=3 * width,
            mlp_activation="swiglu",
            norm="rmsnorm",
            norm_epsilon=1e-6,
            rope_max_wavelength=10_000.0,
            tie_embeddings=True,
            scan_layers=False,
            remat_policy="none",
            dtype="float32",
            param_dtype="float32",
            loss_chunk_size=0,  # > 0: chunked cross-entropy, as configs/base.py
            projector="vce",
            fusion="early",
            adapter=dict(
                kind="dual_lora",
                rank=16,
                alpha=32.0,
                dropout=0.05,
                targets=("query", "key", "value", "out", "wi_gate", "wi_up", "wo"),
                num_experts=4,  # LoRA experts per projection (kind="lora_moe" only)
                top_k=2,
            ),
            # num_experts=0: no MoE (model.moe is then ignored).
            moe=dict(
                num_experts=args.moe_experts,
                top_k=2,
                mode="dropless",
                every=2,
                expert_mlp_dim=3 * width // 2,
                load_balance_weight=0.01,
                z_loss_weight=1e-3,
            ),
        )
    )

    config.mesh = data_parallel_mesh()

    # Shared AdamW settings; each stage sets its own peak learning rates and warmup.
    config.optimizer = ml_collections.ConfigDict(
        dict(
            b1=0.9,
            b2=0.98,
            eps=1e-8,
            weight_decay=0.05,
            grad_clip_norm=1.0,
            end_learning_rate_fraction=0.05,
        )
    )

    config.training = training_section(log_every=size["log_every"], eval_every=size["eval_every"])

    steps, batch = size["steps"], size["batch"]
    config.stage0_vision = ml_collections.ConfigDict(
        dict(
            num_steps=steps["stage0_vision"],
            batch_size=batch["stage0_vision"],
            warmup_steps=max(1, steps["stage0_vision"] // 20),
            learning_rate=1e-3,
            image_pooling="mean",
            text_width=64,
            text_layers=1,
            text_heads=2,
            embed_dim=width,
            augment=True,  # random flips and translations (labels are position-free)
        )
    )
    config.stage0_lm = ml_collections.ConfigDict(
        dict(
            num_steps=steps["stage0_lm"],
            batch_size=batch["stage0_lm"],
            seq_len=128,
            warmup_steps=max(1, steps["stage0_lm"] // 10),
            learning_rate=3e-3,
            # Training text: the easy-VQA conversations and the multi-image documents, images
            # dropped and every token a target. Named explicitly (not "vqa"), so stage 0 is the
            # same whatever data.vqa_dataset is and can be reused across it.
            mixture=dict(easy_vqa=1.0, multi_image=0.3),
        )
    )
    config.stage1 = ml_collections.ConfigDict(
        dict(
            num_steps=steps["stage1"],
            batch_size=batch["stage1"],
            seq_len=128,
            max_images=4,
            warmup_steps=max(1, steps["stage1"] // 10),
            projector_learning_rate=1e-3,
        )
    )
    config.stage2 = ml_collections.ConfigDict(
        dict(
            num_steps=steps["stage2"],
            batch_size=batch["stage2"],
            seq_len=128,
            max_images=4,
            warmup_steps=max(1, steps["stage2"] // 20),
            # Yes/no questions (comparing the question with the image) are learned last: at
            # 2e-3 / 5e-4 they stayed at the language prior (0.83) through 300 steps.
            adapter_learning_rate=4e-3,
            projector_learning_rate=1e-3,
            # Full fine-tuning instead of an adapter: the whole LM trains at lm_learning_rate
            # (needs model.adapter.kind="none"; untuned at this scale).
            train_lm=False,
            lm_learning_rate=5e-4,
            # "vqa" is data.vqa_dataset; flips are off when its answers name positions.
            mixture=dict(vqa=1.0, multi_image=0.1),
            # Test questions (stage 1: test captions) scored at each evaluation inside stages 1
            # and 2, and at their end; 0: none (the `evaluate` stage still scores the model).
            eval_examples=size["eval_examples"],
        )
    )
    config.evaluate = ml_collections.ConfigDict(
        dict(
            batch_size=256,
            max_new_tokens=4,
            test_examples=optional_int(size["test_examples"]),  # None: the whole test split
            # The images-zeroed control on this many evenly spaced test questions (None: all);
            # results.json also scores the model with images on the same questions.
            vision_blind_examples=optional_int(size["vision_blind_examples"]),
            examples_to_show=6,
        )
    )
    return config
