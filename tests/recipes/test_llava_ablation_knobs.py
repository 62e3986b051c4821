"""The recipe's ablation knobs without training: VQA set, stage-2 param groups, reuse, seeds."""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

from configs import llava_vce
from mllm_jax.data.images import ImagePreprocessing
from mllm_jax.data.packing import PackingSpec
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.models.multimodal_lm import MultimodalLM
from mllm_jax.recipes import llava_data, llava_demo, llava_models, llava_stage_dirs, llava_stages
from mllm_jax.train import checkpoint as checkpoint_lib
from mllm_jax.train.param_groups import make_grouped_optimizer
from mllm_jax.train.trainer import TrainTask


def test_the_default_reads_easy_vqa_in_the_order_it_always_did():
    config = llava_vce.get_config("size=test")
    assert llava_data.mixture(config.stage0_lm, config) == [("easy_vqa", 1.0), ("multi_image", 0.3)]
    assert llava_data.mixture(config.stage2, config) == [("easy_vqa", 1.0), ("multi_image", 0.1)]
    assert llava_data.prepared_datasets(config) == ("easy_vqa", "easy_vqa_captions", "multi_image")
    assert llava_data.flips_allowed(config)
    assert llava_data.data_options(config, "easy_vqa") == {"max_examples": 64}


def test_one_override_moves_stage2_and_evaluation_to_the_grid_set():
    config = llava_vce.get_config("size=test")
    config.data.vqa_dataset = "easy_vqa_grid"
    assert llava_data.mixture(config.stage2, config) == [
        ("easy_vqa_grid", 1.0),
        ("multi_image", 0.1),
    ]
    # Stage 0 keeps its text, so a base run's stage 0 serves both VQA sets.
    assert llava_data.mixture(config.stage0_lm, config) == [("easy_vqa", 1.0), ("multi_image", 0.3)]
    assert llava_data.prepared_datasets(config)[-1] == "easy_vqa_grid"
    assert llava_data.data_options(config, "easy_vqa_grid") == {
        "max_examples": 64, "train_size": 20_000, "test_size": 2_000, "image_size": 64,
    }  # fmt: skip
    assert not llava_data.flips_allowed(config)  # a flip swaps left and right


def test_an_unknown_vqa_set_or_a_doubly_named_source_is_rejected():
    config = llava_vce.get_config("size=test")
    config.data.vqa_dataset = "vqav2"
    with pytest.raises(ValueError, match="data.vqa_dataset='vqav2'"):
        llava_data.prepared_datasets(config)
    config.data.vqa_dataset = "easy_vqa"
    config.stage2.mixture.easy_vqa = 0.5
    with pytest.raises(ValueError, match="twice"):
        llava_data.mixture(config.stage2, config)


def _abstract_params(config) -> dict:
    model = MultimodalLM(llava_models.multimodal_config(config, with_adapter=True))
    spec = PackingSpec(
        seq_len=8, max_images=1, image_size=config.data.image_size, tokens_per_image=16,
        image_id=4, pad_id=0,
    )  # fmt: skip
    abstract = jax.eval_shape(llava_stages._multimodal_init(model, spec), jax.random.key(0))
    return nn.meta.unbox(abstract)


def _split_paths(config) -> tuple[set[str], set[str]]:
    groups = llava_stages.stage2_param_groups(config)
    optimizer_config = llava_stages.stage_optimizer(config, config.stage2)
    grouped = make_grouped_optimizer(optimizer_config, groups, num_steps=4)
    trainable, frozen = grouped.split(_abstract_params(config))
    jax.eval_shape(grouped.init, trainable)  # the optimizer state builds over what trains
    flat = [traverse_util.flatten_dict(part, sep="/") for part in (trainable, frozen)]
    return set(flat[0]), set(flat[1])


def test_stage2_trains_the_adapters_or_the_whole_lm_and_never_the_vision_tower():
    config = llava_vce.get_config("size=test")
    assert [g.name for g in llava_stages.stage2_param_groups(config)] == ["adapter", "projector"]
    trainable, frozen = _split_paths(config)
    assert {p.split("/")[0] for p in trainable} == {"lm", "projector"}
    assert all("lora" in p for p in trainable if p.startswith("lm/"))
    assert {p.split("/")[0] for p in frozen} == {"lm", "vision"}

    config.model.adapter.kind = "none"
    config.stage2.train_lm = True
    groups = llava_stages.stage2_param_groups(config)
    assert {g.name: g.learning_rate for g in groups} == {
        "lm": config.stage2.lm_learning_rate,
        "projector": config.stage2.projector_learning_rate,
    }
    trainable, frozen = _split_paths(config)
    assert {p.split("/")[0] for p in trainable} == {"lm", "projector"}
    assert {p.split("/")[0] for p in frozen} == {"vision"}
    assert "lm/embedder/embedding" in trainable  # the tied input and output embedding

    config.stage2.train_lm = False  # no adapter, LM frozen: the projector alone trains
    trainable, frozen = _split_paths(config)
    assert {p.split("/")[0] for p in trainable} == {"projector"}

    config.model.adapter.kind = "dual_lora"
    config.stage2.train_lm = True
    with pytest.raises(ValueError, match="model.adapter.kind='none'"):
        llava_stages.stage2_param_groups(config)


def _reusing_config(base: pathlib.Path, stages=("stage0_vision", "stage0_lm")):
    config = llava_vce.get_config("size=test")
    config.reuse_stages_from = str(base)
    config.reuse_stages = stages
    return config


def _finish(config, directory: pathlib.Path, stage: str, trained_with=None) -> None:
    """Leaves the final checkpoint of ``stage`` in ``directory``; with ``trained_with``, also its
    metadata item recording that config, as the trainer writes it."""
    final = llava_stage_dirs.final_checkpoint(config, directory / stage, stage)
    final.mkdir(parents=True)
    if trained_with is not None:
        _write_metadata(final.parent, trained_with)


def _write_metadata(step_dir: pathlib.Path, trained_with) -> None:
    metadata = checkpoint_lib.checkpoint_metadata(
        config=llava_stages.config_json(trained_with),
        adapter=AdapterConfig(kind="none"),
        base_params_path="",
    )
    ocp.Checkpointer(ocp.JsonCheckpointHandler()).save(step_dir.absolute() / "metadata", metadata)


def test_reused_stages_are_read_from_a_base_run_that_must_have_finished_them(tmp_path):
    base, workdir = tmp_path / "base", tmp_path / "point"
    config = _reusing_config(base)
    assert llava_stage_dirs.results_dir(config, workdir, "stage0_lm") == base / "stage0_lm"
    assert llava_stage_dirs.results_dir(config, workdir, "stage1") == workdir / "stage1"

    # The base may differ in what stage 0 does not read: its seed, projector, adapter, VQA set.
    base_config = llava_vce.get_config("size=test")
    base_config.seed = 7
    base_config.model.projector = "mlp"
    base_config.model.adapter.kind = "none"
    base_config.data.vqa_dataset = "easy_vqa_grid"
    _finish(config, base, "stage0_vision", trained_with=base_config)
    with pytest.raises(FileNotFoundError, match="stage0_lm/checkpoints/4/trainable"):
        llava_demo.run(config, workdir)  # before anything is prepared or trained
    assert not (workdir / "stage0_vision").exists()
    # A base run with another step count is not the stage this config describes.
    (base / "stage0_lm" / "checkpoints" / "3" / "trainable").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="stage0_lm"):
        llava_stage_dirs.check_reused_stages(config)
    _finish(config, base, "stage0_lm")
    with pytest.raises(FileNotFoundError, match="stage0_lm/checkpoints/4/metadata is missing"):
        llava_stage_dirs.check_reused_stages(config)
    _write_metadata(base / "stage0_lm" / "checkpoints" / "4", base_config)
    llava_stage_dirs.check_reused_stages(config)
    llava_stage_dirs.check_predecessors(config, "stage1", workdir)
    with pytest.raises(FileNotFoundError, match="stage1"):
        llava_stage_dirs.check_predecessors(config, "stage2", workdir)

    config.stage = "stage0_lm"
    with pytest.raises(ValueError, match="stage0_lm is reused from"):
        llava_demo.run(config, workdir)

    config.reuse_stages_from = ""  # reuse off: every stage is this workdir's again
    assert llava_stage_dirs.results_dir(config, workdir, "stage0_lm") == workdir / "stage0_lm"


def test_a_base_run_that_trained_a_reused_stage_otherwise_is_rejected(tmp_path):
    config = _reusing_config(tmp_path)
    base_config = llava_vce.get_config("size=test")
    base_config.stage0_lm.learning_rate = 1e-2
    base_config.model.moe.num_experts = 4
    for stage in config.reuse_stages:
        _finish(config, tmp_path, stage, trained_with=base_config)
    with pytest.raises(ValueError) as raised:
        llava_stage_dirs.check_reused_stages(config)
    assert "stage0_lm.learning_rate: base 0.01, here 0.003" in str(raised.value)
    assert "model.moe.num_experts: base 4, here 0" in str(raised.value)
    config.reuse_stages = ("stage0_vision",)  # the vision tower does not depend on either
    llava_stage_dirs.check_reused_stages(config)


def test_each_reused_stage_is_checked_against_the_config_that_trained_it(tmp_path):
    # The base trained stage 0 of the vision tower at one learning rate, then a later command
    # in the same workdir trained the LM with another; only the stages' checkpoints tell.
    config = _reusing_config(tmp_path)
    vision_command = llava_vce.get_config("size=test")
    vision_command.stage0_vision.learning_rate = 0.5
    _finish(config, tmp_path, "stage0_vision", trained_with=vision_command)
    _finish(config, tmp_path, "stage0_lm", trained_with=llava_vce.get_config("size=test"))
    with pytest.raises(ValueError, match="stage0_vision.learning_rate: base 0.5"):
        llava_stage_dirs.check_reused_stages(config)
    config.reuse_stages = ("stage0_vision",)
    config.stage0_vision.learning_rate = 0.5
    llava_stage_dirs.check_reused_stages(config)


@pytest.mark.parametrize(
    "stages, match",
    [(("stage2",), "cannot be reused"), (("stage1", "stage0_lm"), "stage1 was trained")],
)
def test_stages_that_cannot_be_reused_alone_are_rejected(tmp_path, stages, match):
    with pytest.raises(ValueError, match=match):
        llava_stage_dirs.reused_stages(_reusing_config(tmp_path, stages))


def test_config_seed_changes_the_seed_every_stage_trains_with(monkeypatch, tmp_path):
    seeds = {}

    def fake_train(task, **kwargs):
        seeds[task.name] = kwargs["seed"]

    monkeypatch.setattr(llava_stages, "train", fake_train)
    config = llava_vce.get_config("size=test")
    by_config_seed = {}
    for seed in (0, 1, 2):
        config.seed = seed
        for stage in llava_demo.TRAINING_STAGES:
            task = TrainTask(
                name=stage, init_params=None, loss_fn=None, param_groups=(),
                make_train_stream=None,
            )  # fmt: skip
            llava_stages.run_task(config, task, config[stage], tmp_path)
            options = llava_stages.pipeline_options(config, config[stage], stage, augment=False)
            assert options.seed == seeds[stage]
        by_config_seed[seed] = dict(seeds)
    values = [s for stage_seeds in by_config_seed.values() for s in stage_seeds.values()]
    assert len(set(values)) == len(values)  # every (config seed, stage) pair differs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    config = llava_vce.get_config("size=test")
    config.data.data_dir = str(tmp_path_factory.mktemp("data"))
    config.data.vqa_dataset = "easy_vqa_grid"
    config.data.prefetch_batches = 0
    llava_demo.prepare(config)
    return config


def _first_batch(config, stage: str, seed: int) -> dict:
    config.seed = seed
    tokenizer = llava_stages.load_tokenizer(config)
    if stage == "stage0_vision":
        from mllm_jax.recipes.vision_pretraining import stage0_vision_task

        return next(stage0_vision_task(config, tokenizer).make_train_stream())
    return next(llava_stages.train_stream(config, stage, tokenizer))


@pytest.mark.parametrize("stage", llava_demo.TRAINING_STAGES)
def test_config_seed_changes_every_stages_data_order(prepared, stage):
    first, again, other = (_first_batch(prepared, stage, seed) for seed in (0, 0, 1))
    key = "images" if stage == "stage0_vision" else "tokens"
    np.testing.assert_array_equal(first[key], again[key])
    assert not np.array_equal(first[key], other[key])


def test_prepare_builds_the_grid_set_and_its_words_tokenize_without_unknowns(prepared):
    source = llava_data.load_source(prepared, "easy_vqa_grid", "test")
    assert len(source) == 64
    tokenizer = llava_stages.load_tokenizer(prepared)
    for word in (" top", " bottom", " left", " right"):
        ids = tokenizer.encode(word)
        assert tokenizer.decode(ids) == word and 1 not in ids  # id 1 is <unk>
    examples = llava_data.vqa_test_examples(prepared, limit=10)
    assert [e.id for e in examples] == [f"easy_vqa_grid/test/{i}" for i in range(10)]


@pytest.mark.parametrize("vqa_dataset, flipped", [("easy_vqa_grid", False), ("easy_vqa", True)])
def test_stage2_flips_images_unless_its_answers_name_positions(prepared, vqa_dataset, flipped):
    config = prepared.copy_and_resolve_references()
    config.data.vqa_dataset = vqa_dataset
    config.stage2.batch_size = 32
    preprocessing = ImagePreprocessing(size=config.data.image_size)
    originals = set()
    for name, _ in llava_data.mixture(config.stage2, config):
        source = llava_data.load_source(config, name, "train")
        for index in range(len(source)):
            for image in source[index].images:
                originals.add(preprocessing(image, "", "image").tobytes())
    batch = _first_batch(config, "stage2", seed=0)
    shown = batch["images"][batch["image_mask"]]
    as_stored = [image.tobytes() in originals for image in shown]
    assert len(shown) > 8 and any(as_stored)
    assert all(as_stored) != flipped
