"""Measures the packed image-text Grain pipeline: samples/s per worker count, packing efficiency.

  python tools/prepare_data.py --dataset easy_vqa --data_dir data
  python tools/train_tokenizer.py --data_dir data --dataset easy_vqa --vocab_size 512
  python tools/benchmark_data_pipeline.py --data_dir data --workers 0 --workers 2

For each worker count: warm-up batches (process start-up, first reads), then ``--batches`` timed
batches. Reports samples/s (packed samples), batches/s, tokens/s, packing efficiency (fraction of
non-pad tokens) and image slots used. A benchmark, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

from absl import app, flags

from mllm_jax.data.builders import load_samples
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import (
    BatchStream,
    PipelineOptions,
    SampleProcessor,
    make_packed_dataset,
)
from mllm_jax.data.tokenizer import Tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", "data", "Directory with prepared datasets and tokenizer.model.")
flags.DEFINE_string("dataset", "easy_vqa", "Prepared dataset to stream.")
flags.DEFINE_string("split", "train", "Split to stream.")
flags.DEFINE_string("tokenizer", None, "Tokenizer model; default DATA_DIR/tokenizer.model.")
flags.DEFINE_string("template", "v1", "Chat template.")
flags.DEFINE_integer("seq_len", 256, "Tokens per packed row.")
flags.DEFINE_integer("max_images", 8, "Image slots per row.")
flags.DEFINE_integer("image_size", 64, "Image side after preprocessing.")
flags.DEFINE_integer("tokens_per_image", 16, "Tokens each image occupies.")
flags.DEFINE_integer("batch_size", 16, "Rows per batch.")
flags.DEFINE_integer("batches", 40, "Timed batches per worker count.")
flags.DEFINE_integer("warmup_batches", 3, "Untimed batches first.")
flags.DEFINE_multi_integer("workers", [0, 2], "Worker counts to measure.")
flags.DEFINE_string("json_out", None, "Optional path for the results as JSON.")


def measure(worker_count: int) -> dict:
    tokenizer = Tokenizer.load(FLAGS.tokenizer or os.path.join(FLAGS.data_dir, "tokenizer.model"))
    source = load_samples(FLAGS.dataset, FLAGS.data_dir, FLAGS.split)
    spec = PackingSpec(
        seq_len=FLAGS.seq_len,
        max_images=FLAGS.max_images,
        image_size=FLAGS.image_size,
        tokens_per_image=FLAGS.tokens_per_image,
        image_id=tokenizer.image_id,
        pad_id=tokenizer.pad_id,
    )
    processor = SampleProcessor(
        source.to_sample,
        tokenizer,
        template=FLAGS.template,
        spec=spec,
        preprocessing=ImagePreprocessing(size=FLAGS.image_size),
    )
    options = PipelineOptions(batch_size=FLAGS.batch_size, worker_count=worker_count)
    stream = BatchStream(make_packed_dataset(source.records, processor, options))
    for _ in range(FLAGS.warmup_batches):
        next(stream)
    samples = tokens = images = 0
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        batch = next(stream)
        samples += int(batch["segment_ids"].max(axis=1).sum())
        tokens += int((batch["segment_ids"] > 0).sum())
        images += int(batch["image_mask"].sum())
    elapsed = time.perf_counter() - start
    rows = FLAGS.batches * FLAGS.batch_size
    return {
        "workers": worker_count,
        "samples_per_s": round(samples / elapsed, 1),
        "batches_per_s": round(FLAGS.batches / elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "samples_per_row": round(samples / rows, 2),
        "packing_efficiency": round(tokens / (rows * FLAGS.seq_len), 4),
        "image_slots_used": round(images / (rows * FLAGS.max_images), 4),
        "skipped": stream.num_skipped,
    }


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    results = [measure(w) for w in FLAGS.workers]
    for result in results:
        print(json.dumps(result))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
