"""Generation-based VQA evaluation: exact-match accuracy overall and per question type.

Each question is answered by greedy generation (``mllm_jax.generate.answer_questions``) and
compared with the reference after normalisation (lower case, surrounding whitespace and final
punctuation removed). The vision-blind control answers the same questions with every image
replaced by zeros, which measures how much of the accuracy comes from language priors alone.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence
from typing import Any

from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.generate import answer_questions
from mllm_jax.models.multimodal_lm import MultimodalConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQAExample:
    """One question with its encoded images, reference answer and question type."""

    id: str
    images: tuple[bytes, ...]
    question: str
    answer: str
    question_type: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQAResult:
    accuracy: float
    per_type: dict[str, float]
    count: int
    predictions: tuple[str, ...]


def normalize_answer(text: str) -> str:
    """Lower case, outer whitespace and trailing '.', '!' or '?' removed."""
    return text.strip().lower().rstrip(".!?").strip()


def score(
    examples: Sequence[VQAExample], predictions: Sequence[str]
) -> tuple[float, dict[str, float]]:
    """(overall exact-match accuracy, accuracy per question type)."""
    if len(examples) != len(predictions) or not examples:
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    correct: dict[str, list[bool]] = collections.defaultdict(list)
    for example, prediction in zip(examples, predictions, strict=True):
        hit = normalize_answer(prediction) == normalize_answer(example.answer)
        correct[example.question_type].append(hit)
    hits = [h for values in correct.values() for h in values]
    return sum(hits) / len(hits), {t: sum(v) / len(v) for t, v in sorted(correct.items())}


def evaluate_vqa(
    config: MultimodalConfig,
    params: Any,
    tokenizer: Tokenizer,
    examples: Sequence[VQAExample],
    *,
    batch_size: int = 64,
    template: str = "v1",
    max_new_tokens: int = 8,
    zero_images: bool = False,
) -> VQAResult:
    """Answers every example in batches and scores the answers."""
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        predictions += answer_questions(
            config,
            params,
            tokenizer,
            [e.images for e in chunk],
            [e.question for e in chunk],
            template=template,
            max_new_tokens=max_new_tokens,
            zero_images=zero_images,
        )
    accuracy, per_type = score(examples, predictions)
    return VQAResult(
        accuracy=accuracy, per_type=per_type, count=len(examples), predictions=tuple(predictions)
    )


EASY_VQA_TYPES = ("shape", "color", "yes_no")


def easy_vqa_examples(records: Sequence[dict], answers: Sequence[str], limit: int | None = None):
    """VQAExamples from easy_vqa records (``builders.load_samples("easy_vqa", ...).records``).

    ``answers`` are the answer class names (``builders.easy_vqa.ANSWERS``).
    """
    count = len(records) if limit is None else min(limit, len(records))
    return [
        VQAExample(
            id=records[i]["id"].decode(),
            images=(bytes(records[i]["image"]),),
            question=records[i]["question"].decode(),
            answer=answers[int(records[i]["answer"])],
            question_type=EASY_VQA_TYPES[int(records[i]["question_type"])],
        )
        for i in range(count)
    ]
