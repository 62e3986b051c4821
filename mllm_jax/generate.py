"""Answer questions about images with a saved or imported model: a Python API and a command line.

  python -m mllm_jax.generate --model_dir runs/demo/model --image cat.png \
      --question "what shape is in the image?"
  python -m mllm_jax.generate --hf_dir llava-1.5-7b-hf --image cat.png --question "what is this?"

``--model_dir`` is a model this project saved (``models/saved_model.py``), ``--hf_dir`` a llava-hf
checkpoint directory (``imported_llava.py``: its own tokenizer, image processor and, by default,
the chat template its tokenizer implies). The question becomes a one-turn chat (``<image>`` +
newline + question) whose assistant turn the model writes, greedily or with temperature / top-p
sampling, until EOS or the template's end-of-turn token.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mllm_jax.command_line import run_command
from mllm_jax.data.hf_image_processor import HFImageProcessor
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.sample import IMAGE_PLACEHOLDER, BadRecordError, Sample, Turn
from mllm_jax.data.templates import V1_SYSTEM_PROMPT, prompt_for_generation
from mllm_jax.data.tokenizer import Tokenizer
from mllm_jax.imported_llava import load_imported_llava
from mllm_jax.json_files import read_json
from mllm_jax.models.decoder_lm import DecoderLM
from mllm_jax.models.generation import generate
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.models.saved_model import load_image_preprocessing, load_model, load_tokenizer


def _image_layout(tokens: np.ndarray, image_id: int, per_image: int) -> tuple[np.ndarray, ...]:
    """image_slot and image_patch [T] of one prompt (the k-th run of image ids is slot k)."""
    slot = np.full(len(tokens), -1, np.int32)
    patch = np.full(len(tokens), -1, np.int32)
    positions = np.flatnonzero(tokens == image_id)
    run = np.arange(len(positions))
    slot[positions] = run // per_image
    patch[positions] = run % per_image
    return slot, patch


def prompt_batch(
    config: MultimodalConfig,
    tokenizer: Tokenizer,
    images: Sequence[Sequence[bytes]],
    questions: Sequence[str | np.ndarray],
    *,
    template: str = "v1",
    system_prompt: str | None = V1_SYSTEM_PROMPT,
    zero_images: bool = False,
    length_multiple: int = 1,
    num_slots: int | None = None,
    preprocessing: ImagePreprocessing | HFImageProcessor | None = None,
) -> dict[str, np.ndarray]:
    """Left-padded prompt arrays for ``answer_questions``.

    Returns tokens and mask [B, T], image_slot and image_patch [B, T], images [B, M, H, W, 3]
    and image_mask [B, M]. A question without ``<image>`` gets one placeholder per image
    prepended (then a newline); a question given as an int array is an already templated prompt
    (e.g. a document prefix) used as is. ``zero_images`` replaces every preprocessed image by
    zeros. T is rounded up to a multiple of ``length_multiple`` and M is ``num_slots`` when
    given, so batches of similar prompts share one compiled program. ``preprocessing`` prepares
    the images (default: resized to the tower's ``image_size``, normalised with 0.5 / 0.5).
    ``system_prompt`` None is the template's own default.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} image lists for {len(questions)} questions")
    per_image = config.tokens_per_image
    preprocess = preprocessing or ImagePreprocessing(size=config.vision.image_size)
    prompts, layouts, pixels = [], [], []
    for index, (encoded, question) in enumerate(zip(images, questions, strict=True)):
        if isinstance(question, np.ndarray):
            tokens = question.astype(np.int32)  # an already templated prompt
        else:
            if IMAGE_PLACEHOLDER not in question:
                question = IMAGE_PLACEHOLDER * len(encoded) + "\n" + question
            sample = Sample(
                id=f"question[{index}]",
                turns=(Turn(role="user", text=question),),
                images=tuple(encoded),
            )
            tokens = prompt_for_generation(
                sample,
                tokenizer,
                template=template,
                tokens_per_image=per_image,
                system_prompt=system_prompt,
            )
        if int(np.sum(tokens == tokenizer.image_id)) != len(encoded) * per_image:
            raise ValueError(
                f"question[{index}]: the prompt holds {np.sum(tokens == tokenizer.image_id)} "
                f"image tokens but {len(encoded)} images x {per_image} tokens were given"
            )
        prompts.append(tokens)
        layouts.append(_image_layout(tokens, tokenizer.image_id, per_image))
        pixels.append(
            [preprocess(b, f"question[{index}]", f"images[{i}]") for i, b in enumerate(encoded)]
        )
    batch, length = len(prompts), max(len(p) for p in prompts)
    length = -(-length // length_multiple) * length_multiple
    slots = max(1, max(len(p) for p in pixels))
    if num_slots is not None:
        if num_slots < slots:
            raise ValueError(f"num_slots={num_slots} but a question has {slots} images")
        slots = num_slots
    size = config.vision.image_size
    arrays = {
        "tokens": np.full((batch, length), tokenizer.pad_id, np.int32),
        "mask": np.zeros((batch, length), bool),
        "image_slot": np.full((batch, length), -1, np.int32),
        "image_patch": np.full((batch, length), -1, np.int32),
        "images": np.zeros((batch, slots, size, size, 3), np.float32),
        "image_mask": np.zeros((batch, slots), bool),
    }
    for row, (prompt, (slot, patch), row_pixels) in enumerate(
        zip(prompts, layouts, pixels, strict=True)
    ):
        start = length - len(prompt)  # left padding: every row's next token is at `length`
        arrays["tokens"][row, start:], arrays["mask"][row, start:] = prompt, True
        arrays["image_slot"][row, start:], arrays["image_patch"][row, start:] = slot, patch
        for k, image in enumerate(row_pixels):
            arrays["images"][row, k] = 0.0 if zero_images else image
            arrays["image_mask"][row, k] = True
    return arrays


def _check_context(
    prompt_lengths: np.ndarray, max_new_tokens: int, context_length: int, *, strict: bool = True
) -> None:
    """A ValueError (``strict``) or a warning naming a question whose prompt plus answer
    exceeds ``context_length``."""
    for index, length in enumerate(prompt_lengths):
        if length + max_new_tokens <= context_length:
            continue
        problem = (
            f"question[{index}]: a prompt of {length} tokens (image tokens included) plus "
            f"max_new_tokens={max_new_tokens} is {length + max_new_tokens} tokens, more than "
        )
        if strict:
            raise ValueError(problem + f"the model's context of {context_length}")
        logging.warning(
            "%sthe %d tokens the model was trained on; its answer may degrade",
            problem,
            context_length,
        )


@functools.partial(jax.jit, static_argnames=("config",))
def _input_embeddings(config, params, tokens, images, image_slot, image_patch):
    model = MultimodalLM(config)
    return model.apply(
        {"params": params}, tokens, images, image_slot, image_patch,
        method=model.input_embeddings,
    )  # fmt: skip


def answer_questions(
    config: MultimodalConfig,
    params: Any,
    tokenizer: Tokenizer,
    images: Sequence[Sequence[bytes]],
    questions: Sequence[str],
    *,
    template: str = "v1",
    system_prompt: str | None = V1_SYSTEM_PROMPT,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    zero_images: bool = False,
    length_multiple: int = 1,
    num_slots: int | None = None,
    preprocessing: ImagePreprocessing | HFImageProcessor | None = None,
    stop_ids: Sequence[int] | None = None,
    context_length: int | None = None,
    trained_length: int | None = None,
) -> list[str]:
    """One answer per question; ``images[i]`` are the encoded images question i refers to.

    Prompts and images as ``prompt_batch``; ``zero_images`` is the vision-blind control. An
    answer ends at any of ``stop_ids`` (default: the tokenizer's EOS), which it leaves out.
    A prompt whose length plus ``max_new_tokens`` exceeds ``trained_length`` (the longest
    sequence the model was trained on, when given) is answered with a warning.

    Raises:
      ValueError: among others, a prompt whose length plus ``max_new_tokens`` exceeds
        ``context_length`` (when given), naming the numbers.
    """
    if config.fusion == "late":
        raise ValueError("a late-fusion model has no language-model head to answer with")
    arrays = prompt_batch(
        config, tokenizer, images, questions, template=template, system_prompt=system_prompt,
        zero_images=zero_images, length_multiple=length_multiple, num_slots=num_slots,
        preprocessing=preprocessing,
    )  # fmt: skip
    if context_length is not None:
        _check_context(arrays["mask"].sum(axis=1), max_new_tokens, context_length)
    if trained_length is not None:
        _check_context(arrays["mask"].sum(axis=1), max_new_tokens, trained_length, strict=False)
    stop_ids = (tokenizer.eos_id,) if stop_ids is None else tuple(stop_ids)
    tokens, mask = jnp.asarray(arrays["tokens"]), jnp.asarray(arrays["mask"])
    image_array, image_mask = arrays["images"], arrays["image_mask"]
    image_slot, image_patch = arrays["image_slot"], arrays["image_patch"]
    batch, slots = image_mask.shape
    per_image = config.tokens_per_image
    model = MultimodalLM(config)
    variables = {"params": params}
    cross = None
    if config.fusion == "cross_attention":
        embeddings = model.apply(variables, tokens, method=lambda m, t: m.lm.embed(t))
        context = model.apply(variables, jnp.asarray(image_array), method=model.encode_images)
        context = context.reshape(batch, slots * per_image, -1)
        cross = (context, jnp.asarray(np.repeat(image_mask, per_image, axis=1)))
    else:
        embeddings = _input_embeddings(
            config, params, tokens, jnp.asarray(image_array), jnp.asarray(image_slot),
            jnp.asarray(image_patch),
        )  # fmt: skip
    lm = DecoderLM(
        vocab_size=config.vocab_size,
        embed_dim=config.embed_dim,
        transformer=config.transformer,
        tie_embeddings=config.tie_embeddings,
    )
    result = generate(
        lm, params["lm"], embeddings, mask, max_new_tokens=max_new_tokens,
        eos_id=stop_ids, pad_id=tokenizer.pad_id, rng=jax.random.key(seed),
        temperature=temperature, top_p=top_p, cross=cross,
    )  # fmt: skip
    answers = []
    for row, count in zip(result.tokens, result.lengths, strict=True):
        ids = [int(t) for t in row[:count] if int(t) not in stop_ids]
        answers.append(tokenizer.decode(ids).strip())
    return answers


PROMPT_FILE = "prompt.json"
"""Saved-model file: {"template": ..., "system_prompt": ..., "trained_length": ...} the model
was trained with (``trained_length``, the longest training sequence, may be absent)."""


def saved_prompt(model_dir: str | pathlib.Path) -> dict[str, Any]:
    """The template and system prompt a saved model was trained with (``PROMPT_FILE``); the
    ``v1`` template with its default system prompt for a model saved without one."""
    prompt = {"template": "v1", "system_prompt": V1_SYSTEM_PROMPT}
    prompt_file = pathlib.Path(model_dir) / PROMPT_FILE
    if prompt_file.exists():
        prompt |= read_json(prompt_file)
    return prompt


FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Directory written by models.saved_model.save_model.")
flags.DEFINE_string(
    "hf_dir",
    None,
    "A llava-hf checkpoint directory (config.json, *.safetensors, tokenizer files, "
    "preprocessor_config.json); give this or --model_dir.",
)
flags.DEFINE_multi_string("image", [], "Image file(s) the question is about.")
flags.DEFINE_string("question", None, "The question.")
flags.DEFINE_string(
    "template",
    None,
    "Chat template (default: --model_dir's prompt.json, else v1; for --hf_dir the one its "
    "tokenizer implies: llama3, chatml, else llava_v1).",
)
flags.DEFINE_string(
    "system_prompt",
    None,
    "System prompt (default: --model_dir's prompt.json, else the template's own).",
)
flags.DEFINE_integer("max_new_tokens", 32, "Longest answer.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--hf_dir weights and compute.")


def _check_image_path(path: str) -> None:
    if pathlib.Path(path).is_dir():
        raise app.UsageError(f"--image {path!r} is a directory; give an image file")
    if not pathlib.Path(path).is_file():
        raise app.UsageError(f"--image {path!r} does not exist")


def _read_images(
    paths: Sequence[str], preprocessing: ImagePreprocessing | HFImageProcessor
) -> list[bytes]:
    """The encoded images, each checked to decode (UsageError naming the file otherwise)."""
    encoded = []
    for path in paths:
        _check_image_path(path)
        encoded.append(pathlib.Path(path).read_bytes())
        try:
            preprocessing(encoded[-1], path, "--image")
        except BadRecordError as err:
            raise app.UsageError(f"--image {path!r}: {err.problem}") from err
    return encoded


def _answer(argv: Sequence[str]) -> str:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if (FLAGS.model_dir is None) == (FLAGS.hf_dir is None):
        raise app.UsageError(
            "give exactly one of --model_dir (a model saved by this project) and --hf_dir "
            "(a llava-hf checkpoint directory)"
        )
    if FLAGS.question is None or not FLAGS.question.strip():
        raise app.UsageError("--question is required and must not be empty")
    if FLAGS.max_new_tokens < 1:
        raise app.UsageError(f"--max_new_tokens={FLAGS.max_new_tokens} must be >= 1")
    if FLAGS.temperature < 0:
        raise app.UsageError(f"--temperature={FLAGS.temperature} must be >= 0 (0: greedy)")
    if not 0 < FLAGS.top_p <= 1:
        raise app.UsageError(f"--top_p={FLAGS.top_p} must be in (0, 1]")
    for path in FLAGS.image:  # before a model, possibly large, is loaded
        _check_image_path(path)
    sampling = dict(
        max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
        seed=FLAGS.seed,
    )  # fmt: skip
    if FLAGS.hf_dir is not None:
        imported = load_imported_llava(
            FLAGS.hf_dir, template=FLAGS.template, dtype=jnp.dtype(FLAGS.dtype)
        )
        encoded = _read_images(FLAGS.image, imported.image_processor)
        (answer,) = answer_questions(
            imported.config, imported.params, imported.tokenizer, [encoded], [FLAGS.question],
            template=imported.template, system_prompt=FLAGS.system_prompt,
            preprocessing=imported.image_processor, stop_ids=imported.stop_ids,
            context_length=imported.context_length, **sampling,
        )  # fmt: skip
        return answer
    config, params, tokenizer_path = load_model(FLAGS.model_dir)
    preprocessing = load_image_preprocessing(FLAGS.model_dir, config)
    encoded = _read_images(FLAGS.image, preprocessing)
    prompt = saved_prompt(FLAGS.model_dir)
    if FLAGS.template is not None:
        prompt["template"] = FLAGS.template
    if FLAGS.system_prompt is not None:
        prompt["system_prompt"] = FLAGS.system_prompt
    (answer,) = answer_questions(
        config, params, load_tokenizer(tokenizer_path), [encoded], [FLAGS.question],
        template=prompt["template"], system_prompt=prompt["system_prompt"],
        preprocessing=preprocessing, trained_length=prompt.get("trained_length"), **sampling,
    )  # fmt: skip
    return answer


def main(argv: Sequence[str]) -> None:
    """Prints the answer; a model, file or prompt that cannot be used exits naming the problem."""
    try:
        answer = _answer(argv)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(answer)


def run() -> None:
    """The ``mllm-generate`` command."""
    run_command(main)


if __name__ == "__main__":
    run()
