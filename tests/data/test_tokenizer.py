"""The sentencepiece tokenizer: fixed special ids, exact round trips, byte fallback, errors."""

import itertools
import pathlib
import pickle
import subprocess
import sys

import pytest
import sentencepiece as spm

from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
VOCAB_SIZE = 384
COLORS = ("red", "green", "blue", "yellow", "black", "gray", "teal", "brown")
SHAPES = ("circle", "rectangle", "triangle")


def easy_vqa_like_texts() -> list[str]:
    texts = []
    for color, shape in itertools.product(COLORS, SHAPES):
        texts += [
            f"What color is the {shape}?",
            "What color is the shape?",
            f"Is the {shape} {color}?",
            f"Is there a {color} shape in the image?",
            f"What shape is the {color} object?",
            f"Does the image contain a {shape}?",
            f"A {color} {shape} on a white background.",
            f"The shape is {color}.",
            f"It is a {shape}.",
            color,
            shape,
            "yes",
            "no",
        ]
    return texts


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return train_tokenizer(
        easy_vqa_like_texts(), str(tmp_path_factory.mktemp("tok") / "m"), VOCAB_SIZE
    )


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer.load(model_path)


def test_special_tokens_have_the_project_ids(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 2, 3, 4)
    assert (tok.user_id, tok.assistant_id) == (5, 6)
    pieces = [tok.id_to_piece(i) for i in range(7)]
    assert pieces == ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
    assert tok.encode("<image>") == [4]
    assert tok.encode("USER:") == [5]
    assert tok.encode("ASSISTANT:") == [6]


def test_vocab_size_is_at_most_the_request_and_holds_the_byte_pieces(tok):
    assert 7 + 256 < tok.vocab_size <= VOCAB_SIZE
    assert tok.id_to_piece(7) == "<0x00>" and tok.id_to_piece(262) == "<0xFF>"


def test_corpus_words_are_learned_pieces(tok):
    assert len(tok.encode(" circle")) == 1
    assert all(i > 262 for i in tok.encode("What color is the shape?"))


@pytest.mark.parametrize(
    "text",
    [
        "What color is the triangle?",
        " leading space, two  spaces and a trailing one ",
        "line one\nline two\ttab",
        "USER: <image>\nIs the circle red? ASSISTANT: yes",
        "</s> is plain text here",
    ],
)
def test_encode_decode_round_trip_is_exact_without_bos_or_eos(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eos_id not in ids


def test_image_placeholder_is_one_token_wherever_it_stands(tok):
    ids = tok.encode("a<image>b <image>\nc")
    assert ids.count(4) == 2
    assert tok.decode(ids) == "a<image>b <image>\nc"
    assert tok.encode("x <image>") == tok.encode("x ") + [4]


def test_byte_fallback_encodes_unseen_characters_without_unk(tok):
    ids = tok.encode("é→")
    assert ids == [7 + b for b in "é→".encode()]
    assert tok.decode(ids) == "é→"
    assert 1 not in tok.encode("naïve 形状 🟥")


def test_decode_skips_padding_bos_and_eos(tok):
    ids = tok.encode("Is the circle red?")
    assert tok.decode([0, 2, *ids, 3, 0, 0]) == "Is the circle red?"


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=r"outside \[0, "):
        tok.decode([5, tok.vocab_size])


def test_training_is_deterministic(tok, tmp_path):
    again = Tokenizer.load(train_tokenizer(easy_vqa_like_texts(), str(tmp_path / "m"), VOCAB_SIZE))
    assert again.vocab_size == tok.vocab_size
    assert [again.id_to_piece(i) for i in range(again.vocab_size)] == [
        tok.id_to_piece(i) for i in range(tok.vocab_size)
    ]


def test_texts_over_the_length_limit_are_skipped_with_a_warning(tmp_path, caplog):
    texts = [*easy_vqa_like_texts(), "é" * 600]
    path = train_tokenizer(texts, str(tmp_path / "m"), VOCAB_SIZE, max_sentence_length=1000)
    assert "skipped 1 texts longer than max_sentence_length 1000" in caplog.text
    assert len(Tokenizer.load(path).encode("é")) == 2  # never seen: byte fallback


def test_tokenizer_survives_pickling_for_grain_workers(tok):
    copy = pickle.loads(pickle.dumps(tok))
    text = "<image>\nWhat shape is the teal object?"
    assert copy.encode(text) == tok.encode(text)


def test_load_of_a_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.model"
    with pytest.raises(FileNotFoundError, match="nowhere.model"):
        Tokenizer.load(missing)


@pytest.mark.parametrize(
    "options, problem",
    [
        ({}, "id 0 is '<unk>', expected '<pad>'"),
        (
            {
                "pad_id": 0,
                "unk_id": 1,
                "bos_id": 2,
                "eos_id": 3,
                "control_symbols": ["<image>", "USER:", "ASSISTANT:"],
            },
            "'<image>' is not a user-defined symbol",
        ),
    ],
    ids=["sentencepiece-defaults", "markers-as-control-symbols"],
)
def test_load_rejects_a_model_without_the_special_tokens(tmp_path, options, problem):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(easy_vqa_like_texts()),
        model_prefix=str(tmp_path / "other"),
        vocab_size=60,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    with pytest.raises(ValueError, match="other.model") as error:
        Tokenizer.load(tmp_path / "other.model")
    assert problem in str(error.value)


def test_training_rejects_an_empty_corpus_and_a_vocab_below_the_byte_pieces(tmp_path):
    with pytest.raises(ValueError, match="no usable texts"):
        train_tokenizer(["", ""], str(tmp_path / "m"), VOCAB_SIZE)
    with pytest.raises(ValueError, match="byte fallback"):
        train_tokenizer(["red"], str(tmp_path / "m"), 128)


def test_train_tokenizer_tool_trains_from_text_files_and_reports(tmp_path):
    texts = easy_vqa_like_texts()
    (tmp_path / "a.txt").write_text("\n".join(texts[:100]) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n".join(texts[100:]) + "\n", encoding="utf-8")
    prefix = tmp_path / "out" / "tok"
    result = subprocess.run(
        [
            sys.executable, "tools/train_tokenizer.py", "--output", str(prefix),
            "--vocab_size", str(VOCAB_SIZE),
            "--text_file", str(tmp_path / "a.txt"), "--text_file", str(tmp_path / "b.txt"),
        ],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    trained = Tokenizer.load(f"{prefix}.model")
    assert f"vocab size: {trained.vocab_size}" in result.stdout
    assert "'USER:', '▁', '<image>'" in result.stdout
