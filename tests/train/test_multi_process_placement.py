"""Earlier stages' weights (held whole by every process, on its own devices) are placed on a mesh
spanning two processes: ``pretrained.place_like`` builds each process's shards from a host copy,
where ``jax.device_put`` is refused on XLA:CPU (no cross-host device transfers)."""

import os
import pathlib
import subprocess
import sys

from mllm_jax.launch.local_processes import free_port

WORKER = pathlib.Path(__file__).with_name("place_like_worker.py")
REPO = pathlib.Path(__file__).resolve().parents[2]


def test_place_like_shards_a_local_array_over_two_processes():
    port = str(free_port())
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), port, str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    for worker, output in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, output[-3000:]
        assert "PLACED" in output.splitlines(), output[-3000:]
        assert "DEVICE_PUT_REFUSED" in output.splitlines(), output[-3000:]
