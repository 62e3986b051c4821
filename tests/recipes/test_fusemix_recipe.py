"""FuseMix end to end on synthetic latents through the shared trainer: training aligns the
modalities far above chance, τ stays clamped, checkpoints are written, and a killed and resumed
run ends bit-identical to an uninterrupted one."""

import jax
import numpy as np
import pytest
from flax import traverse_util

from mllm_jax import sharding
from mllm_jax.data.latent_cache import open_latent_cache, write_latent_cache
from mllm_jax.data.paired_datasets import ImageTextPairs
from mllm_jax.models.fusion_adapter import TEMPERATURE_RANGE, AdapterConfig
from mllm_jax.recipes.fusemix import FuseMixConfig, train_fusemix
from mllm_jax.train.metric_writers import read_jsonl

NUM_CLASSES = 8


def _cache(directory, count, seed):
    rng = np.random.default_rng(seed)
    labels = (np.arange(count) % NUM_CLASSES).astype(np.int32)
    pairs = ImageTextPairs(
        name=f"synthetic/{seed}",
        images=np.zeros((count, 1, 1, 3), np.uint8),
        labels=labels,
        classes=tuple(f"class {k}" for k in range(NUM_CLASSES)),
        prompts=tuple(f"prompt {k}" for k in range(NUM_CLASSES)),
        ids=tuple(str(i) for i in range(count)),
    )
    # Image latents: a fixed random centre per class plus noise; text: another random code.
    centres = np.random.default_rng(100).normal(size=(NUM_CLASSES, 12))
    codes = np.random.default_rng(101).normal(size=(2 * NUM_CLASSES, 6))
    image_latents = centres[labels] + 0.3 * rng.normal(size=(count, 12))

    def image_encoder(images):
        # Called once with every image (batch_size=count), in order.
        assert len(images) == count
        return image_latents

    def text_encoder(texts):
        return np.stack([codes[int(t.split()[1]) + (NUM_CLASSES if "prompt" in t else 0)]
                         for t in texts])  # fmt: skip

    write_latent_cache(pairs, image_encoder, text_encoder, directory, batch_size=count)
    return open_latent_cache(directory)


CONFIG = FuseMixConfig(
    adapter=AdapterConfig(embed_dim=16, num_blocks=1, mlp_ratio=2.0, dropout=0.1),
    mix=True, batch_size=32, num_steps=40, warmup_steps=5, learning_rate=1e-2,
)  # fmt: skip


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    directory = tmp_path_factory.mktemp("caches")
    return _cache(directory / "train", 96, seed=0), _cache(directory / "test", 40, seed=1)


def _train(caches, workdir, **kwargs):
    # Two of the 8 fake CPU devices: over 8, the step's collectives (the mixing's permute, the
    # similarity matrix's all-gather) can deadlock XLA:CPU on a 2-core host once the step comes
    # from the persistent compilation cache or many steps are queued (abort after 40 s).
    # log_every=1: one record per step, so the resumed run's records line up with these.
    train, test = caches
    mesh = sharding.create_mesh({"data": 2}, devices=jax.devices()[:2])
    return train_fusemix([(train, None)], CONFIG, workdir=workdir, evaluate_on={"test": test},
                         progress=False, log_every=1, checkpoint_every=10, mesh=mesh,
                         **kwargs)  # fmt: skip


@pytest.fixture(scope="module")
def straight(caches, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, _train(caches, workdir)


def _flat(params):
    return traverse_util.flatten_dict(jax.device_get(params), sep="/")


def test_fusemix_training_aligns_the_modalities(straight):
    workdir, result = straight
    metrics = result.evaluations["test"]
    assert result.losses[-1] < result.losses[0]
    # Chance: 1/8 for R@1 either way.
    assert metrics["t2i_r@1"] > 0.8 and metrics["i2t_r@1"] > 0.8, metrics
    # The raw τ parameter, clamped inside the compiled step after every update: at the end and
    # as each step's record logged it.
    assert TEMPERATURE_RANGE[0] <= float(result.params["temperature"]) <= TEMPERATURE_RANGE[1]
    taus = [r["temperature"] for r in read_jsonl(workdir / "metrics.jsonl")]
    assert taus and all(TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1] for t in taus)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [30, 40]
    assert result.steps_per_second > 0 and not result.preempted


def test_killed_and_resumed_fusemix_ends_bit_identical(caches, straight, tmp_path):
    _, uninterrupted = straight
    # A hard kill after step 25: the checkpoint of step 20 survives, steps 21-25 are redone.
    killed = _train(caches, tmp_path, stop_after_steps=25)
    assert killed.preempted and killed.evaluations == {}
    resumed = _train(caches, tmp_path)
    assert resumed.losses == uninterrupted.losses
    a, b = _flat(uninterrupted.params), _flat(resumed.params)
    assert a.keys() == b.keys()
    assert [k for k in a if not np.array_equal(a[k], b[k])] == []
    assert resumed.evaluations == uninterrupted.evaluations
