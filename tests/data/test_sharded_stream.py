"""ShardedStream: the same global batches and resumable positions for any process count."""

import grain
import numpy as np
import pytest

from mllm_jax.data import text_corpus
from mllm_jax.data.sharded_stream import ShardedStream, merge_shard_states, shards_of_process

GLOBAL_BATCH = 8
DATASET = grain.MapDataset.range(40).map(lambda i: {"index": np.int64(i)})


def make_shard(shard_index, num_shards):
    return text_corpus.batched_stream(
        DATASET, GLOBAL_BATCH, seed=3, shard_index=shard_index, num_shards=num_shards
    )


def processes(num_processes, num_shards=4):
    return [
        ShardedStream(make_shard, num_shards, process_index=p, process_count=num_processes)
        for p in range(num_processes)
    ]


def global_batches(streams, steps):
    """Per step, the processes' local batches concatenated in process order."""
    return [np.concatenate([next(s)["index"] for s in streams]) for _ in range(steps)]


def test_shards_are_split_evenly_or_refused():
    assert list(shards_of_process(4, 1, 2)) == [2, 3]
    assert list(shards_of_process(4, 3, 4)) == [3]
    with pytest.raises(ValueError, match="num_data_shards=4 cannot be split over 3"):
        shards_of_process(4, 0, 3)


def test_global_batches_do_not_depend_on_the_process_count():
    one, two, four = (global_batches(processes(p), 12) for p in (1, 2, 4))
    for a, b, c in zip(one, two, four, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # Reference: shard v is windows v::4 shuffled, two rows of it per step, in shard order.
    shard_order = [list(DATASET[v::4].shuffle(seed=3)) for v in range(4)]
    expected = [
        [int(shard_order[v][2 * t + r]["index"]) for v in range(4) for r in range(2)]
        for t in range(4)
    ]
    assert [list(map(int, b)) for b in one[:4]] == expected
    # One epoch (40 windows = 5 steps) sees every window once.
    assert sorted(np.concatenate(one[:5]).tolist()) == list(range(40))


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 4), (4, 2)])
def test_a_state_written_by_p_processes_resumes_on_another_count(before, after):
    reference = global_batches(processes(1), 9)
    writers = processes(before)
    seen = global_batches(writers, 4)
    state = merge_shard_states(4, [w.local_state() for w in writers])
    readers = processes(after)
    for reader in readers:
        reader.set_state(state)
    seen += global_batches(readers, 5)
    for got, want in zip(seen, reference, strict=True):
        np.testing.assert_array_equal(got, want)


def test_resume_takes_the_checkpoints_shard_count_and_reads_old_states():
    writer = ShardedStream(make_shard, 2, process_index=0, process_count=1)
    first = [next(writer)["index"] for _ in range(3)]
    state = writer.get_state()
    assert state["num_shards"] == 2 and len(state["shards"]) == 2
    reader = ShardedStream(make_shard, 1, process_index=0, process_count=1)
    reader.set_state(state)
    assert reader.num_shards == 2
    continued = ShardedStream(make_shard, 2, process_index=0, process_count=1)
    for _ in first:
        next(continued)
    np.testing.assert_array_equal(next(reader)["index"], next(continued)["index"])
    # A state saved before data shards existed is the state of one shard.
    plain = make_shard(0, 1)
    next(plain)
    old_state = plain.get_state()
    resumed = ShardedStream(make_shard, 1, process_index=0, process_count=1)
    resumed.set_state(old_state)
    np.testing.assert_array_equal(next(resumed)["index"], next(plain)["index"])
    with pytest.raises(ValueError, match="3 processes cannot split"):
        ShardedStream(make_shard, 3, process_index=0, process_count=3).set_state(state)
