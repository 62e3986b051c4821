"""Trains the project's sentencepiece tokenizer on prepared datasets or UTF-8 text files.

  python tools/train_tokenizer.py --data_dir data --dataset easy_vqa --dataset easy_vqa_captions
      (trains on the train splits' turn texts; writes data/tokenizer.model next to the data)
  python tools/train_tokenizer.py --output /tmp/tok/easy_vqa --vocab_size 512 \
      --text_file questions.txt --text_file answers.txt

Writes PREFIX.model and PREFIX.vocab (see ``mllm_jax.data.tokenizer`` for the special tokens),
then prints the vocabulary size and the encoding of a sample text. Code that already holds its
texts calls ``train_and_describe(texts, output_prefix, vocab_size)`` instead.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Sequence

from absl import app, flags

from mllm_jax.data import builders
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer

DEFAULT_SAMPLE_TEXT = "USER: <image>\nWhat color is the shape? ASSISTANT: red"
FLAGS = flags.FLAGS
flags.DEFINE_string(
    "output", None, "Model path prefix (PREFIX.model); default DATA_DIR/tokenizer with --data_dir."
)
flags.DEFINE_integer("vocab_size", 1024, "Upper bound on the vocabulary size (>= 264).")
flags.DEFINE_multi_string("text_file", [], "UTF-8 text file, one text per line; repeatable.")
flags.DEFINE_string("data_dir", None, "Directory of datasets prepared by tools/prepare_data.py.")
flags.DEFINE_multi_string("dataset", [], "Prepared dataset whose train split to read; repeatable.")
flags.DEFINE_string(
    "sample_text", DEFAULT_SAMPLE_TEXT, "Text whose encoding is printed after training."
)


def read_lines(paths: Sequence[str]) -> Iterator[str]:
    """Yields every line of every file, in order, without its line ending."""
    for path in paths:
        with open(path, encoding="utf-8") as file:
            for line in file:
                yield line.rstrip("\n")


def describe(tokenizer: Tokenizer, sample_text: str) -> str:
    """A short report: vocabulary size and how ``sample_text`` is split into pieces."""
    ids = tokenizer.encode(sample_text)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    return (
        f"vocab size: {tokenizer.vocab_size}\n"
        f"sample: {sample_text!r}\n"
        f"  {len(ids)} ids: {ids}\n"
        f"  pieces: {pieces}"
    )


def train_and_describe(
    texts: Iterable[str],
    output_prefix: str,
    vocab_size: int,
    sample_text: str = DEFAULT_SAMPLE_TEXT,
) -> str:
    """Trains on ``texts``, prints ``describe`` of the result and returns the .model path."""
    model_path = train_tokenizer(texts, output_prefix, vocab_size)
    print(f"wrote {model_path}")
    print(describe(Tokenizer.load(model_path), sample_text))
    return model_path


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.text_file and not FLAGS.dataset:
        raise app.UsageError("give --text_file and/or --dataset (with --data_dir)")
    if FLAGS.dataset and not FLAGS.data_dir:
        raise app.UsageError("--dataset needs --data_dir")
    output = FLAGS.output or (FLAGS.data_dir and os.path.join(FLAGS.data_dir, "tokenizer"))
    if not output:
        raise app.UsageError("give --output (or --data_dir)")
    for path in FLAGS.text_file:
        if not os.path.isfile(path):
            raise app.UsageError(f"--text_file {path!r} does not exist")
    texts = itertools.chain(
        read_lines(FLAGS.text_file), builders.train_texts(FLAGS.dataset, FLAGS.data_dir or "")
    )
    train_and_describe(texts, output, FLAGS.vocab_size, FLAGS.sample_text)


if __name__ == "__main__":
    app.run(main)
