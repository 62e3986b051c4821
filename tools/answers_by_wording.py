"""How a saved model answers easy-VQA questions, grouped by their wording.

Colour and shape words are masked (``is there a _ _ in the image?``), so each row is one
question template with one reference answer, and it shows what the model said how often. A
model that answers from the wording alone gives the same answer to a template whatever the
reference; one that reads the image follows the reference.

  python tools/answers_by_wording.py --saved_model runs/demo/model --question_type yes_no
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from absl import app, flags

from mllm_jax.data import builders
from mllm_jax.data.builders.easy_vqa import ANSWERS
from mllm_jax.generate import saved_prompt
from mllm_jax.models.saved_model import load_image_preprocessing, load_model, load_tokenizer
from mllm_jax.train.evaluate_vqa import (
    EASY_VQA_TYPES,
    VQAExample,
    easy_vqa_examples,
    evaluate_vqa,
    normalize_answer,
)

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "Directory written by models.saved_model.save_model.")
flags.DEFINE_string("data_dir", "data", "Where easy_vqa is prepared.")
flags.DEFINE_string("split", "test", "Split to answer.")
flags.DEFINE_integer("limit", 2000, "Answer the first LIMIT questions of the split (0: all).")
flags.DEFINE_enum("question_type", "yes_no", EASY_VQA_TYPES, "Which questions to answer.")
flags.DEFINE_integer("batch_size", 64, "Questions per generation batch.")

_CONTENT_WORDS = frozenset(a for a in ANSWERS if a not in ("yes", "no"))


def wording(question: str) -> str:
    """The question with its colour and shape words replaced by ``_``."""
    words = normalize_answer(question).split()
    return " ".join("_" if word in _CONTENT_WORDS else word for word in words) + "?"


def tally(
    examples: Sequence[VQAExample], predictions: Sequence[str]
) -> dict[tuple[str, str], collections.Counter]:
    """(wording, reference answer) -> how often the model gave each (normalised) answer."""
    said: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for example, prediction in zip(examples, predictions, strict=True):
        said[wording(example.question), example.answer][normalize_answer(prediction)] += 1
    return dict(sorted(said.items()))


def format_table(said: dict[tuple[str, str], collections.Counter]) -> str:
    """A Markdown table: one row per (wording, reference), the 4 most frequent answers."""
    lines = ["| wording | reference | n | correct | the model said |", "|---|---|---|---|---|"]
    for (template, reference), answers in said.items():
        total = sum(answers.values())
        spread = ", ".join(f"{answer or '(empty)'!r} {n}" for answer, n in answers.most_common(4))
        correct = answers[reference] / total
        lines.append(f"| {template} | {reference} | {total} | {correct:.2f} | {spread} |")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Checked here, not with mark_flag_as_required: a validator registered at import would
    # fire in every process that imports this module (the tests) on any later flag parse.
    if not FLAGS.saved_model:
        raise app.UsageError("--saved_model is required")
    source = builders.load_samples("easy_vqa", FLAGS.data_dir, FLAGS.split)
    count = len(source.records) if FLAGS.limit == 0 else min(FLAGS.limit, len(source.records))
    records = [source.records[i] for i in range(count)]
    examples = [
        e for e in easy_vqa_examples(records, ANSWERS) if e.question_type == FLAGS.question_type
    ]
    config, params, tokenizer_path = load_model(FLAGS.saved_model)
    # Prompted exactly as in training (template, system prompt), as the recipe evaluates.
    prompt = saved_prompt(FLAGS.saved_model)
    result = evaluate_vqa(
        config, params, load_tokenizer(tokenizer_path), examples, batch_size=FLAGS.batch_size,
        template=prompt["template"], system_prompt=prompt["system_prompt"],
        preprocessing=load_image_preprocessing(FLAGS.saved_model, config),
    )  # fmt: skip
    print(f"{FLAGS.question_type}: accuracy {result.accuracy:.4f} on {len(examples)} questions "
          f"(first {count} of {FLAGS.split})")  # fmt: skip
    print(format_table(tally(examples, result.predictions)))


if __name__ == "__main__":
    app.run(main)
