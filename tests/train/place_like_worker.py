"""One process of test_multi_process_placement.py: places a locally held array on a mesh that
spans two processes, checks its shards, and prints PLACED when they are right."""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from mllm_jax.train.pretrained import place_like  # noqa: E402

mesh = Mesh(np.array(jax.devices()), ("data",))
sharding = NamedSharding(mesh, PartitionSpec("data"))
expected = np.arange(32, dtype=np.float32).reshape(8, 4)
local = jax.device_put(expected, jax.local_devices()[0])  # as read_params leaves a checkpoint
try:
    jax.device_put(local, sharding)
    print("DEVICE_PUT_WORKED")  # then place_like's host detour would be unnecessary here
except ValueError:
    print("DEVICE_PUT_REFUSED")
placed = place_like(local, sharding)
assert placed.shape == expected.shape and placed.sharding == sharding
for shard in placed.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(placed)
assert float(total) == float(expected.sum()), float(total)
print("PLACED")
