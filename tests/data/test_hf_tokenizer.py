"""HFTokenizer: special ids read from the files (checked against transformers and sentencepiece),
encoding as transformers encodes, round trips, pickling, and errors naming the file and field."""

import json
import pickle

import numpy as np
import pytest

pytest.importorskip("transformers")

from tiny_hf_tokenizers import save_byte_level, save_metaspace, save_sentencepiece

from mllm_jax.data.hf_tokenizer import HFTokenizer

TEXT = "What color is the shape?\nThe shape is red. Tell me 1, 2 or 3; 'quotes' too."


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama3")
    reference = save_byte_level(
        directory,
        chat_template="",
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
    )
    return HFTokenizer.load(directory), reference, directory


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava")
    reference = save_metaspace(directory)
    return HFTokenizer.load(directory), reference


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sentencepiece")
    return directory, save_sentencepiece(directory)


def test_special_ids_equal_those_transformers_reads(llama3, llava):
    for tok, reference in (llama3[:2], llava):
        assert tok.bos_id == reference.bos_token_id
        assert tok.eos_id == reference.eos_token_id
        assert tok.image_id == reference.convert_tokens_to_ids("<image>")
        assert tok.vocab_size == len(reference)
    llava_tok, llava_reference = llava
    assert llava_tok.pad_id == llava_reference.pad_token_id
    assert llava_tok.unk_id == llava_reference.unk_token_id
    for token in ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|eot_id|>"):
        assert llama3[0].special_id(token) == llama3[1].convert_tokens_to_ids(token)
        assert llama3[0].special_tokens[token] == llama3[0].special_id(token)


def test_encode_equals_transformers_and_decode_round_trips(llama3, llava):
    for tok, reference in (llama3[:2], llava):
        ids = tok.encode(TEXT)
        assert ids == reference.encode(TEXT, add_special_tokens=False)
        assert tok.decode(ids) == reference.decode(ids)
    tok = llama3[0]
    assert tok.decode(tok.encode(TEXT)) == TEXT  # byte-level BPE is lossless
    # BOS/EOS/padding decode to nothing; other special tokens to their text.
    ids = [tok.bos_id, *tok.encode("red<|im_end|>"), tok.eos_id]
    assert tok.decode(np.asarray(ids)) == "red<|im_end|>"
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_offsets_locate_every_token(llama3, llava):
    cases = (
        (llama3[0], "<|im_start|>user\n<image>What color?<|im_end|>", "<|im_start|>"),
        (llava[0], "<s>USER: <image>\nWhat color?</s>", "<s>"),
    )
    for tok, text, first in cases:
        ids, offsets = tok.encode_with_offsets(text)
        assert ids == tok.encode(text)
        assert text[slice(*offsets[0])] == first
        assert text[slice(*offsets[ids.index(tok.image_id)])] == "<image>"
        assert all(0 <= a <= b <= len(text) for a, b in offsets)
        assert "".join(text[a:b] for a, b in offsets) == text


def test_missing_tokens_raise_naming_the_field(llama3, tmp_path):
    tok, _, directory = llama3
    with pytest.raises(ValueError, match="no pad token.*'pad_token'"):
        _ = tok.pad_id
    with pytest.raises(ValueError, match="no special token '<s>'"):
        tok.special_id("<s>")
    assert HFTokenizer.load(directory, pad_token="<|end_of_text|>").pad_id == tok.special_id(
        "<|end_of_text|>"
    )
    config = json.loads((directory / "tokenizer_config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_bytes((directory / "tokenizer.json").read_bytes())
    (broken / "tokenizer_config.json").write_text(json.dumps(config | {"image_token": "<img>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json field 'image_token'.*'<img>'"):
        HFTokenizer.load(broken)
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer.load(broken)


def test_directory_without_tokenizer_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json.*tokenizer.model"):
        HFTokenizer.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer.load(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer.json"):
        HFTokenizer.load(tmp_path)


def test_sentencepiece_directory_reads_the_added_tokens_and_both_configs(sentencepiece_dir):
    directory, processor = sentencepiece_dir
    tok = HFTokenizer.load(directory)
    size = processor.get_piece_size()
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    # special_tokens_map.json wins over tokenizer_config.json's null pad_token.
    assert (tok.image_id, tok.pad_id, tok.vocab_size) == (size, size + 1, size + 2)
    assert tok.encode(TEXT) == processor.encode(TEXT)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    # Text between added tokens is encoded stretch by stretch (the legacy slow tokenizer).
    text = "<s>What color</s>USER: <image>\nred"
    expected = [1, *processor.encode("What color"), 2, *processor.encode("USER: "), size]
    assert tok.encode(text) == expected + processor.encode("\nred")
    ids, offsets = tok.encode_with_offsets(text)
    found = [text[a:b] for (a, b), i in zip(offsets, ids, strict=True) if i in (1, 2, size)]
    assert found == ["<s>", "</s>", "<image>"]


def test_pickled_tokenizers_encode_the_same(llama3, sentencepiece_dir):
    for tok in (llama3[0], HFTokenizer.load(sentencepiece_dir[0])):
        again = pickle.loads(pickle.dumps(tok))
        assert again.encode(TEXT) == tok.encode(TEXT)
        assert again.image_id == tok.image_id and again.decode(tok.encode(TEXT)) == tok.decode(
            tok.encode(TEXT)
        )
