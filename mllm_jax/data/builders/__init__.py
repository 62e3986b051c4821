"""TFDS builders that write ArrayRecord files (no TensorFlow needed), one module per dataset.

  easy_vqa              easy-VQA (image, question, answer) triples          easy_vqa.py
  easy_vqa_captions     easy-VQA images with label-derived captions         easy_vqa_captions.py
  easy_vqa_grid         questions about one quadrant of a 2x2 easy-VQA grid easy_vqa_grid.py
  multi_image           questions over 2-3 easy-VQA images                  easy_vqa_interleaved.py
  few_shot              few-shot easy-VQA prompts                           easy_vqa_interleaved.py
  llava_json            LLaVA-style conversation JSON + image folder        llava_json.py

Each module has a ``to_sample(record) -> Sample``. ``prepare`` builds a dataset by name and
``load_samples`` reads a split back as records plus that conversion (``registry.py``);
``mllm-prepare-data`` (``mllm_jax/data/prepare_cli.py``) is the command line.
"""

from mllm_jax.data.builders.registry import (
    DATASETS,
    SampleSource,
    duplicate_id_counts,
    load_samples,
    make_builder,
    option_names,
    prepare,
    skipped_counts,
    train_texts,
)

__all__ = [
    "DATASETS",
    "SampleSource",
    "duplicate_id_counts",
    "load_samples",
    "make_builder",
    "option_names",
    "prepare",
    "skipped_counts",
    "train_texts",
]
