"""A real English text corpus that exists on every machine offline: the Python stdlib's docstrings.

Each module, class and function docstring of the standard library that this interpreter ships is
one document (a few MB of technical prose). Documents are byte-tokenised, split into train/eval by
a hash of their source path and name, packed into fixed-length windows with ``segment_ids``, and
streamed as a Grain pipeline.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import pathlib
import sysconfig
import zlib
from dataclasses import dataclass

import grain
import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Third-party packages and test suites (which hold deliberately malformed files) are not corpus.
_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
_BYTE_OFFSET = 3
# Bump when the documents a given stdlib yields change (extraction rules), to drop old caches.
_CACHE_FORMAT = 1


class ByteTokenizer:
    """UTF-8 bytes shifted by 3; ids 0/1/2 are pad/bos/eos. Vocabulary size 259."""

    vocab_size = 256 + _BYTE_OFFSET

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] int32 ids (no bos/eos)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + _BYTE_OFFSET

    def decode(self, ids: np.ndarray) -> str:
        """[T] ids -> str; special ids are dropped, invalid UTF-8 replaced."""
        ids = np.asarray(ids)
        data = (ids[ids >= _BYTE_OFFSET] - _BYTE_OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Document:
    source: str  # "<relative path>:<qualified name>"
    text: str


def stdlib_docstrings(stdlib_dir: str | None = None) -> tuple[list[Document], int]:
    """Collects docstrings from the stdlib's .py files, sorted by source.

    Files that cannot be read or parsed are skipped, counted and logged. Parsing the whole
    stdlib takes seconds, and every process of a run (and every run) needs the same documents,
    so they are cached under ``corpus_cache_dir()``, keyed by the path, size and modification
    time of every file read (any change rebuilds them).

    Returns:
      (documents, number of skipped files).
    """
    root = pathlib.Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist")
    paths = [
        path
        for path in sorted(root.rglob("*.py"))
        if not _EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1])
    ]
    cache = _cache_file(root, paths)
    cached = _read_cache(cache)
    if cached is not None:
        return cached
    documents, skipped = [], 0
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError) as err:
            skipped += 1
            logging.warning("skipping %s: %s", path, err)
            continue
        documents.extend(_docstrings_of(tree, path.relative_to(root).as_posix()))
    if not documents:
        raise ValueError(f"no docstrings found under {root}")
    if skipped:
        logging.info(
            "stdlib corpus: %d documents, %d unreadable files skipped", len(documents), skipped
        )
    _write_cache(cache, documents, skipped)
    return documents, skipped


def corpus_cache_dir() -> pathlib.Path:
    """``$MLLM_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/mllm_jax``, else ``~/.cache/mllm_jax``."""
    if os.environ.get("MLLM_JAX_CACHE_DIR"):
        return pathlib.Path(os.environ["MLLM_JAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "mllm_jax"


def _cache_file(root: pathlib.Path, paths: list[pathlib.Path]) -> pathlib.Path:
    key = hashlib.sha256(f"{_CACHE_FORMAT}|{root.resolve()}".encode())
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            continue
        key.update(f"|{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return corpus_cache_dir() / f"stdlib_docstrings-{key.hexdigest()[:24]}.json"


def _read_cache(cache: pathlib.Path) -> tuple[list[Document], int] | None:
    if not cache.exists():
        return None
    try:
        content = json.loads(cache.read_text(encoding="utf-8"))
        documents = [Document(source, text) for source, text in content["documents"]]
        return documents, int(content["skipped"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        logging.warning("ignoring the unreadable corpus cache %s (%s); rebuilding it", cache, err)
        return None


def _write_cache(cache: pathlib.Path, documents: list[Document], skipped: int) -> None:
    content = {"documents": [[d.source, d.text] for d in documents], "skipped": skipped}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # Several processes may build it at once: each writes its own file, then renames.
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(content), encoding="utf-8")
        os.replace(partial, cache)
    except OSError as err:
        logging.info("corpus cache not written to %s: %s", cache, err)


def _docstrings_of(tree: ast.Module, relative: str) -> list[Document]:
    found = []
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, prefix = stack.pop()
        doc = ast.get_docstring(node, clean=True)
        if doc:
            found.append(Document(f"{relative}:{prefix or '<module>'}", doc))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                stack.append((child, f"{prefix}.{child.name}" if prefix else child.name))
    return sorted(found, key=lambda d: d.source)


def is_eval_document(document: Document, eval_percent: int) -> bool:
    """Deterministic split: a document is held out when crc32(source) % 100 < eval_percent."""
    return zlib.crc32(document.source.encode("utf-8")) % 100 < eval_percent


def pack_documents(documents: list[Document], seq_len: int, tokenizer: ByteTokenizer) -> dict:
    """Concatenates ``<bos> text <eos>`` of every document and cuts the stream into windows.

    Returns:
      dict of [W, seq_len] arrays in the batch contract (``data/batch.py``): ``tokens``,
      ``targets``, ``loss_mask``, ``segment_ids`` (one id per document piece in a window,
      from 1) and ``positions`` (restarting per piece). A window's last position and a
      document's last token predict nothing.
    """
    pieces = [np.concatenate([[BOS_ID], tokenizer.encode(d.text), [EOS_ID]]) for d in documents]
    stream = np.concatenate(pieces).astype(np.int32)
    num_windows = len(stream) // seq_len
    if num_windows == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one window ({seq_len})")
    tokens = stream[: num_windows * seq_len].reshape(num_windows, seq_len)
    doc_starts = tokens == BOS_ID
    doc_starts[:, 0] = True
    segment_ids = np.cumsum(doc_starts, axis=1).astype(np.int32)
    index = np.broadcast_to(np.arange(seq_len), tokens.shape)
    positions = index - np.maximum.accumulate(np.where(doc_starts, index, 0), axis=1)
    same_segment = np.zeros(tokens.shape, bool)
    same_segment[:, :-1] = segment_ids[:, 1:] == segment_ids[:, :-1]
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return {
        "tokens": tokens,
        "targets": np.where(same_segment, targets, 0).astype(np.int32),
        "loss_mask": same_segment.astype(np.float32),
        "segment_ids": segment_ids,
        "positions": positions.astype(np.int32),
    }


def make_text_datasets(
    seq_len: int, eval_percent: int = 5, stdlib_dir: str | None = None
) -> tuple[grain.MapDataset, grain.MapDataset]:
    """Train and eval MapDatasets of packed windows (dict examples, each array [seq_len])."""
    documents, _ = stdlib_docstrings(stdlib_dir)
    tokenizer = ByteTokenizer()
    train_docs = [d for d in documents if not is_eval_document(d, eval_percent)]
    eval_docs = [d for d in documents if is_eval_document(d, eval_percent)]
    if not eval_docs or not train_docs:
        raise ValueError(f"eval_percent={eval_percent} leaves an empty train or eval split")
    return tuple(
        _as_dataset(pack_documents(docs, seq_len, tokenizer)) for docs in (train_docs, eval_docs)
    )


def _as_dataset(windows: dict) -> grain.MapDataset:
    num = len(windows["tokens"])
    return grain.MapDataset.range(num).map(lambda i: {k: v[i] for k, v in windows.items()})


def batched_stream(
    dataset: grain.MapDataset,
    batch_size: int,
    *,
    seed: int,
    shuffle: bool = True,
    shard_index: int = 0,
    num_shards: int = 1,
):
    """Infinite iterator over one shard's rows of each global batch, shuffled per epoch.

    ``batch_size`` is the global batch; shard ``shard_index`` of ``num_shards`` (windows
    ``shard_index::num_shards``) yields ``batch_size // num_shards`` of its rows per step. Shards
    are processes here, or the run's data shards of ``data/sharded_stream.py``.
    """
    if batch_size % num_shards:
        raise ValueError(
            f"data.batch_size={batch_size} does not split into {num_shards} equal shards"
        )
    local = dataset[shard_index::num_shards]
    if shuffle:
        local = local.shuffle(seed=seed)
    batches = local.repeat().batch(batch_size // num_shards, drop_remainder=True)
    # One reader thread, a few batches ahead: Grain's default (16 threads, 500 elements) costs
    # more thread churn than indexing windows does, the more so with several shards per host.
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)))
