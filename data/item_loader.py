"""Streaming the item shards: items with their content, in batches, for encoder training.

The order follows the event loader's (data/loader.py): shards shuffled by (seed, epoch), a
sample shuffle buffer seeded by (seed, epoch, rank, worker), corrupt data raised or skipped
and counted by the same ``ErrorPolicy``. Catalogues have few item shards, so the items, not
the shards, are dealt out: every (rank, worker) keeps every n-th item of the stream. Splits
are a seeded hash of the item id: ``val`` holds ``val_fraction`` of the items, ``train``
the rest, so held-out items are never trained on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info

from foundation.data.batch import ItemBatch
from foundation.data.items import decode_item
from foundation.data.loader import PREFETCH, ErrorPolicy, _batch, _seeded_shuffle, skip_consumed
from foundation.data.writer import load_manifest

ITEM_SPLITS = ("train", "val")


def held_out(items: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Whether each item id is in the ``val`` split (a hash of the id: order-free, stable)."""
    mixed = (np.asarray(items, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             + np.uint64(seed)) >> np.uint64(40)
    return (mixed % np.uint64(1_000_000)).astype(np.int64) < int(fraction * 1_000_000)


def _deal(src: Iterable[dict[str, Any]], *, rank: int, world_size: int) -> Iterator[dict]:
    """Every (rank, worker) keeps its share of the items, before anything is decoded."""
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    slot, slots = rank * workers + worker, world_size * workers
    for index, sample in enumerate(src):
        if index % slots == slot:
            yield sample


def _decode(src: Iterable[dict[str, Any]], *, split: str, val_fraction: float,
            modalities: tuple[str, ...], handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
    for sample in src:
        try:
            row = decode_item(sample, modalities)
        except Exception as err:  # noqa: BLE001 - the policy decides; the message names the shard
            handler(ValueError(f"cannot decode item {sample.get('__key__')!r} of shard "
                               f"{sample.get('__url__')}: {err}"))
            continue
        if held_out(np.array([row["item"]]), val_fraction)[0] == (split == "val"):
            yield row


def collate_items(rows: list[dict[str, Any]], modalities: tuple[str, ...]) -> ItemBatch:
    return ItemBatch(item=torch.tensor([r["item"] for r in rows], dtype=torch.int64),
                     content={m: [r.get(m) for r in rows] for m in modalities})


def build_item_loader(path: str | Path, split: str, *, batch_size: int, modalities: tuple[str, ...],
                      val_fraction: float = 0.1, seed: int = 0, epoch: int = 0, rank: int = 0,
                      world_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                      shuffle_buffer: int = 1000, on_error: str = "raise",
                      skip_ids: np.ndarray | None = None) -> DataLoader:
    """One epoch of a split of the items as ItemBatches holding ``modalities``, without the
    items ``skip_ids`` names."""
    if split not in ITEM_SPLITS:
        raise KeyError(f"item splits are {list(ITEM_SPLITS)} (held out by item id), not "
                       f"{split!r}")
    manifest = load_manifest(path)
    items = manifest.get("items")
    if not items:
        raise ValueError(f"{path} has no item shards: build it with source.item_text_path, "
                         f"source.item_media_dir or source.item_vectors_path")
    missing = sorted(set(modalities) - set(items["content"]))
    if missing:
        raise ValueError(f"{path} has no {missing} item content (it has "
                         f"{sorted(items['content'])})")
    root = Path(path).absolute()
    urls = [str(root / shard["path"]) for shard in items["shards"]]
    handler = ErrorPolicy(on_error)
    stages: list[Any] = [
        wds.SimpleShardList(urls, seed=seed * 1_000_003 + epoch if shuffle else None),
        wds.tarfile_to_samples(handler=handler),
        partial(_deal, rank=rank, world_size=world_size),
        partial(_decode, split=split, val_fraction=val_fraction, modalities=modalities,
                handler=handler),
    ]
    if skip_ids is not None and len(skip_ids):
        stages.append(partial(skip_consumed, consumed=skip_ids, key="item"))
    if shuffle and shuffle_buffer > 1:
        stages.append(partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch,
                              rank=rank))
    stages.append(partial(_batch, batch_size=batch_size, handler=handler,
                          collate=partial(collate_items, modalities=modalities)))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    return DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers,
                      prefetch_factor=PREFETCH if num_workers else None, generator=generator)
