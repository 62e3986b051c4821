"""Builds a dataset into a TFDS data_dir as ArrayRecord files and prints its split sizes.

  mllm-prepare-data --dataset easy_vqa --data_dir ~/tensorflow_datasets
  mllm-prepare-data --dataset few_shot --data_dir DIR --num_shots 5 --seed 1
  mllm-prepare-data --dataset llava_json --data_dir DIR \\
      --llava_json llava_v1_5_mix665k.json --image_folder images/ --on_bad_record skip \\
      --template llava_v1 --tokenizer llava-1.5-7b-hf --tokens_per_image 576 --seq_len 2048

llava_json records are checked with the training pipeline's rules as they are built (see
``mllm_jax/data/builders/llava_json.py``); with ``--template``, ``--tokenizer``,
``--tokens_per_image`` and ``--seq_len`` (the training run's) they are also templated, so samples
longer than the sequence are found here, not in training. Each bad record is reported once, with
its id, field and file.

(``python -m mllm_jax.data.prepare_cli`` and ``python tools/prepare_data.py`` are the same.)

An existing build with the same options is reused. Read a build back with
``mllm_jax.data.builders.load_samples(dataset, data_dir, split, **same_options)``.
"""

import json

from absl import app, flags

from mllm_jax.command_line import run_command
from mllm_jax.data import builders

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", None, sorted(builders.DATASETS), "Dataset to build.")
flags.DEFINE_string("data_dir", None, "TFDS data directory to build into.")
flags.DEFINE_integer("max_examples", None, "Keep at most this many records per split.")
flags.DEFINE_string("llava_json", None, "llava_json: the conversation JSON file.")
flags.DEFINE_string("image_folder", None, "llava_json: image root (default: the JSON's folder).")
flags.DEFINE_enum("on_bad_record", None, ["raise", "skip"], "llava_json: bad entry policy.")
flags.DEFINE_bool(
    "allow_outside_image_folder", None, "llava_json: accept image paths leaving --image_folder."
)
flags.DEFINE_string("template", None, "llava_json: chat template training will use.")
flags.DEFINE_string(
    "tokenizer", None, "llava_json: tokenizer training will use (.model file or HF directory)."
)
flags.DEFINE_integer("tokens_per_image", None, "llava_json: image tokens per image in training.")
flags.DEFINE_integer("seq_len", None, "llava_json: training sequence length.")
flags.DEFINE_integer("seed", None, "multi_image, few_shot: seed of the documents.")
flags.DEFINE_integer("train_size", None, "multi_image, few_shot: documents in train.")
flags.DEFINE_integer("test_size", None, "multi_image, few_shot: documents in test.")
flags.DEFINE_integer("num_shots", None, "few_shot: demonstrations before the query.")
flags.DEFINE_bool("supervise_demonstrations", None, "few_shot: train on demonstrations' answers.")
flags.mark_flags_as_required(["dataset", "data_dir"])

_OPTION_FLAGS = (
    "max_examples",
    "llava_json",
    "image_folder",
    "on_bad_record",
    "allow_outside_image_folder",
    "template",
    "tokenizer",
    "tokens_per_image",
    "seq_len",
    "seed",
    "train_size",
    "test_size",
    "num_shots",
    "supervise_demonstrations",
)


def main(argv):
    del argv
    given = {name: FLAGS[name].value for name in _OPTION_FLAGS if FLAGS[name].value is not None}
    accepted = builders.option_names(FLAGS.dataset)
    ignored = sorted(set(given) - set(accepted))
    if ignored:
        raise app.UsageError(f"--dataset {FLAGS.dataset} takes {list(accepted)}, not {ignored}")
    sizes = builders.prepare(FLAGS.dataset, FLAGS.data_dir, **given)
    builder = builders.make_builder(FLAGS.dataset, FLAGS.data_dir, **given)
    skipped = builders.skipped_counts(builder)
    print(f"{FLAGS.dataset} ({builder.builder_config.name}) in {builder.data_dir}")
    duplicates = builders.duplicate_id_counts(builder)
    for split, size in sizes.items():
        skipped_here = skipped.get(split, {})
        line = f"  {split}: {size} records, {sum(skipped_here.values())} skipped {skipped_here}"
        if duplicates.get(split):
            line += f", {duplicates[split]} reusing an id"
        print(line)
    summary = {"dataset": FLAGS.dataset, "sizes": sizes, "skipped": skipped}
    print(json.dumps(summary | {"duplicate_ids": duplicates}))


def run() -> None:
    """The ``mllm-prepare-data`` command."""
    run_command(main)


if __name__ == "__main__":
    run()
