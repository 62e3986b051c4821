"""Which prepared datasets the LLaVA recipe reads, with which build options, in which mixtures.

``data.vqa_dataset`` is the VQA set that stage 2 trains on and ``evaluate`` scores:

  easy_vqa        one shape per image (the demo)
  easy_vqa_grid   fine detail: a 2x2 grid of easy-VQA images, questions about one quadrant

A stage's ``mixture`` maps dataset names to sampling weights; the name ``"vqa"`` stands for
``data.vqa_dataset``, so one override (``--config.data.vqa_dataset=easy_vqa_grid``) moves
stage 2 and the evaluation to the other set. The tokenizer is trained on ``TOKENIZER_DATASETS``
whatever the config says, so every run shares ``<data_dir>/tokenizer.model``; words outside its
corpus ("top", "left") are spelled with shorter pieces (byte fallback covers any character).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mllm_jax.data import builders
from mllm_jax.train import evaluate_vqa

VQA_DATASETS = ("easy_vqa", "easy_vqa_grid")
# Questions about positions ("top left"): a left-right flip of the image would change the answer.
POSITION_DEPENDENT = frozenset({"easy_vqa_grid"})
TOKENIZER_DATASETS = ("easy_vqa", "easy_vqa_captions", "multi_image")
VQA_ALIAS = "vqa"


def vqa_dataset(config: Any) -> str:
    """``config.data.vqa_dataset``, checked to be one of ``VQA_DATASETS``."""
    name = config.data.vqa_dataset
    if name not in VQA_DATASETS:
        raise ValueError(f"data.vqa_dataset={name!r}; choose one of {VQA_DATASETS}")
    return name


def data_options(config: Any, dataset: str) -> dict:
    """The build options of ``dataset`` (they decide its directory: prepare and load agree)."""
    options = {}
    if config.data.max_examples is not None:
        options["max_examples"] = int(config.data.max_examples)
    if dataset == "multi_image":
        options["train_size"] = int(config.data.multi_image_train_size)
    if dataset == "easy_vqa_grid":
        options["train_size"] = int(config.data.grid_train_size)
        options["test_size"] = int(config.data.grid_test_size)
        options["image_size"] = int(config.data.image_size)
    return options


def load_source(config: Any, dataset: str, split: str) -> builders.SampleSource:
    """The prepared ``split`` of ``dataset`` as the config builds it."""
    return builders.load_samples(
        dataset, config.data.data_dir, split, **data_options(config, dataset)
    )


def mixture(section: Any, config: Any) -> list[tuple[str, float]]:
    """A stage's ``mixture`` as (dataset, weight) pairs: ``"vqa"`` (as ``data.vqa_dataset``)
    first, then the other names in sorted order (the order decides each source's shuffle seed).
    """
    weights = dict(section.mixture)
    pairs = [(vqa_dataset(config), weights.pop(VQA_ALIAS))] if VQA_ALIAS in weights else []
    pairs += sorted(weights.items())
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(
            f"mixture {dict(section.mixture)} names {names[0]!r} twice (once as {VQA_ALIAS!r})"
        )
    return pairs


def prepared_datasets(config: Any) -> tuple[str, ...]:
    """Every dataset a run of ``config`` reads: the tokenizer's corpus, the VQA set and the
    stages' mixtures."""
    names = [*TOKENIZER_DATASETS, vqa_dataset(config)]
    for stage in ("stage0_lm", "stage2"):
        names += [name for name, _ in mixture(config[stage], config)]
    return tuple(dict.fromkeys(names))


def tokenizer_texts(config: Any) -> Iterator[str]:
    """The tokenizer's training corpus: one text per train sample of ``TOKENIZER_DATASETS``
    (turns joined by spaces, led by a space; see ``builders.train_texts``)."""
    for name in TOKENIZER_DATASETS:
        source = load_source(config, name, "train")
        for index in range(len(source)):
            yield " " + " ".join(turn.text for turn in source[index].turns)


def flips_allowed(config: Any) -> bool:
    """Whether stage 2 may flip images left-right (not when its answers name positions)."""
    return vqa_dataset(config) not in POSITION_DEPENDENT


def vqa_test_examples(config: Any, limit: int | None) -> list[evaluate_vqa.VQAExample]:
    """The first ``limit`` (None: all) test questions of ``data.vqa_dataset``."""
    source = load_source(config, vqa_dataset(config), "test")
    return evaluate_vqa.easy_vqa_examples(source.records, builders.easy_vqa.ANSWERS, limit)
