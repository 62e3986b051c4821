"""Training checkpoints hold only the adapters, restore exactly, re-shard, and survive SIGTERM."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mllm_jax.layers.lora import AdapterConfig
from mllm_jax.train import checkpoint as ckpt
from mllm_jax.train.partition import partition_params, path_matcher
from mllm_jax.train.preemption import PreemptionWatcher

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
D_MODEL, D_FF, RANK = 256, 512, 64
# Bounds on the on-disk bytes of the "trainable" item relative to the raw array bytes. Orbax
# writes zstd-compressed OCDBT chunks (random float32 normals shrink ~7%: 589,824 B of arrays ->
# ~551 KB) plus JSON metadata and manifests (a few KiB), hence [0.85 x, 1 x + 64 KiB].
MIN_SIZE_RATIO = 0.85
SIZE_MARGIN_BYTES = 64 * 1024


def _params(seed: int = 0) -> dict:
    """A two-layer model-like tree: frozen dense kernels with LoRA factors beside them."""
    rng = np.random.default_rng(seed)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    return {
        f"layer_{i}": {
            "mlp": {
                "kernel": normal(D_MODEL, D_FF),
                "bias": normal(D_FF),
                "lora_a": normal(D_MODEL, RANK),
                "lora_b": normal(RANK, D_FF),
            },
            "norm": {"scale": normal(D_MODEL)},
        }
        for i in range(3)
    }


def _split(params):
    return partition_params(params, path_matcher([r"lora_"]))


def _metadata(base_path="/base"):
    adapter = AdapterConfig(kind="lora", rank=RANK, alpha=16.0, targets=("query", "value"))
    return ckpt.checkpoint_metadata(
        config={"optimizer": {"lr": 1e-3}, "seed": 0}, adapter=adapter, base_params_path=base_path
    )


def _flat_paths(tree) -> set[str]:
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _num_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == y.dtype


def _save(checkpointer, step, trainable, opt_state):
    checkpointer.save(
        step,
        trainable_params=trainable,
        opt_state=opt_state,
        data_state={"iterator": {"index": step * 10}, "num_skipped": 1, "num_batches": step},
        metadata=_metadata(),
    )


def test_checkpoint_writes_exactly_the_trainable_arrays_and_their_bytes(tmp_path):
    trainable, frozen = _split(_params())
    opt_state = optax.adam(1e-3).init(trainable)
    with ckpt.TrainingCheckpointer(tmp_path / "run") as checkpointer:
        _save(checkpointer, 7, trainable, opt_state)
        checkpointer.wait_until_finished()
    step_dir = tmp_path / "run" / "7"
    assert sorted(p.name for p in step_dir.iterdir() if p.is_dir()) == [
        "data",
        "metadata",
        "opt_state",
        "trainable",
    ]
    reader = ocp.StandardCheckpointer()
    saved_trainable = reader.metadata(step_dir / "trainable").item_metadata.tree
    assert _flat_paths(dict(saved_trainable)) == _flat_paths(trainable)
    # The optimizer state is Adam's count plus one moment per trainable array, nothing frozen.
    saved_opt = reader.metadata(step_dir / "opt_state").item_metadata.tree
    expected_opt = {"[0]['count']"} | {
        f"[0]['{moment}']{path}" for moment in ("mu", "nu") for path in _flat_paths(trainable)
    }
    assert _flat_paths(saved_opt) == expected_opt
    assert not _flat_paths(frozen) & _flat_paths(dict(saved_trainable))

    trainable_bytes, frozen_bytes = _num_bytes(trainable), _num_bytes(frozen)
    on_disk = _dir_bytes(step_dir / "trainable")
    print(f"trainable {trainable_bytes} B, on disk {on_disk} B, frozen {frozen_bytes} B")
    assert MIN_SIZE_RATIO * trainable_bytes <= on_disk <= trainable_bytes + SIZE_MARGIN_BYTES
    # The whole step (params, two Adam moments, JSON) holds no room for the frozen weights.
    assert _dir_bytes(step_dir) <= 3 * trainable_bytes + 4 * SIZE_MARGIN_BYTES
    assert _dir_bytes(step_dir) < trainable_bytes + frozen_bytes


def test_max_to_keep_latest_step_and_bit_identical_restore(tmp_path):
    trainable, _ = _split(_params())
    opt_state = optax.adam(1e-3).init(trainable)
    saved = {}
    with ckpt.TrainingCheckpointer(tmp_path / "run", max_to_keep=2) as checkpointer:
        assert checkpointer.latest_step() is None
        for step in (10, 20, 30, 40):
            trainable = jax.tree.map(lambda x, s=step: x * 1.5 + s, trainable)
            saved[step] = trainable
            _save(checkpointer, step, trainable, opt_state)
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 40
        assert checkpointer.all_steps() == [30, 40]
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["30", "40"]

    reopened = ckpt.TrainingCheckpointer(tmp_path / "run", max_to_keep=2)
    assert reopened.latest_step() == 40
    abstract_t, abstract_o = ckpt.abstract_like(trainable), ckpt.abstract_like(opt_state)
    for step in (None, 30):
        restored = reopened.restore(
            step, abstract_trainable=abstract_t, abstract_opt_state=abstract_o
        )
        got_trainable, got_opt, data_state, metadata = restored
        want_step = step or 40
        _assert_trees_equal(got_trainable, saved[want_step])
        _assert_trees_equal(got_opt, opt_state)
        assert type(got_opt[0]) is type(opt_state[0])  # optax's named tuples survive
        assert data_state == {
            "iterator": {"index": want_step * 10},
            "num_skipped": 1,
            "num_batches": want_step,
        }
        assert metadata == _metadata()
        assert metadata["adapter"] == {
            "kind": "lora",
            "rank": RANK,
            "alpha": 16.0,
            "targets": ["query", "value"],
        }
    reopened.close()


def test_lora_moe_metadata_names_its_experts_and_top_k():
    adapter = AdapterConfig(kind="lora_moe", rank=4, alpha=8.0, num_experts=3, top_k=1)
    metadata = ckpt.checkpoint_metadata(config={}, adapter=adapter, base_params_path="/base")
    assert metadata["adapter"] == {
        "kind": "lora_moe",
        "rank": 4,
        "alpha": 8.0,
        "targets": ["query", "value"],
        "num_experts": 3,
        "top_k": 1,
    }


def test_save_rejects_metadata_without_adapter_and_base_path(tmp_path):
    trainable, _ = _split(_params())
    with (
        ckpt.TrainingCheckpointer(tmp_path / "run") as checkpointer,
        pytest.raises(ValueError, match="base_params_path"),
    ):
        checkpointer.save(
            0,
            trainable_params=trainable,
            opt_state={},
            data_state={},
            metadata={"config": {}, "adapter": {}},
        )


def test_restore_from_8_device_mesh_onto_4_device_mesh(tmp_path, devices):
    trainable, _ = _split(_params())
    mesh8 = Mesh(np.array(devices), ("fsdp",))
    mesh4 = Mesh(np.array(devices[:4]), ("fsdp",))

    def shard_rows(mesh):
        return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec("fsdp", None)), trainable)

    trainable8 = jax.device_put(trainable, shard_rows(mesh8))
    opt_state8 = optax.adam(1e-3).init(trainable8)
    with ckpt.TrainingCheckpointer(tmp_path / "run") as checkpointer:
        _save(checkpointer, 1, trainable8, opt_state8)
        checkpointer.wait_until_finished()
        opt_shardings4 = jax.tree.map(
            lambda x: NamedSharding(mesh4, PartitionSpec(*[None] * x.ndim)), opt_state8
        )
        got_trainable, got_opt, _, _ = checkpointer.restore(
            abstract_trainable=ckpt.abstract_like(trainable8, shard_rows(mesh4)),
            abstract_opt_state=ckpt.abstract_like(opt_state8, opt_shardings4),
        )
    for got, want in zip(jax.tree.leaves(got_trainable), jax.tree.leaves(trainable), strict=True):
        assert got.sharding == NamedSharding(mesh4, PartitionSpec("fsdp", None))
        assert {d.id for d in got.devices()} == {d.id for d in devices[:4]}
        assert got.addressable_shards[0].data.shape == (want.shape[0] // 4, want.shape[1])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for got in jax.tree.leaves(got_opt):
        assert {d.id for d in got.devices()} == {d.id for d in devices[:4]}
    _assert_trees_equal(got_opt, opt_state8)


def test_base_params_written_once_and_shape_mismatch_rejected(tmp_path):
    _, frozen = _split(_params())
    path = ckpt.save_base_params(tmp_path / "base", frozen)
    written = (tmp_path / "base").stat().st_mtime_ns
    assert ckpt.save_base_params(tmp_path / "base", _split(_params(seed=1))[1]) == path
    assert (tmp_path / "base").stat().st_mtime_ns == written  # second call wrote nothing
    loaded = ckpt.load_base_params(path, ckpt.abstract_like(frozen))
    _assert_trees_equal(loaded, frozen)  # still the first call's values

    wider = dict(frozen)
    wider["layer_0"] = {**frozen["layer_0"], "norm": {"scale": jnp.zeros((D_MODEL + 1,))}}
    with pytest.raises(ValueError, match=r"layer_0/norm/scale: on disk \(\(256,\), 'float32'\)"):
        ckpt.save_base_params(tmp_path / "base", wider)


_CHILD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from mllm_jax.layers.lora import AdapterConfig
    from mllm_jax.train import checkpoint as ckpt
    from mllm_jax.train.preemption import PreemptionWatcher

    directory = sys.argv[1]
    params = {"lora_a": jnp.zeros((4, 8)), "lora_b": jnp.zeros((8, 4))}
    opt_state = {"count": jnp.zeros((), jnp.int32)}
    checkpointer = ckpt.TrainingCheckpointer(directory)
    with PreemptionWatcher() as watcher:
        step = 0
        while step < 100_000:
            params = {k: v + 1.0 for k, v in params.items()}
            opt_state = {"count": opt_state["count"] + 1}
            step += 1
            print(f"step {step}", flush=True)
            if watcher.should_stop:
                checkpointer.save(
                    step, trainable_params=params, opt_state=opt_state,
                    data_state={"num_batches": step},
                    metadata=ckpt.checkpoint_metadata(
                        config={}, adapter=AdapterConfig(kind="lora"),
                        base_params_path="/base"),
                )
                print(f"saved {step}", flush=True)
                break
            time.sleep(0.02)
    checkpointer.close()
    """
)


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["JAX_PLATFORMS"] = "cpu"
    child = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    try:
        for line in child.stdout:
            lines.append(line.strip())
            if line.strip() == "step 5":
                child.send_signal(signal.SIGTERM)
                break
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lines += out.splitlines()
    assert child.returncode == 0, err[-2000:]
    saved = [line for line in lines if line.startswith("saved")]
    assert saved, lines
    step = int(saved[0].split()[1])
    assert step >= 5

    checkpointer = ckpt.TrainingCheckpointer(tmp_path / "run")
    assert checkpointer.latest_step() == step
    abstract = {
        "lora_a": jax.ShapeDtypeStruct((4, 8), jnp.float32),
        "lora_b": jax.ShapeDtypeStruct((8, 4), jnp.float32),
    }
    params, opt_state, data_state, _ = checkpointer.restore(
        abstract_trainable=abstract,
        abstract_opt_state={"count": jax.ShapeDtypeStruct((), jnp.int32)},
    )
    checkpointer.close()
    np.testing.assert_array_equal(np.asarray(params["lora_a"]), np.full((4, 8), float(step)))
    assert int(opt_state["count"]) == step
    assert data_state == {"num_batches": step}


def test_preemption_watcher_sets_flag_and_restores_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with PreemptionWatcher() as watcher:
        assert not watcher.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert watcher.should_stop
        assert watcher.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous
