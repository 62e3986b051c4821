"""The shared training loop: resume bit-identity, SIGTERM, re-sharding restore, NaN guard,
per-group learning rates, adapter-only checkpoints and the files a run writes."""

import io
import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from PIL import Image

from configs.base import LOGICAL_AXIS_RULES
from mllm_jax import sharding
from mllm_jax.data.builders import SampleSource
from mllm_jax.data.packing import PackingSpec
from mllm_jax.data.pipeline import PipelineOptions
from mllm_jax.data.sample import Sample, Turn
from mllm_jax.data.sharded_stream import merge_shard_states
from mllm_jax.data.tokenizer import Tokenizer, train_tokenizer
from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.layers.lora_params import ADAPTER_PARAM_REGEX, is_adapter_param
from mllm_jax.layers.transformer import TransformerConfig
from mllm_jax.layers.vce import VCEConfig
from mllm_jax.layers.vit import ViTConfig
from mllm_jax.models.multimodal_lm import MultimodalConfig, MultimodalLM
from mllm_jax.train.multimodal_task import make_stream, multimodal_loss_fn
from mllm_jax.train.param_groups import ParamGroup
from mllm_jax.train.trainer import TrainTask, train

SIZE = 8
SEQ_LEN = 48
ADAPTER_LR, PROJECTOR_LR = 1e-2, 1e-3


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.full((SIZE, SIZE, 3), value % 256, np.uint8)
    pixels[: value % SIZE, :, 0] = 255 - value % 256
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _to_sample(record: dict) -> Sample:
    return Sample(
        id=record["id"],
        turns=(
            Turn(role="user", text="<image>" + record["question"]),
            Turn(role="assistant", text=record["answer"]),
        ),
        images=(record["image"],),
    )


RECORDS = [
    {"id": f"r{i}", "question": f" what is {i}?", "answer": f"it is {i % 7}", "image": _png(i)}
    for i in range(40)
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"what is {i}? it is {i % 7}" for i in range(100)]
    path = train_tokenizer(texts, str(tmp_path_factory.mktemp("spm") / "tok"), vocab_size=300)
    return Tokenizer.load(path)


def _model_config(vocab_size: int) -> MultimodalConfig:
    return MultimodalConfig(
        vocab_size=vocab_size,
        embed_dim=16,
        transformer=TransformerConfig(
            num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=32,
            adapter=AdapterConfig(
                kind="dual_lora", rank=4, alpha=8.0, dropout=0.0, targets=("query", "value")
            ),
        ),
        vision=ViTConfig(
            image_size=SIZE, patch_size=4, width=16, num_layers=2, num_heads=2, mlp_dim=32
        ),
        projector="vce",
        vce=VCEConfig(level_indices=(-1, -2), num_heads=2, num_points=2),
    )  # fmt: skip


def _task(tokenizer, *, nan_at_batch: int | None = None) -> TrainTask:
    config = _model_config(vocab_size=320)
    model = MultimodalLM(config)
    spec = PackingSpec(
        seq_len=SEQ_LEN, max_images=3, image_size=SIZE, tokens_per_image=config.tokens_per_image,
        image_id=tokenizer.image_id,
    )  # fmt: skip
    tokens = jnp.zeros((1, SEQ_LEN), jnp.int32)
    minus_one = jnp.full((1, SEQ_LEN), -1, jnp.int32)
    images = jnp.zeros((1, 3, SIZE, SIZE, 3))

    def make_train_stream():
        stream = make_stream(
            [SampleSource(records=RECORDS, to_sample=_to_sample)], [1.0], tokenizer,
            template="v1", system_prompt="", spec=spec,
            options=PipelineOptions(batch_size=4, seed=3, augment=True),
        )  # fmt: skip
        return stream if nan_at_batch is None else _NaNAt(stream, nan_at_batch)

    return TrainTask(
        name="test",
        init_params=lambda rng: model.init(
            rng,
            tokens,
            segment_ids=tokens,
            positions=tokens,
            images=images,
            image_slot=minus_one,
            image_patch=minus_one,
        )["params"],  # fmt: skip
        loss_fn=multimodal_loss_fn(model),
        param_groups=[
            ParamGroup(name="adapter", patterns=(ADAPTER_PARAM_REGEX,), learning_rate=ADAPTER_LR),
            ParamGroup(name="projector", patterns=(r"^projector/",), learning_rate=PROJECTOR_LR),
        ],
        make_train_stream=make_train_stream,
        evaluate=lambda params: {"projector_norm": float(_norm(params["projector"]))},
        adapter=config.transformer.adapter,
        config={"test": True},
    )


class _NaNAt:
    """Passes a stream through, with NaN pixels in its ``index``-th batch (1-based)."""

    def __init__(self, stream, index):
        self.stream, self.index, self.count = stream, index, 0

    def __next__(self):
        batch = next(self.stream)
        self.count += 1
        if self.count == self.index:
            batch = dict(batch, images=np.full_like(batch["images"], np.nan))
        return batch

    def get_state(self):
        return self.stream.get_state()

    def set_state(self, state):
        self.stream.set_state(state)


def _norm(tree) -> jnp.ndarray:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


def _configs(num_steps, *, checkpoint_every=100, weight_decay=0.0, warmup_steps=0):
    optimizer = ml_collections.ConfigDict(
        dict(
            b1=0.9, b2=0.95, eps=1e-12, weight_decay=weight_decay, grad_clip_norm=1e9,
            end_learning_rate_fraction=1.0, warmup_steps=warmup_steps,
        )
    )  # fmt: skip
    training = ml_collections.ConfigDict(
        dict(
            num_steps=num_steps, log_every=1, eval_every=0, checkpoint_every=checkpoint_every,
            keep_checkpoints=3, async_checkpoints=True, accumulation_steps=1,
            cpu_peak_flops_per_host=140e9, progress_bar=False,
        )
    )  # fmt: skip
    return dict(optimizer_config=optimizer, training_config=training)


def _mesh(devices, data, fsdp=1, tensor=1):
    return sharding.create_mesh(
        dict(data=data, fsdp=fsdp, tensor=tensor, expert=1),
        dict(data=1, fsdp=1, tensor=1, expert=1),
        devices[: data * fsdp * tensor],
    )


RULES = sharding.logical_rules_from_config(LOGICAL_AXIS_RULES)


def _flat_numpy(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _assert_bit_identical(a, b):
    flat_a, flat_b = _flat_numpy(a), _flat_numpy(b)
    assert flat_a.keys() == flat_b.keys()
    different = [k for k in flat_a if not np.array_equal(flat_a[k], flat_b[k])]
    assert not different, f"params differ at {different[:5]}"


def test_killed_and_resumed_run_ends_bit_identical_to_an_uninterrupted_one(
    tokenizer, devices, tmp_path, caplog
):
    """A hard kill after step 5, and then the newest checkpoint (step 4) found damaged: the
    run resumes from step 2, moves step 4 aside, and still ends bit-identical."""
    mesh = _mesh(devices, data=2)
    run = dict(mesh=mesh, rules=RULES, seed=5)
    straight = train(
        _task(tokenizer), workdir=tmp_path / "straight", **run,
        **_configs(6, checkpoint_every=2, weight_decay=0.1, warmup_steps=2),
    )  # fmt: skip
    killed = train(
        _task(tokenizer), workdir=tmp_path / "resumed", stop_after_steps=5, **run,
        **_configs(6, checkpoint_every=2, weight_decay=0.1, warmup_steps=2),
    )  # fmt: skip
    assert killed.preempted and killed.step == 5
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4" / "trainable")
    with caplog.at_level("WARNING"):
        resumed = train(
            _task(tokenizer), workdir=tmp_path / "resumed", **run,
            **_configs(6, checkpoint_every=2, weight_decay=0.1, warmup_steps=2),
        )  # fmt: skip
    assert "checkpoint step 4" in caplog.text and "['trainable'] are missing" in caplog.text
    assert (tmp_path / "resumed" / "checkpoints" / "unusable-4").is_dir()
    assert resumed.step == 6 and not resumed.preempted
    assert [r["step"] for r in resumed.history] == [3, 4, 5, 6]
    # Same losses on the re-done steps: same batches in the same order.
    straight_losses = {r["step"]: r["loss"] for r in straight.history}
    for record in resumed.history:
        assert record["loss"] == straight_losses[record["step"]]
    _assert_bit_identical(straight.params, resumed.params)
    # A different seed is a different run (the comparison above can fail).
    other = train(
        _task(tokenizer), workdir=tmp_path / "other", mesh=mesh, rules=RULES, seed=6,
        **_configs(6, checkpoint_every=2, weight_decay=0.1, warmup_steps=2),
    )  # fmt: skip
    with pytest.raises(AssertionError):
        _assert_bit_identical(straight.params, other.params)


def test_sigterm_saves_a_restorable_checkpoint_and_returns_cleanly(tokenizer, devices, tmp_path):
    mesh = _mesh(devices, data=2)

    def send_sigterm(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = train(
        _task(tokenizer), workdir=tmp_path, mesh=mesh, rules=RULES, step_callback=send_sigterm,
        **_configs(5),
    )  # fmt: skip
    assert stopped.preempted and stopped.step == 2
    assert ocp.CheckpointManager(tmp_path / "checkpoints").latest_step() == 2
    finished = train(_task(tokenizer), workdir=tmp_path, mesh=mesh, rules=RULES, **_configs(5))
    assert finished.step == 5 and [r["step"] for r in finished.history] == [3, 4, 5]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_restore_onto_a_smaller_mesh_reshards_to_the_same_params(tokenizer, devices, tmp_path):
    big = _mesh(devices, data=2, fsdp=2, tensor=2)
    trained = train(_task(tokenizer), workdir=tmp_path, mesh=big, rules=RULES, **_configs(2))
    small = _mesh(devices, data=2, tensor=2)
    restored = train(_task(tokenizer), workdir=tmp_path, mesh=small, rules=RULES, **_configs(2))
    assert restored.step == 2 and restored.history == []
    _assert_bit_identical(trained.params, restored.params)
    for leaf in jax.tree_util.tree_leaves(restored.params):
        assert set(leaf.sharding.device_set) <= set(devices[:4])


def test_non_finite_loss_stops_training_naming_step_and_parameters(tokenizer, devices, tmp_path):
    with pytest.raises(FloatingPointError, match=r"step 3: non-finite .*(lora|projector)"):
        train(
            _task(tokenizer, nan_at_batch=3), workdir=tmp_path, mesh=_mesh(devices, data=2),
            rules=RULES, **_configs(5, checkpoint_every=1),
        )  # fmt: skip
    # Nothing after the bad step reached a checkpoint.
    assert ocp.CheckpointManager(tmp_path / "checkpoints").latest_step() == 2


def test_each_group_moves_at_its_own_learning_rate_and_frozen_params_stay(
    tokenizer, devices, tmp_path
):
    mesh = _mesh(devices, data=2)
    task = _task(tokenizer)
    start = train(task, workdir=tmp_path / "a", mesh=mesh, rules=RULES, **_configs(1))
    # Adam's first update is lr * g / |g| = +-lr wherever the gradient is non-zero (no decay,
    # eps ~ 0), so each group's params move by exactly its own learning rate.
    before = _initial_params(task, mesh)
    after = _flat_numpy(start.params)
    history = start.history[0]
    assert history["learning_rate/adapter"] == pytest.approx(ADAPTER_LR)
    assert history["learning_rate/projector"] == pytest.approx(PROJECTOR_LR)
    moved = {"adapter": [], "projector": []}
    for path, value in before.items():
        delta = np.abs(after[path] - value)
        if is_adapter_param(path):
            moved["adapter"].append(delta[delta > 0])
        elif path.startswith("projector/"):
            moved["projector"].append(delta[delta > 0])
        else:
            assert np.array_equal(after[path], value), f"frozen {path} moved"
    for group, lr in (("adapter", ADAPTER_LR), ("projector", PROJECTOR_LR)):
        deltas = np.concatenate(moved[group])
        assert deltas.size > 0
        np.testing.assert_allclose(np.median(deltas), lr, rtol=1e-3)


def _initial_params(task, mesh) -> dict:
    """The params ``train`` starts from (same seed): the init before any step."""
    from mllm_jax.train.param_groups import make_grouped_optimizer
    from mllm_jax.train.trainer import _init_state

    grouped = make_grouped_optimizer(_configs(1)["optimizer_config"], task.param_groups, 1)
    init_rng, _ = jax.random.split(jax.random.key(0))
    state, _ = _init_state(task, grouped, mesh, RULES, init_rng)
    return _flat_numpy(state.trainable) | _flat_numpy(state.frozen)


def test_checkpoint_holds_only_the_trainable_params_and_the_run_writes_its_logs(
    tokenizer, devices, tmp_path
):
    result = train(
        _task(tokenizer), workdir=tmp_path, mesh=_mesh(devices, data=2), rules=RULES,
        **_configs(3),
    )  # fmt: skip
    step_dir = tmp_path / "checkpoints" / "3"
    reader = ocp.StandardCheckpointer()
    saved = traverse_util.flatten_dict(
        dict(reader.metadata(step_dir / "trainable").item_metadata.tree), sep="/"
    )
    params = _flat_numpy(result.params)
    trainable = {p for p in params if is_adapter_param(p) or p.startswith("projector/")}
    assert set(saved) == trainable
    base = traverse_util.flatten_dict(
        dict(reader.metadata(tmp_path / "base_params").item_metadata.tree), sep="/"
    )
    assert set(base) == set(params) - trainable
    metadata = json.loads((step_dir / "metadata" / "metadata").read_text())
    assert metadata["adapter"] == {
        "kind": "dual_lora", "rank": 4, "alpha": 8.0, "targets": ["query", "value"],
    }  # fmt: skip
    assert metadata["base_params_path"] == str((tmp_path / "base_params").absolute())
    assert result.trainable_params == sum(params[p].size for p in trainable)

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    for key in ("loss", "grad_norm", "step_time_s", "examples_per_sec", "tokens_per_sec", "mfu"):
        assert all(np.isfinite(line[key]) for line in lines), key
    assert "eval_projector_norm" in lines[-1]
    assert list((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "plots" / "loss.png").exists()


def test_packed_multimodal_stream_is_the_same_for_any_process_count(tokenizer, monkeypatch):
    """make_stream's data shards: the processes' local batches tile one global batch that does
    not depend on the process count, and a 2-process position resumes on 1 or 4 processes."""
    spec = PackingSpec(
        seq_len=SEQ_LEN, max_images=3, image_size=SIZE, tokens_per_image=4,
        image_id=tokenizer.image_id, pad_id=tokenizer.pad_id,
    )  # fmt: skip

    def processes(count):
        streams = []
        for index in range(count):
            monkeypatch.setattr(jax, "process_index", lambda index=index: index)
            monkeypatch.setattr(jax, "process_count", lambda: count)
            streams.append(
                make_stream(
                    [SampleSource(records=RECORDS, to_sample=_to_sample)],
                    [1.0],
                    tokenizer,
                    template="v1",
                    system_prompt="",
                    spec=spec,
                    options=PipelineOptions(batch_size=8, seed=3, augment=True),
                    num_shards=4,
                )  # fmt: skip
            )
        return streams

    def global_batches(streams, steps):
        out = []
        for _ in range(steps):
            local = [next(s) for s in streams]
            out.append({k: np.concatenate([b[k] for b in local]) for k in local[0]})
        return out

    reference = global_batches(processes(1), 5)
    writers = processes(2)
    two = global_batches(writers, 2)
    state = merge_shard_states(4, [w.local_state() for w in writers])
    for count in (1, 4):
        readers = processes(count)
        for reader in readers:
            reader.set_state(state)
        for got, want in zip(two + global_batches(readers, 3), reference, strict=True):
            assert got.keys() == want.keys()
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)
