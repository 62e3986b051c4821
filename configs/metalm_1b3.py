"""METALM, language, at the 1.3B scale: the semi-causal LM sized for TPU slices (SPEC §4).

  python tools/aot_compile.py --config configs/metalm_1b3.py --topology v5e:4x4
  python -m mllm_jax.train --config configs/metalm_1b3.py:mode=all --workdir gs://BUCKET/metalm

The recipe of ``configs/metalm_text.py`` (causal / prefix / semi-causal on the same data) with
``mode=semi_causal`` by default and the model at the 1.3B decoder scale:

  decoder    24 layers, width 2048, 32 heads of 64, GELU MLP 8192, RMSNorm, RoPE: 24 blocks of
             50,335,744 + final norm 2,048 + tied embedding 131,072,000 = 1,339,131,904 (1.3B)
  encoder    24 layers, width 1024, 16 heads of 64, GELU MLP 4096 (BERT-large's shape,
             narrower than the decoder as in METALM): 24 blocks of 12,584,960 + final norm
             1,024 + its own embedding 65,536,000 = 367,576,064
  connector  linear 1024 -> 2048 with bias: 2,099,200; in all 1,708,807,168 params
  vocab      64,000 ids, sized for a sentencepiece tokenizer (the byte-level docstring corpus
             of ``metalm_text`` uses 259 of them: a real run at this scale needs its own)
  spans      the paper's: 64-128 tokens, 25% of the tokens, at sequence length 2048
  compute    bfloat16 with float32 params, scanned layers, full rematerialisation, chunked
             cross-entropy; FSDP over every chip of the slice (``mesh.ici_parallelism.fsdp=-1``)

Global batch: 128 rows of 2048 tokens (256K tokens) per step, accumulated over 2 micro-batches
of 64, so a v5e-16 (``v5e:4x4``) chip holds 4 rows at a time: with 8 the step needed 17.0 GiB of
its 16 GiB (``docs/tpu.md``, AOT compilation at real scale).
"""

import ml_collections

from configs import metalm_text
from mllm_jax.config_args import parse_config_arg
from mllm_jax.data.span_sampling import scaled_span_lengths

DECODER = dict(embed_dim=2048, num_layers=24, num_heads=32, num_kv_heads=32, head_dim=64,
               mlp_dim=8192)  # fmt: skip
ENCODER = dict(embed_dim=1024, num_layers=24, num_heads=16, num_kv_heads=16, head_dim=64,
               mlp_dim=4096)  # fmt: skip
SEQ_LEN, BATCH_SIZE, STEPS = 2048, 128, 100_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_config_arg(arg, mode="semi_causal")
    # size=small sets the span lengths and slots from seq_len; they are recomputed below.
    config = metalm_text.get_config(f"size=small,mode={args.mode}")
    config.model.update(
        dict(
            vocab_size=64_000, mlp_activation="gelu", scan_layers=True, remat_policy="full",
            dtype="bfloat16", param_dtype="float32", loss_chunk_size=512, **DECODER,
        )
    )  # fmt: skip
    config.encoder.update(ENCODER)
    low, high = scaled_span_lengths(SEQ_LEN)
    config.spans.update(
        dict(min_length=low, max_length=high, max_spans=SEQ_LEN // (low + 1) + 1,
             max_span_length=high)
    )  # fmt: skip
    config.data.update(dict(seq_len=SEQ_LEN, batch_size=BATCH_SIZE))
    config.mesh.ici_parallelism.update(dict(data=1, fsdp=-1))
    config.training.update(
        dict(log_every=50, checkpoint_every=1000, keep_checkpoints=2, accumulation_steps=2)
    )
    config.train.update(dict(num_steps=STEPS, warmup_steps=2000, learning_rate=3e-4))
    return config
