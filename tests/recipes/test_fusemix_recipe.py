"""FuseMix end to end on synthetic latents: training aligns the modalities, far above chance."""

import numpy as np

from mllm_jax.data.latent_cache import open_latent_cache, write_latent_cache
from mllm_jax.data.paired_datasets import ImageTextPairs
from mllm_jax.models.fusion_adapter import TEMPERATURE_RANGE, AdapterConfig
from mllm_jax.recipes.fusemix import FuseMixConfig, train_fusemix

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


def test_fusemix_training_aligns_the_modalities(tmp_path):
    train = _cache(tmp_path / "train", 96, seed=0)
    test = _cache(tmp_path / "test", 40, seed=1)
    config = FuseMixConfig(
        adapter=AdapterConfig(embed_dim=16, num_blocks=1, mlp_ratio=2.0, dropout=0.1),
        mix=True, batch_size=32, num_steps=40, warmup_steps=5, learning_rate=3e-3,
    )  # fmt: skip
    result = train_fusemix([(train, None)], config, evaluate_on={"test": test}, progress=False,
                           log_every=10)  # fmt: skip
    metrics = result.evaluations["test"]
    assert result.losses[-1] < result.losses[0]
    # Chance: 1/8 for R@1 either way.
    assert metrics["t2i_r@1"] > 0.8 and metrics["i2t_r@1"] > 0.8, metrics
    assert TEMPERATURE_RANGE[0] <= float(result.params["temperature"]) <= TEMPERATURE_RANGE[1]
