"""Answering with an imported llava-hf directory equals transformers' LLaVA, by the API and the CLI.

A tiny random LLaVA (CLIP tower, 16 tokens per image; Llama LM over a tiny "▁" BPE tokenizer with
``<image>``) is saved with its tokenizer and a CLIP ``preprocessor_config.json``. The reference
prompt is the Vicuna v1 chat template rendered by the transformers tokenizer and run through
``LlavaProcessor`` (image token expansion, pixel values); the reference answer is
``model.generate(do_sample=False, max_new_tokens=8)``. Prompt ids and generated ids must be equal;
pixels agree to 1e-6 (the same arithmetic).
"""

import io
import types

import numpy as np
import pytest
from absl import app, flags
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mllm_jax import generate as generate_cli  # noqa: E402
from mllm_jax.data.hf_tokenizer import HFTokenizer  # noqa: E402
from mllm_jax.data.templates import V1_SYSTEM_PROMPT  # noqa: E402
from mllm_jax.generate import answer_questions, prompt_batch  # noqa: E402
from mllm_jax.imported_llava import default_template, load_imported_llava, stop_ids  # noqa: E402
from tests.data.tiny_hf_tokenizers import CHATML_JINJA, save_byte_level, save_metaspace  # noqa: E402

QUESTION = "What color is the shape?"
NEW_TOKENS, CONTEXT = 8, 256


class RecordingTokenizer(HFTokenizer):
    """An HFTokenizer that keeps the ids of every answer it decodes."""

    decoded: list[list[int]]

    def decode(self, ids):
        self.decoded.append([int(i) for i in ids])
        return super().decode(ids)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """(directory, image file, encoded image, reference prompt ids [T], reference NCHW pixels,
    reference new ids [NEW_TOKENS])."""
    directory = tmp_path_factory.mktemp("llava-hf")
    hf_tokenizer = save_metaspace(directory)
    image_token = hf_tokenizer.convert_tokens_to_ids("<image>")
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8,
        ),
        text_config=transformers.LlamaConfig(
            vocab_size=len(hf_tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=0.1, max_position_embeddings=CONTEXT,
        ),
        image_token_index=image_token,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(directory)
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    image_processor.save_pretrained(directory)
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (45, 37, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    image_file = directory.parent / "shape.png"
    image_file.write_bytes(buffer.getvalue())

    text = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\n" + QUESTION}],
        add_generation_prompt=True, tokenize=False, default_system=V1_SYSTEM_PROMPT,
    )  # fmt: skip
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=hf_tokenizer, patch_size=8,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
    )  # fmt: skip
    inputs = processor(images=Image.open(image_file), text=text, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=NEW_TOKENS)
    prompt = inputs["input_ids"][0].numpy()
    new_ids = output[0, len(prompt) :].tolist()
    return directory, image_file, buffer.getvalue(), prompt, inputs["pixel_values"].numpy(), new_ids


@pytest.fixture(scope="module")
def imported(llava):
    return load_imported_llava(llava[0])


def _answer_ids(imported, encoded, **options) -> tuple[list[int], str]:
    tokenizer = RecordingTokenizer.load(imported.tokenizer.name)
    tokenizer.decoded = []
    (answer,) = answer_questions(
        imported.config, imported.params, tokenizer, [[encoded]], [QUESTION],
        template=imported.template, system_prompt=None,
        preprocessing=imported.image_processor, context_length=imported.context_length,
        max_new_tokens=NEW_TOKENS, **options,
    )  # fmt: skip
    (ids,) = tokenizer.decoded
    return ids, answer


def test_prompt_ids_and_pixels_equal_llava_processor(llava, imported):
    _, _, encoded, reference_prompt, reference_pixels, _ = llava
    assert imported.template == "llava_v1" and imported.context_length == CONTEXT
    assert imported.stop_ids == (imported.tokenizer.eos_id,)
    arrays = prompt_batch(
        imported.config, imported.tokenizer, [[encoded]], [QUESTION],
        template=imported.template, system_prompt=None, preprocessing=imported.image_processor,
    )  # fmt: skip
    np.testing.assert_array_equal(arrays["tokens"][0], reference_prompt)
    expected = reference_pixels[0].transpose(1, 2, 0)
    assert np.max(np.abs(arrays["images"][0, 0] - expected)) <= 1e-6


def test_greedy_answer_ids_equal_transformers_generate(llava, imported):
    reference = llava[-1]
    stop = imported.stop_ids
    until_stop = next((i for i, t in enumerate(reference) if t in stop), len(reference))
    ids, answer = _answer_ids(imported, llava[2], stop_ids=stop)
    assert ids == reference[:until_stop] and len(ids) > 2, (ids, reference)
    assert answer == imported.tokenizer.decode(ids).strip()
    # A third stop id (here the reference's third token) ends the answer before it.
    early, _ = _answer_ids(imported, llava[2], stop_ids=(*stop, reference[2]))
    assert early == reference[:2]


def _run_main(capsys, *args: str) -> str:
    flags.FLAGS(["mllm-generate", *args])
    try:
        generate_cli.main(["mllm-generate"])
    finally:
        flags.FLAGS.unparse_flags()
    return capsys.readouterr().out


def test_command_line_prints_the_api_answer(llava, imported, capsys):
    directory, image_file, encoded, *_ = llava
    _, expected = _answer_ids(imported, encoded, stop_ids=imported.stop_ids)
    out = _run_main(
        capsys, "--hf_dir", str(directory), "--image", str(image_file), "--question", QUESTION,
        "--max_new_tokens", str(NEW_TOKENS),
    )  # fmt: skip
    assert out.removesuffix("\n") == expected


def test_command_line_errors_name_the_problem(llava, capsys, tmp_path):
    directory, image_file = str(llava[0]), str(llava[1])
    common = ("--image", image_file, "--question", QUESTION)
    with pytest.raises(app.UsageError, match="exactly one of --model_dir"):
        _run_main(capsys, *common)
    with pytest.raises(app.UsageError, match="exactly one of --model_dir"):
        _run_main(capsys, "--hf_dir", directory, "--model_dir", directory, *common)
    with pytest.raises(app.UsageError, match="must not be empty"):
        _run_main(capsys, "--hf_dir", directory, "--image", image_file, "--question", "  ")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(app.UsageError, match=r"broken\.png.*cannot decode"):
        _run_main(capsys, "--hf_dir", directory, "--image", str(broken), "--question", QUESTION)
    with pytest.raises(SystemExit, match="LLaVA directory .* does not exist"):
        _run_main(capsys, "--hf_dir", str(tmp_path / "absent"), *common)
    with pytest.raises(SystemExit, match=r"no Hugging Face config\.json"):
        _run_main(capsys, "--hf_dir", str(tmp_path), *common)
    with pytest.raises(SystemExit, match="choose one of"):
        _run_main(capsys, "--hf_dir", directory, "--template", "v1", *common)
    too_long = r"prompt of \d+ tokens .* max_new_tokens=300 .* context of 256"
    with pytest.raises(SystemExit, match=too_long):
        _run_main(capsys, "--hf_dir", directory, *common, "--max_new_tokens", "300")


def test_default_template_and_stop_ids_follow_the_tokenizer(llava, tmp_path):
    assert default_template(HFTokenizer.load(llava[0])) == "llava_v1"
    save_byte_level(tmp_path, chat_template=CHATML_JINJA, eos_token="<|end_of_text|>")
    byte_level = HFTokenizer.load(tmp_path)  # knows both Llama 3's and ChatML's tokens
    assert default_template(byte_level) == "llama3"
    chatml_only = types.SimpleNamespace(special_tokens={"<|im_start|>": 1, "<|im_end|>": 2})
    assert default_template(chatml_only) == "chatml"
    eos, eot, im_end = (
        byte_level.special_id(t) for t in ("<|end_of_text|>", "<|eot_id|>", "<|im_end|>")
    )
    assert stop_ids(byte_level, "llama3") == (eos, eot)
    assert stop_ids(byte_level, "chatml", [im_end, eos, 500]) == (eos, im_end, 500)
    assert stop_ids(byte_level, "llava_v1") == (eos,)
