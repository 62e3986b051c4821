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

import numpy as np

from mllm_jax.data.images import ImageProcessor
from mllm_jax.data.templates import V1_SYSTEM_PROMPT, tokenize_sample
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.generate import answer_questions
from mllm_jax.models.multimodal_lm import MultimodalConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class VQAExample:
    """One question with its encoded images, reference answer and question type.

    ``prompt``, when set, is the already templated prompt (token ids) to continue instead of
    ``question`` in a chat turn: a document prefix such as the multi-image documents'.
    """

    id: str
    images: tuple[bytes, ...]
    question: str
    answer: str
    question_type: str
    prompt: np.ndarray | None = None


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
    system_prompt: str = V1_SYSTEM_PROMPT,
    max_new_tokens: int = 8,
    zero_images: bool = False,
    length_multiple: int = 16,
    preprocessing: ImageProcessor | None = None,
) -> VQAResult:
    """Answers every example in batches and scores the answers.

    Every batch is padded to ``batch_size`` questions (repeating the last one; the extra
    answers are dropped), its prompts to a multiple of ``length_multiple`` tokens and its image
    slots to the most images any example has, so a whole evaluation compiles a few programs.
    ``preprocessing`` prepares the images as in training (see ``generate.prompt_batch``).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    num_slots = max(1, max(len(e.images) for e in examples))
    predictions: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start : start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        predictions += answer_questions(
            config,
            params,
            tokenizer,
            [e.images for e in chunk],
            [e.question if e.prompt is None else e.prompt for e in chunk],
            template=template,
            system_prompt=system_prompt,
            max_new_tokens=max_new_tokens,
            zero_images=zero_images,
            length_multiple=length_multiple,
            num_slots=num_slots,
            preprocessing=preprocessing,
        )[:real]
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


def document_examples(
    source: Any, tokenizer: Tokenizer, *, tokens_per_image: int, limit: int | None = None
) -> list[VQAExample]:
    """VQAExamples from interleaved documents whose last supervised run is the answer.

    ``source``: a ``builders.SampleSource`` (e.g. ``load_samples("multi_image", ...)``). The
    document is tokenized as in training (template ``plain`` and ``v1`` agree on documents);
    the prompt is every id before the final supervised run, the answer that run's text (its
    EOS dropped), the question type the first word of the question line.
    """
    count = len(source) if limit is None else min(limit, len(source))
    examples = []
    for i in range(count):
        sample = source[i]
        tokenized = tokenize_sample(
            sample, tokenizer, template="plain", tokens_per_image=tokens_per_image
        )
        supervised = tokenized.supervised
        end = len(supervised)
        start = end
        while start > 0 and supervised[start - 1]:
            start -= 1
        answer_ids = [t for t in tokenized.tokens[start:end] if t != tokenizer.eos_id]
        question = next(t.text for t in sample.turns if "Question:" in t.text)
        question_line = question.split("Question:", 1)[1].split("\n", 1)[0].strip()
        examples.append(
            VQAExample(
                id=sample.id,
                images=sample.images,
                question=question_line,
                answer=tokenizer.decode(answer_ids).strip(),
                question_type=question_line.split(" ", 1)[0].lower(),
                prompt=tokenized.tokens[:start],
            )
        )
    return examples
