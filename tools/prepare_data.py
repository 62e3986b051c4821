"""Builds a dataset into a TFDS data_dir as ArrayRecord files and prints its split sizes.

  python tools/prepare_data.py --dataset easy_vqa --data_dir ~/tensorflow_datasets

The same command as ``mllm-prepare-data`` (``mllm_jax/data/prepare_cli.py``, which lists its
flags and examples).
"""

from mllm_jax.data.prepare_cli import run

if __name__ == "__main__":
    run()
