"""Chat templates: exact ids and supervision masks against hand-worked pieces, and bad input."""

import itertools

import numpy as np
import pytest

from mllm_jax.data.sample import BadRecordError, Sample, Turn
from mllm_jax.data.templates import (
    V1_SYSTEM_PROMPT,
    TokenizedSample,
    prompt_for_generation,
    tokenize_sample,
)
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer

P = 3  # tokens per image
BOS, EOS, IMAGE, USER, ASSISTANT = 2, 3, 4, 5, 6


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    texts = []
    for color, shape in itertools.product(("red", "green", "blue", "teal"), ("circle", "triangle")):
        texts += [
            f"What color is the {shape}?",
            f"Is there a {color} {shape} in the image?",
            f"A {color} {shape} on a white background.",
            f" {color}",
            f" {shape}",
            " yes",
            " no",
        ]
    return Tokenizer.load(train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "m"), 384))


def user(text, **kw):
    return Turn(role="user", text=text, **kw)


def assistant(text, **kw):
    return Turn(role="assistant", text=text, **kw)


def text_turn(text, **kw):
    return Turn(role="text", text=text, **kw)


def expected(pieces):
    """(ids, supervised) from [(ids, supervised), ...] pieces."""
    ids = [i for piece, _ in pieces for i in piece]
    mask = [flag for piece, flag in pieces for _ in piece]
    return np.asarray(ids, np.int32), np.asarray(mask, np.bool_)


def assert_matches(result: TokenizedSample, pieces):
    ids, mask = expected(pieces)
    assert result.tokens.dtype == np.int32 and result.supervised.dtype == np.bool_
    np.testing.assert_array_equal(result.tokens, ids)
    np.testing.assert_array_equal(result.supervised, mask)


def encode_rendered(tok, rendered: str) -> list[int]:
    """Whole-string encoding of rendered template text, "</s>" as EOS, each image as P ids."""
    ids = [BOS]
    for k, part in enumerate(rendered.split("</s>")):
        ids += [EOS] if k else []
        ids += [j for i in tok.encode(part) for j in ([IMAGE] * P if i == IMAGE else [i])]
    return ids


TWO_TURN_VQA = Sample(
    id="vqa-1",
    turns=(
        user("<image>\nWhat color is the shape?"),
        assistant("Red."),
        user("Is it a circle?"),
        assistant("yes"),
    ),
    images=(b"png",),
)


def test_v1_two_turn_conversation_with_an_image_matches_hand_worked_pieces(tok):
    enc = tok.encode
    result = tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P)
    assert_matches(
        result,
        [
            ([BOS], False),
            (enc(V1_SYSTEM_PROMPT), False),
            (enc(" "), False),
            ([USER], False),
            (enc(" "), False),
            ([IMAGE] * P, False),
            (enc("\nWhat color is the shape?"), False),
            (enc(" "), False),
            ([ASSISTANT], False),
            (enc(" Red."), True),
            ([EOS], True),
            ([USER], False),
            (enc(" Is it a circle?"), False),
            (enc(" "), False),
            ([ASSISTANT], False),
            (enc(" yes"), True),
            ([EOS], True),
        ],
    )
    assert result.id == "vqa-1" and result.num_images == 1


def test_v1_pieces_concatenate_to_the_encoding_of_the_rendered_template(tok):
    rendered = (
        f"{V1_SYSTEM_PROMPT} USER: <image>\nWhat color is the shape? ASSISTANT: Red.</s>"
        "USER: Is it a circle? ASSISTANT: yes</s>"
    )
    result = tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P)
    assert result.tokens.tolist() == encode_rendered(tok, rendered)


def test_v1_in_context_demonstrations_are_not_supervised(tok):
    sample = Sample(
        id="icl-1",
        turns=(
            user("<image>\nWhat color is the shape?"),
            assistant("blue", supervised=False),
            user("<image>\nWhat color is the shape?"),
            assistant("teal"),
        ),
        images=(b"a", b"b"),
    )
    enc = tok.encode
    result = tokenize_sample(sample, tok, template="v1", tokens_per_image=P)
    question = [
        ([USER], False),
        (enc(" "), False),
        ([IMAGE] * P, False),
        (enc("\nWhat color is the shape?"), False),
        (enc(" "), False),
        ([ASSISTANT], False),
    ]
    assert_matches(
        result,
        [([BOS], False), (enc(V1_SYSTEM_PROMPT), False), (enc(" "), False)]
        + question
        + [(enc(" blue"), False), ([EOS], False)]
        + question
        + [(enc(" teal"), True), ([EOS], True)],
    )
    assert result.num_images == 2


def test_v1_system_turn_replaces_the_default_prompt_and_user_turns_can_be_supervised(tok):
    sample = Sample(
        id="sys-1",
        turns=(
            Turn(role="system", text="Answer in one word."),
            user("Is the circle red?", supervised=True),
            assistant("no"),
        ),
    )
    enc = tok.encode
    assert_matches(
        tokenize_sample(sample, tok, template="v1", tokens_per_image=P),
        [
            ([BOS], False),
            (enc("Answer in one word."), False),
            (enc(" "), False),
            ([USER], False),
            (enc(" Is the circle red?"), True),
            (enc(" "), True),
            ([ASSISTANT], False),
            (enc(" no"), True),
            ([EOS], True),
        ],
    )


def test_turn_text_is_emitted_verbatim(tok):
    sample = Sample(id="ws", turns=(user("Is it red? "), assistant("yes\n")))
    enc = tok.encode
    result = tokenize_sample(sample, tok, template="v1", tokens_per_image=P, system_prompt="")
    assert result.tokens.tolist() == (
        [BOS, USER] + enc(" Is it red? ") + enc(" ") + [ASSISTANT] + enc(" yes\n") + [EOS]
    )


def test_v1_empty_system_prompt_emits_no_preamble(tok):
    sample = Sample(id="q", turns=(user("Is it red?"), assistant("yes")))
    result = tokenize_sample(sample, tok, template="v1", tokens_per_image=P, system_prompt="")
    assert result.tokens[:2].tolist() == [BOS, USER]


def test_plain_caption_matches_hand_worked_pieces(tok):
    sample = Sample(
        id="cap-1",
        turns=(user("<image>"), assistant("A red circle on a white background.")),
        images=(b"png",),
    )
    assert_matches(
        tokenize_sample(sample, tok, template="plain", tokens_per_image=P),
        [
            ([BOS], False),
            ([IMAGE] * P, False),
            (tok.encode("A red circle on a white background."), True),
            ([EOS], True),
        ],
    )


def test_plain_question_is_raw_unsupervised_text(tok):
    sample = Sample(
        id="cap-2", turns=(user("<image>What shape?"), assistant(" triangle")), images=(b"png",)
    )
    assert_matches(
        tokenize_sample(sample, tok, template="plain", tokens_per_image=P),
        [
            ([BOS], False),
            ([IMAGE] * P, False),
            (tok.encode("What shape?"), False),
            (tok.encode(" triangle"), True),
            ([EOS], True),
        ],
    )


@pytest.mark.parametrize("template", ["v1", "plain"])
@pytest.mark.parametrize("last_supervised", [True, False])
def test_text_document_is_raw_with_a_final_eos_supervised_like_the_last_turn(
    tok, template, last_supervised
):
    sample = Sample(
        id="doc-1",
        turns=(
            text_turn("Shapes. <image>"),
            text_turn(" A teal triangle.", supervised=last_supervised),
        ),
        images=(b"png",),
    )
    assert_matches(
        tokenize_sample(sample, tok, template=template, tokens_per_image=P),
        [
            ([BOS], False),
            (tok.encode("Shapes. "), True),
            ([IMAGE] * P, False),
            (tok.encode(" A teal triangle."), last_supervised),
            ([EOS], last_supervised),
        ],
    )


def test_text_turn_inside_a_v1_chat_gets_no_markers_and_no_separator(tok):
    sample = Sample(
        id="mix-1", turns=(text_turn("Notes.", supervised=False), user("Why?"), assistant("no"))
    )
    enc = tok.encode
    assert_matches(
        tokenize_sample(sample, tok, template="v1", tokens_per_image=P),
        [
            ([BOS], False),
            (enc(V1_SYSTEM_PROMPT), False),
            (enc(" "), False),
            (enc("Notes."), False),
            ([USER], False),
            (enc(" Why?"), False),
            (enc(" "), False),
            ([ASSISTANT], False),
            (enc(" no"), True),
            ([EOS], True),
        ],
    )


def test_max_length_admits_a_sequence_of_exactly_that_length(tok):
    length = len(tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P).tokens)
    kwargs = dict(template="v1", tokens_per_image=P, max_length=length)
    assert len(tokenize_sample(TWO_TURN_VQA, tok, **kwargs).tokens) == length


BAD_SAMPLES = {
    "no-supervised-tokens": (
        Sample(id="bad-1", turns=(user("Is it red?"), assistant("yes", supervised=False))),
        {},
        "turns",
        "no supervised tokens",
    ),
    "too-long": (TWO_TURN_VQA, {"max_length": 20}, "tokens", "exceed max_length 20"),
    "empty-answer": (
        Sample(id="bad-3", turns=(user("Is it red?"), assistant("  "))),
        {},
        "turns[1].text",
        "a question with no answer",
    ),
    "unanswered-last-question": (
        Sample(id="bad-4", turns=(user("Is it red?"), assistant("yes"), user("And blue?"))),
        {},
        "turns[2]",
        "a question with no answer",
    ),
    "more-placeholders-than-images": (
        Sample(id="bad-5", turns=(user("<image><image>"), assistant("red")), images=(b"a",)),
        {},
        "images",
        "2 <image> placeholders but 1 images",
    ),
    "more-images-than-placeholders": (
        Sample(id="bad-6", turns=(user("What color?"), assistant("red")), images=(b"a",)),
        {},
        "images",
        "0 <image> placeholders but 1 images",
    ),
    "unknown-role": (
        Sample(id="bad-7", turns=(Turn(role="narrator", text="Once"), assistant("red"))),
        {},
        "turns[0].role",
        "unknown role 'narrator'",
    ),
    "system-turn-not-first": (
        Sample(id="bad-8", turns=(user("Hi?"), Turn(role="system", text="Be brief."))),
        {},
        "turns[1].role",
        "must come first",
    ),
    "system-turn-under-plain": (
        Sample(id="bad-9", turns=(Turn(role="system", text="Be brief."), assistant("red"))),
        {"template": "plain"},
        "turns[0].role",
        "no system prompt",
    ),
}


@pytest.mark.parametrize("case", BAD_SAMPLES.values(), ids=BAD_SAMPLES.keys())
def test_bad_samples_raise_naming_the_sample_and_the_field(tok, case):
    sample, kwargs, field, problem = case
    kwargs = {"template": "v1", "tokens_per_image": P, **kwargs}
    with pytest.raises(BadRecordError) as error:
        tokenize_sample(sample, tok, **kwargs)
    assert (error.value.record_id, error.value.field) == (sample.id, field)
    message = str(error.value)
    assert repr(sample.id) in message and repr(field) in message and problem in message


def test_too_long_error_states_the_length(tok):
    length = len(tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P).tokens)
    with pytest.raises(BadRecordError, match=f"{length} tokens"):
        tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P, max_length=20)


def test_bad_arguments_raise_value_error(tok):
    with pytest.raises(ValueError, match="unknown template 'v2'"):
        tokenize_sample(TWO_TURN_VQA, tok, template="v2", tokens_per_image=P)
    with pytest.raises(ValueError, match="tokens_per_image"):
        tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=0)


def test_v1_generation_prompt_is_the_training_sequence_up_to_the_final_assistant_marker(tok):
    prompt = prompt_for_generation(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P)
    full = tokenize_sample(TWO_TURN_VQA, tok, template="v1", tokens_per_image=P).tokens
    assert prompt.dtype == np.int32
    assert prompt[-1] == ASSISTANT and prompt[-2:].tolist() == tok.encode(" ") + [ASSISTANT]
    assert prompt.tolist() == full[: len(prompt)].tolist()
    assert full[len(prompt) :].tolist() == tok.encode(" yes") + [EOS]
    assert prompt.tolist().count(ASSISTANT) == 2  # the earlier answer stays in the context


def test_generation_prompt_is_the_same_with_or_without_the_reference_answer(tok):
    unanswered = Sample(id="vqa-1", turns=TWO_TURN_VQA.turns[:-1], images=TWO_TURN_VQA.images)
    for template in ("v1", "plain"):
        with_answer = prompt_for_generation(
            TWO_TURN_VQA, tok, template=template, tokens_per_image=P
        )
        without = prompt_for_generation(unanswered, tok, template=template, tokens_per_image=P)
        np.testing.assert_array_equal(with_answer, without)


def test_v1_generation_prompt_matches_the_rendered_prompt_text(tok):
    sample = Sample(
        id="vqa-2",
        turns=(user("<image>\nWhat color is the shape?"), assistant("teal")),
        images=(b"png",),
    )
    rendered = f"{V1_SYSTEM_PROMPT} USER: <image>\nWhat color is the shape? ASSISTANT:"
    prompt = prompt_for_generation(sample, tok, template="v1", tokens_per_image=P)
    assert prompt.tolist() == encode_rendered(tok, rendered)


def test_plain_generation_prompt_is_bos_and_the_image(tok):
    sample = Sample(id="cap-1", turns=(user("<image>"), assistant("A red circle.")), images=(b"x",))
    prompt = prompt_for_generation(sample, tok, template="plain", tokens_per_image=P)
    assert prompt.tolist() == [BOS] + [IMAGE] * P
