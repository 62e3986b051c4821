"""Tiny Hugging Face tokenizer directories built inside the tests (no hub, no network).

  save_byte_level   a byte-level BPE (Llama 3 / Qwen2 style) saved by ``transformers``
  save_metaspace    a "▁" BPE (Llama 2 / llava-hf style) saved by ``transformers``
  save_sentencepiece  a sentencepiece ``tokenizer.model`` with hand-written v4-style configs

and the standard Jinja chat templates the templates are checked against.
"""

import io
import json
import pathlib

import sentencepiece as spm
import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "You are a careful assistant. You are a helpful assistant.",
    "What color is the shape? The shape is red. Is it a circle? No, it is a triangle.",
    "USER: ASSISTANT: Describe the image. A green circle on a white background.",
    "Tell me 1, 2 or 3. Hello\nworld\n\n  indented text; quotes 'single' \"double\".",
]

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eot_id|>",
]  # fmt: skip
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Llama 3's pre-tokenizer split (Qwen2's differs only in splitting digits one by one): a run of
# newlines is one piece whatever follows, so a header's "\n\n" tokenizes alike with and without
# the answer after it.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Meta-Llama-3-8B-Instruct's template.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
# Qwen2-Instruct's template.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LLaVA-1.5's conv_vicuna_v1 (sep " ", sep2 "</s>"), BOS from the tokenizer.
VICUNA_V1_JINJA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{{ default_system + ' ' }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _train(tokenizer: tokenizers.Tokenizer, specials: list[str], **trainer_kwargs) -> None:
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False, **trainer_kwargs
    )
    tokenizer.train_from_iterator(CORPUS * 3, trainer)


def save_byte_level(
    directory: pathlib.Path, *, chat_template: str, **special_tokens: str | None
) -> PreTrainedTokenizerFast:
    """A Llama-3-style byte-level BPE knowing the Llama 3, ChatML and ``<image>`` tokens, saved to
    ``directory`` with ``special_tokens`` (bos_token=..., ...); returns the transformers
    tokenizer (the reference)."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    _train(tokenizer, LLAMA3_SPECIALS + CHATML_SPECIALS + ["<image>"], initial_alphabet=alphabet)
    reference = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens)
    reference.chat_template = chat_template
    reference.save_pretrained(directory)
    return reference


def save_metaspace(directory: pathlib.Path) -> PreTrainedTokenizerFast:
    """A Llama-2-style "▁" BPE with llava-hf's special tokens (``<image>``, ``<pad>``) and
    the Vicuna v1 chat template, saved to ``directory``; returns the transformers tokenizer."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    _train(tokenizer, ["<unk>", "<s>", "</s>", "<image>", "<pad>"])
    reference = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    reference.chat_template = VICUNA_V1_JINJA
    reference.save_pretrained(directory)
    return reference


def save_sentencepiece(directory: pathlib.Path) -> spm.SentencePieceProcessor:
    """A Llama-style sentencepiece model (unk 0, bos 1, eos 2, dummy prefix, byte fallback) as
    ``tokenizer.model``, with llava-1.5's ``<image>`` and ``<pad>`` added after its vocabulary
    in a transformers-4-style tokenizer_config.json and special_tokens_map.json; returns the
    sentencepiece processor (the reference)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 3),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        hard_vocab_limit=False,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    size = processor.get_piece_size()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())

    def token(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "special": True}

    config = {
        "added_tokens_decoder": {str(size): token("<image>"), str(size + 1): token("<pad>")},
        "bos_token": token("<s>"),
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    special_map = {"pad_token": token("<pad>"), "image_token": "<image>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map))
    return processor
