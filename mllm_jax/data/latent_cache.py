"""Latents of frozen encoders, computed once and stored as ArrayRecord shards for Grain.

  ImageTextPairs --image encoder (batched, jitted, progress bar)--> z_x [N, d_x]
                 --text encoder (each distinct caption once)-----> z_y [N, d_y]
  -> <dir>/latents-0000i-of-0000k.array_record, one record per pair:
       little-endian float32 z_x [d_x] | float32 z_y [d_y] | int32 label
  -> <dir>/classes.npy [K, d_y] and prompts.npy [K, d_y]: latents of each class caption and
     zero-shot prompt; <dir>/meta.json: dims, count, shards, class captions and prompts

``make_latent_dataset`` reads the shards with Grain: shard per process -> seeded shuffle
(reshuffled per epoch) -> repeat -> decode -> batch {"image" [B, d_x], "text" [B, d_y],
"label" [B]}. A record of the wrong length is a ``BadRecordError`` naming its shard and index.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import grain
import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from rich.console import Console
from rich.progress import track

from mllm_jax.data.paired_datasets import ImageTextPairs
from mllm_jax.data.sample import BadRecordError
from mllm_jax.encoders import ImageEncoder, TextEncoder
from mllm_jax.json_files import read_json

META_FILE = "meta.json"


def _encode_images(encoder: ImageEncoder, images: np.ndarray, batch_size: int, name: str):
    # A live bar on a terminal; in logs rich prints one line, when the loop ends.
    starts = track(
        range(0, len(images), batch_size),
        description=f"encode {name}",
        console=Console(stderr=True),
        disable=jax.process_index() != 0,
    )
    chunks = [np.asarray(encoder(images[s : s + batch_size]), np.float32) for s in starts]
    return np.concatenate(chunks)


def write_latent_cache(
    pairs: ImageTextPairs,
    image_encoder: ImageEncoder,
    text_encoder: TextEncoder,
    directory: str | pathlib.Path,
    *,
    batch_size: int = 256,
    records_per_shard: int = 4096,
    encoder_names: tuple[str, str] = ("image", "text"),
) -> pathlib.Path:
    """Encodes every pair of ``pairs`` once and writes the cache into ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    image_latents = _encode_images(image_encoder, pairs.images, batch_size, pairs.name)
    class_latents = np.asarray(text_encoder(list(pairs.classes)), np.float32)
    prompt_latents = np.asarray(text_encoder(list(pairs.prompts)), np.float32)
    text_latents = class_latents[pairs.labels]  # a caption is its class's caption
    if len(image_latents) != len(pairs) or image_latents.ndim != 2:
        raise ValueError(f"image encoder returned {image_latents.shape} for {len(pairs)} images")
    num_shards = max(1, -(-len(pairs) // records_per_shard))
    shards = [f"latents-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
    for index, shard in enumerate(shards):
        writer = ArrayRecordWriter(str(directory / shard), "group_size:1")
        for row in range(
            index * records_per_shard, min(len(pairs), (index + 1) * records_per_shard)
        ):
            writer.write(
                image_latents[row].astype("<f4").tobytes()
                + text_latents[row].astype("<f4").tobytes()
                + np.int32(pairs.labels[row]).astype("<i4").tobytes()
            )
        writer.close()
    np.save(directory / "classes.npy", class_latents)
    np.save(directory / "prompts.npy", prompt_latents)
    meta = {
        "name": pairs.name,
        "count": len(pairs),
        "image_dim": int(image_latents.shape[1]),
        "text_dim": int(class_latents.shape[1]),
        "records_per_shard": records_per_shard,
        "shards": shards,
        "classes": list(pairs.classes),
        "prompts": list(pairs.prompts),
        "encoders": list(encoder_names),
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=1))
    return directory


class LatentRecordDecoder:
    """ArrayRecord bytes -> {"image" [d_x], "text" [d_y], "label"}. Picklable for workers."""

    def __init__(self, directory: pathlib.Path, meta: dict):
        self.directory, self.meta = directory, meta
        self.image_dim, self.text_dim = meta["image_dim"], meta["text_dim"]

    def record_name(self, index: int) -> str:
        shard, row = divmod(index, self.meta["records_per_shard"])
        return f"{self.directory / self.meta['shards'][shard]}#{row}"

    def __call__(self, indexed: tuple[int, bytes]) -> dict[str, np.ndarray]:
        index, record = indexed
        expected = 4 * (self.image_dim + self.text_dim + 1)
        if len(record) != expected:
            raise BadRecordError(self.record_name(index), "latents",
                                 f"{len(record)} bytes, expected {expected}")  # fmt: skip
        floats = np.frombuffer(record, "<f4", self.image_dim + self.text_dim)
        return {
            "image": floats[: self.image_dim].astype(np.float32),
            "text": floats[self.image_dim :].astype(np.float32),
            "label": np.frombuffer(record, "<i4", 1, offset=expected - 4)[0].astype(np.int32),
        }


class ReadRecord:
    """index -> (index, record bytes) of an ArrayRecord source. Picklable for workers."""

    def __init__(self, source: grain.sources.ArrayRecordDataSource):
        self.source = source

    def __call__(self, index: int) -> tuple[int, bytes]:
        return int(index), self.source[int(index)]


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """An opened cache: its records (Grain source), metadata and class latents."""

    directory: pathlib.Path
    meta: dict
    source: grain.sources.ArrayRecordDataSource
    class_latents: np.ndarray  # [K, d_y]
    prompt_latents: np.ndarray  # [K, d_y]

    def __len__(self) -> int:
        return len(self.source)

    @property
    def decoder(self) -> LatentRecordDecoder:
        return LatentRecordDecoder(self.directory, self.meta)

    def arrays(self, indices: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """All (or the given) records as {"image" [N, d_x], "text" [N, d_y], "label" [N]}."""
        indices = range(len(self)) if indices is None else indices
        read, decode = ReadRecord(self.source), self.decoder
        rows = [decode(read(i)) for i in indices]
        return {key: np.stack([row[key] for row in rows]) for key in ("image", "text", "label")}


def open_latent_cache(directory: str | pathlib.Path) -> LatentCache:
    """Opens a cache written by ``write_latent_cache``.

    Raises:
      FileNotFoundError / ValueError: naming the directory when its metadata or shards are
        missing or disagree with the record count.
    """
    directory = pathlib.Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{directory}: no {META_FILE}; write the cache first")
    meta = read_json(meta_path)
    paths = [directory / shard for shard in meta["shards"]]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing shards {missing}")
    source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    if len(source) != meta["count"]:
        raise ValueError(f"{directory}: {len(source)} records, {META_FILE} says {meta['count']}")
    return LatentCache(
        directory=directory,
        meta=meta,
        source=source,
        class_latents=np.load(directory / "classes.npy"),
        prompt_latents=np.load(directory / "prompts.npy"),
    )


@dataclasses.dataclass(frozen=True, kw_only=True)
class LatentOptions:
    """Per-process batch size and order of the latent pipeline."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    drop_remainder: bool = True


class SelectedLatents:
    """Random access over chosen records of one or more caches, decoded. Picklable.

    ``selections``: (cache, record indices or None for all) pairs; element k of the
    concatenation is a {"image", "text", "label"} dict (labels index each cache's own classes).
    """

    def __init__(self, selections: Sequence[tuple[LatentCache, Sequence[int] | None]]):
        self._parts = []
        for cache, indices in selections:
            indices = np.arange(len(cache)) if indices is None else np.asarray(indices, np.int64)
            if len(indices) and (indices.min() < 0 or indices.max() >= len(cache)):
                raise IndexError(f"{cache.directory}: record indices outside [0, {len(cache)})")
            self._parts.append((ReadRecord(cache.source), cache.decoder, indices))
        dims = {(d.image_dim, d.text_dim) for _, d, _ in self._parts}
        if len(dims) > 1:
            raise ValueError(f"caches of different latent widths cannot be mixed: {dims}")
        self._starts = np.cumsum([0] + [len(i) for _, _, i in self._parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        part = int(np.searchsorted(self._starts, k, side="right")) - 1
        read, decode, indices = self._parts[part]
        return decode(read(indices[k - self._starts[part]]))


def make_latent_dataset(
    selections: Sequence[tuple[LatentCache, Sequence[int] | None]],
    options: LatentOptions,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Grain pipeline of latent batches over the chosen records (see ``SelectedLatents``)."""
    dataset = grain.MapDataset.source(SelectedLatents(selections))
    dataset = dataset[process_index::process_count]
    if options.shuffle:
        dataset = dataset.shuffle(seed=options.seed)
    if options.num_epochs != 1:
        dataset = dataset.repeat(options.num_epochs)
    return dataset.batch(
        options.batch_size, drop_remainder=options.drop_remainder
    ).to_iter_dataset()
