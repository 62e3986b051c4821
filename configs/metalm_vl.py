"""METALM, vision-language: causal vs prefix-LM vs semi-causal on easy-VQA (SPEC §4).

  python -m mllm_jax.train --config configs/metalm_vl.py --workdir runs/metalm_vl

Per mode: ``pretrain`` on image captions (the span: BOS, the image tokens and a text prefix of
random length; the decoder predicts the rest), zero-shot easy-VQA with the prompt
"question: {q} answer:", ``finetune`` on easy-VQA questions (the span: the prompt), easy-VQA
again. The datasets and tokenizer come from the LLaVA recipe's ``prepare`` stage
(``--config configs/llava_vce.py:stage=prepare``) in ``data.data_dir``. The connector is a
3-layer FFN, as in METALM's vision-language model. Sizes: ``small`` (the experiment) and ``test``.
"""

import ml_collections

from configs import metalm_text
from mllm_jax.config_args import parse_config_arg

SIZES = {
    "small": dict(width=128, layers=2, encoder_width=64, pretrain=300, finetune=150, batch=32,
                  questions=400),
    "test": dict(width=32, layers=1, encoder_width=16, pretrain=2, finetune=2, batch=4,
                 questions=4),
}  # fmt: skip


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, size="small", mode="all")
    if args.size not in SIZES:
        raise ValueError(f"unknown size {args.size!r}; choose one of {sorted(SIZES)}")
    size = SIZES[args.size]
    config = metalm_text.get_config(f"size={args.size},mode={args.mode}")
    width, enc = size["width"], size["encoder_width"]
    config.setting = "vl"
    config.model.vocab_size = 512  # the prepared tokenizer's ids
    config.model.embed_dim, config.model.num_layers = width, size["layers"]
    config.model.head_dim, config.model.mlp_dim = width // 4, 3 * width
    config.encoder.update(
        dict(embed_dim=enc, num_layers=size["layers"], head_dim=enc // 4, mlp_dim=3 * enc)
    )
    config.connector = ml_collections.ConfigDict(dict(num_layers=3, hidden_dim=width))
    config.vision = ml_collections.ConfigDict(
        dict(patch_size=16, width=enc, num_layers=size["layers"], num_heads=4, mlp_dim=3 * enc)
    )
    # A span is BOS + 16 image tokens + text: the longest VQA prompt is 41 tokens.
    config.spans = ml_collections.ConfigDict(
        dict(min_length=1, max_length=1, fraction=0.25, max_spans=3, max_span_length=48)
    )
    config.data = ml_collections.ConfigDict(
        dict(data_dir="data", image_size=64, prefetch_batches=2)
    )
    config.pretrain = ml_collections.ConfigDict(
        dict(num_steps=size["pretrain"], warmup_steps=max(1, size["pretrain"] // 20),
             learning_rate=2e-3, batch_size=size["batch"], seq_len=64, max_images=3)
    )  # fmt: skip
    config.finetune = ml_collections.ConfigDict(
        dict(num_steps=size["finetune"], warmup_steps=max(1, size["finetune"] // 20),
             learning_rate=1e-3, batch_size=size["batch"], seq_len=48, max_images=1)
    )  # fmt: skip
    config.evaluate = ml_collections.ConfigDict(
        dict(num_questions=size["questions"], batch_size=13 * 16)
    )
    del config.train
    return config
