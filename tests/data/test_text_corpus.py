"""The offline stdlib-docstring corpus: tokenizer, document collection, packing, streaming."""

import grain
import numpy as np
import pytest

from mllm_jax.data import text_corpus
from mllm_jax.data.batch import check_batch


def test_byte_tokenizer_round_trips_unicode_and_drops_specials():
    tok = text_corpus.ByteTokenizer()
    ids = tok.encode("héllo →")
    assert ids.min() >= 3 and ids.max() < tok.vocab_size == 259
    assert tok.decode(np.concatenate([[text_corpus.BOS_ID], ids, [text_corpus.EOS_ID]])) == (
        "héllo →"
    )


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_docstrings_are_collected_and_unparseable_files_are_counted(tmp_path, caplog):
    _write(
        tmp_path,
        "good.py",
        '"""Module doc."""\nclass A:\n    """Class doc."""\n'
        '    def f(self):\n        """Method doc."""\n',
    )
    _write(tmp_path, "broken.py", "def (:\n")
    _write(tmp_path, "test/skipped.py", '"""Test-suite docs are not part of the corpus."""\n')
    _write(tmp_path, "pkg/tests/data/bad.py", "print 'py2'\n")  # excluded, so not even a skip
    docs, skipped = text_corpus.stdlib_docstrings(str(tmp_path))
    assert [(d.source, d.text) for d in docs] == [
        ("good.py:<module>", "Module doc."),
        ("good.py:A", "Class doc."),
        ("good.py:A.f", "Method doc."),
    ]
    assert skipped == 1
    assert "broken.py" in caplog.text


def test_missing_or_empty_corpus_directory_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_corpus.stdlib_docstrings(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no docstrings"):
        text_corpus.stdlib_docstrings(str(tmp_path))


def test_pack_documents_produces_the_batch_contract():
    tok = text_corpus.ByteTokenizer()
    docs = [text_corpus.Document("a", "ab"), text_corpus.Document("b", "xyz")]
    packed = text_corpus.pack_documents(docs, seq_len=4, tokenizer=tok)
    check_batch(packed, with_images=False)
    # stream: <bos> a b <eos> <bos> x y z <eos>  -> two windows of 4, one token dropped
    np.testing.assert_array_equal(packed["tokens"].ravel(), [1, 100, 101, 2, 1, 123, 124, 125])
    np.testing.assert_array_equal(packed["targets"], [[100, 101, 2, 0], [123, 124, 125, 0]])
    np.testing.assert_array_equal(packed["loss_mask"], [[1, 1, 1, 0], [1, 1, 1, 0]])
    packed = text_corpus.pack_documents(docs, seq_len=6, tokenizer=tok)
    np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 1, 2, 2]])
    np.testing.assert_array_equal(packed["positions"], [[0, 1, 2, 3, 0, 1]])
    np.testing.assert_array_equal(packed["targets"], [[100, 101, 2, 0, 123, 0]])
    np.testing.assert_array_equal(packed["loss_mask"], [[1, 1, 1, 0, 1, 0]])


def test_eval_split_is_deterministic_and_disjoint():
    docs = [text_corpus.Document(f"m{i}.py:f", "t") for i in range(400)]
    held = [d for d in docs if text_corpus.is_eval_document(d, 5)]
    assert held == [d for d in docs if text_corpus.is_eval_document(d, 5)]
    assert 5 <= len(held) <= 40  # ~5% of 400


def test_stream_shards_hosts_disjointly_and_reshuffles_each_epoch():
    dataset = grain.MapDataset.range(24).map(lambda i: {"index": np.int64(i)})
    host0 = text_corpus.batched_stream(dataset, 4, seed=0, shard_index=0, num_shards=2)
    host1 = text_corpus.batched_stream(dataset, 4, seed=0, shard_index=1, num_shards=2)
    epoch = lambda it: [int(i) for _ in range(6) for i in next(it)["index"]]  # 12 per host
    first0, first1 = epoch(host0), epoch(host1)
    assert sorted(first0 + first1) == list(range(24))
    second0 = epoch(host0)
    assert sorted(second0) == sorted(first0) and second0 != first0
    with pytest.raises(ValueError, match="does not split"):
        text_corpus.batched_stream(dataset, 5, seed=0, num_shards=2)


def test_make_text_datasets_splits_documents_into_packed_windows(tmp_path):
    lines = "".join(f'def f{i}():\n    """Doc number {i:03d} here."""\n' for i in range(64))
    _write(tmp_path, "mod.py", lines)
    train, held_out = text_corpus.make_text_datasets(8, eval_percent=10, stdlib_dir=str(tmp_path))
    example = train[0]
    assert set(example) == {"tokens", "targets", "loss_mask", "segment_ids", "positions"}
    assert example["tokens"].shape == (8,) and example["tokens"].dtype == np.int32
    assert len(train) > len(held_out) > 0


def test_docstrings_are_cached_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLLM_JAX_CACHE_DIR", str(tmp_path / "cache"))
    stdlib = tmp_path / "lib"
    stdlib.mkdir()
    module = stdlib / "m.py"
    module.write_text('"""First version."""\n')
    first = text_corpus.stdlib_docstrings(str(stdlib))
    (cache,) = (tmp_path / "cache").glob("stdlib_docstrings-*.json")
    assert text_corpus.stdlib_docstrings(str(stdlib)) == first
    # The cache is what is read: a doctored cache file shows through.
    cache.write_text(cache.read_text().replace("First version.", "From the cache."))
    assert text_corpus.stdlib_docstrings(str(stdlib))[0][0].text == "From the cache."
    module.write_text('"""Second, longer version."""\n')
    assert text_corpus.stdlib_docstrings(str(stdlib))[0][0].text == "Second, longer version."
    for stale in (tmp_path / "cache").glob("*.json"):
        stale.write_text("{not json")
    with caplog.at_level("WARNING"):
        assert text_corpus.stdlib_docstrings(str(stdlib))[0][0].text == "Second, longer version."
    assert "unreadable corpus cache" in caplog.text
