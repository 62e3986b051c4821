"""The answers-by-wording tool masks colour and shape words and tallies answers per template."""

import importlib.util
import pathlib

from mllm_jax.train.evaluate_vqa import VQAExample

_PATH = pathlib.Path(__file__).resolve().parents[2] / "tools" / "answers_by_wording.py"
_SPEC = importlib.util.spec_from_file_location("answers_by_wording", _PATH)
answers_by_wording = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(answers_by_wording)


def _example(question: str, answer: str) -> VQAExample:
    return VQAExample(id=question, images=(), question=question, answer=answer,
                      question_type="yes_no")  # fmt: skip


def test_colour_and_shape_words_are_masked_and_nothing_else():
    wording = answers_by_wording.wording
    assert wording("Is there a red circle in the image?") == "is there a _ _ in the image?"
    assert wording("is there not a triangle?") == "is there not a _?"
    assert wording("Is no gray shape present?") == "is no _ shape present?"


def test_answers_are_tallied_per_wording_and_reference():
    examples = [
        _example("Is there a red circle?", "no"),
        _example("Is there a blue triangle?", "yes"),
        _example("Is there a green circle?", "yes"),
        _example("Is there not a red circle?", "yes"),
    ]
    said = answers_by_wording.tally(examples, ["No.", "no", " ", "YES"])
    assert {key: dict(counts) for key, counts in said.items()} == {
        ("is there a _ _?", "no"): {"no": 1},
        ("is there a _ _?", "yes"): {"no": 1, "": 1},
        ("is there not a _ _?", "yes"): {"yes": 1},
    }
    table = answers_by_wording.format_table(said).splitlines()
    assert table[2:] == [
        "| is there a _ _? | no | 1 | 1.00 | 'no' 1 |",
        "| is there a _ _? | yes | 2 | 0.00 | 'no' 1, '(empty)' 1 |",
        "| is there not a _ _? | yes | 1 | 1.00 | 'yes' 1 |",
    ]
