"""Streaming loader: webdataset shards → decoded members → jagged SequenceBatches.

Pipeline order (open_clip's): shard list shuffled by (seed, epoch), identical everywhere →
split by rank → split by worker → tar to samples (as many as the manifest says) → decode
(npz/json only, never pickle) → sample shuffle seeded by (seed, epoch, rank, worker) →
truncate → batch (each batch counts the corrupt data skipped since the previous one). One
pass is one epoch; every sample is read by exactly one (rank, worker).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import MISSING
from torch.utils.data import DataLoader, get_worker_info

from foundation.choices import RAISE, OnError, choice
from foundation.data.batch import SequenceBatch
from foundation.data.npz import decode_npz
from foundation.data.schema import EventSchema
from foundation.data.writer import load_manifest

MODES = ("sequence", "ranking", "search", "notification")
# everything else is rejected
ENTRIES = frozenset({"seq.npz", "imp.npz", "search.npz", "sends.npz", "meta.json"})
# Batches each loader worker keeps ready: enough to ride out a slow shard or a busy core.
PREFETCH = 4


@dataclass
class DataConfig:
    """``data.*`` of a training run: where the shards are and how they are streamed."""

    path: str = MISSING
    batch_size: int = 64
    # > 0: training batches by cost instead of members: rows join a batch while their summed
    # cost (``row_cost``: events plus attention's length²) stays within that of this many
    # events in full-length rows, so every rank's step costs about the same
    tokens_per_batch: int = 0
    eval_batch_size: int = 256
    max_len: int = 50
    num_workers: int = 1
    shuffle_buffer: int = 1000
    on_error: OnError = RAISE
    train_split: str = "train"
    val_split: str = "val"


class ErrorPolicy:
    """webdataset exception handler: ``raise`` re-raises (the message names the shard url);
    ``skip`` warns, counts (per process) and continues.

    ``skipped`` counts one per exception the handler sees: a sample that fails to decode is 1,
    a shard that cannot be opened is 1, a damaged tar is 1 per read error webdataset reports
    while reading it (the rest of that shard is dropped). Batches carry the count as
    ``SequenceBatch.skipped`` (see ``_batch``).
    """

    def __init__(self, on_error: str):
        self.on_error = choice(OnError, on_error, "on_error")
        self.skipped, self.reported = 0, []

    def __call__(self, exn: Exception) -> bool:
        if self.on_error == RAISE:
            raise exn
        self.skipped += 1
        self.reported.append(" ".join(map(str, exn.args)))
        warnings.warn(f"skipping unreadable data ({self.skipped} so far): {exn}", stacklevel=2)
        return True


def decode_sample(sample: dict[str, Any], max_len: int, mode: str, schema: EventSchema
                  ) -> dict[str, Any] | None:
    """One member's arrays (every event feature of ``schema``), truncated to its last
    ``max_len`` events; None drops the row."""
    unknown = sorted(k for k in sample if not k.startswith("__") and k not in ENTRIES)
    if unknown:
        raise ValueError(f"unexpected entries {unknown}: shards hold only {sorted(ENTRIES)} "
                         f"(npz and json; pickle is never decoded)")
    seq, meta = decode_npz(sample["seq.npz"]), json.loads(sample["meta.json"])
    ts = seq["timestamp"].astype(np.int64)
    keep = slice(max(0, len(ts) - max_len), None)  # gaps come from the full history first
    row = {"sample_id": int(meta["sample_id"]), "item": seq["item"][keep], "timestamp": ts[keep],
           "events": schema.event_ids(seq, ts, keep)}
    if mode == "ranking":
        if "imp.npz" not in sample:
            return None
        imp = decode_npz(sample["imp.npz"])
        row["candidates"], row["labels"] = imp["item"], imp["label"]
    if mode == "search":
        if "search.npz" not in sample:
            return None
        searches = decode_npz(sample["search.npz"])
        row["queries"], row["query_items"] = searches["query"].tolist(), searches["item"]
    if mode == "notification":
        if "sends.npz" not in sample:
            return None
        sends = decode_npz(sample["sends.npz"])
        row["candidates"], row["labels"], row["sent"] = sends["item"], sends["outcome"], sends["sent"]
        if "uplift" in sends:
            row["uplift"] = sends["uplift"]
    return row if mode != "sequence" or len(row["item"]) >= 2 else None


def _decode(src: Iterable[dict[str, Any]], *, max_len: int, mode: str, schema: EventSchema,
            handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
    for sample in src:
        try:
            row = decode_sample(sample, max_len, mode, schema)
        except Exception as err:  # noqa: BLE001 - the policy decides; the message names the shard
            handler(ValueError(f"cannot decode sample {sample.get('__key__')!r} of shard "
                               f"{sample.get('__url__')}: {err}"))
            continue
        if row is not None:
            yield row


def _check_sample_counts(src: Iterable[dict[str, Any]], *, expected: dict[str, int],
                         handler: ErrorPolicy) -> Iterator[dict[str, Any]]:
    """Each shard must yield as many samples as the manifest says: a tar cut at a member
    boundary reads as a valid, shorter archive, and would otherwise lose samples silently.
    A shard whose read already failed (reported to the handler) is not reported twice."""
    url, seen = None, 0

    def check() -> None:
        if url is not None and seen != expected[url] and not any(url in r for r in handler.reported):
            handler(ValueError(f"shard {url} held {seen} samples, its manifest says "
                               f"{expected[url]}: truncated or replaced; rebuild it"))

    for sample in src:
        if sample.get("__url__") != url:
            check()
            url, seen = sample.get("__url__"), 0
        seen += 1
        yield sample
    check()


def skip_consumed(src: Iterable[dict[str, Any]], *, consumed: np.ndarray, key: str
                  ) -> Iterator[dict[str, Any]]:
    """Leave out the samples (by ``key``) that ``consumed`` lists: those an epoch already
    trained on under another layout of ranks and workers (``EpochStream``)."""
    done = frozenset(consumed.tolist())
    for row in src:
        if row[key] not in done:
            yield row


def _split_by_rank(src: Iterable[Any], *, rank: int, world_size: int) -> Iterator[Any]:
    """Strided split with the explicit rank (not env vars): each shard to exactly one rank."""
    yield from islice(src, rank, None, world_size)


def _seeded_shuffle(src: Iterable[Any], *, bufsize: int, seed: int, epoch: int,
                    rank: int) -> Iterator[Any]:
    """wds's buffer shuffle, seeded inside the worker so each (rank, worker) differs."""
    info = get_worker_info()
    worker = info.id if info is not None else 0
    worker_seed = int(np.random.SeedSequence([seed, epoch, rank, worker]).generate_state(1)[0])
    yield from wds.filters._shuffle(iter(src), bufsize=bufsize, initial=bufsize, seed=worker_seed)


def collate(rows: list[dict[str, Any]]) -> SequenceBatch:
    """Rows → one jagged batch (inside the pipeline, so workers ship finished batches)."""
    def cat(key: str, dtype: torch.dtype = torch.int64, of=lambda row: row) -> torch.Tensor:
        values = np.concatenate([of(r)[key] for r in rows]).astype(np.int64)
        return torch.from_numpy(values).to(dtype)

    def lens(key: str) -> torch.Tensor:
        return torch.tensor([len(r[key]) for r in rows], dtype=torch.int64)

    ranking, search = "candidates" in rows[0], "queries" in rows[0]
    sends, uplift = "sent" in rows[0], "uplift" in rows[0]
    return SequenceBatch(
        sample_ids=torch.tensor([r["sample_id"] for r in rows], dtype=torch.int64),
        lengths=lens("item"), item=cat("item"), timestamp=cat("timestamp"),
        events={key: cat(key, of=lambda r: r["events"]) for key in rows[0]["events"]},
        candidates=cat("candidates") if ranking else None,
        candidate_lengths=lens("candidates") if ranking else None,
        labels=cat("labels", torch.float32) if ranking else None,
        queries=[q for r in rows for q in r["queries"]] if search else None,
        query_items=cat("query_items") if search else None,
        query_lengths=lens("queries") if search else None,
        sent=cat("sent", torch.bool) if sends else None,
        true_uplift=torch.from_numpy(np.concatenate([r["uplift"] for r in rows])).float()
        if uplift else None)


def row_cost(length: int, max_len: int) -> float:
    """A row's relative training cost: its events, plus attention's pairs (length²) scaled
    so that a full-length row costs twice its events."""
    return length + length * length / max_len


def _batch(src: Iterable[dict[str, Any]], *, batch_size: int, handler: ErrorPolicy,
           collate: Callable[[list[dict[str, Any]]], Any] = collate,
           cost: Callable[[dict[str, Any]], float] | None = None,
           budget: float = 0.0) -> Iterator[SequenceBatch]:
    """Rows → batches (the last one partial), each carrying the skips of this process since
    its previous batch. A batch holds ``batch_size`` rows, or with ``cost``, the rows that fit
    in ``budget`` (at least one).

    A full batch goes out when the row after it arrives, and the last batch only once the
    source is exhausted, so skips met after the last row (a corrupt shard at the end of the
    epoch) ride on the last batch instead of vanishing. A process that yields no batch at all
    has nothing to carry its count; its warnings still report it.
    """
    rows: list[dict[str, Any]] = []
    reported, spent = handler.skipped, 0.0

    def emit() -> Any:
        nonlocal reported
        batch = collate(rows)
        batch.skipped, reported = handler.skipped - reported, handler.skipped
        return batch

    for row in src:
        price = cost(row) if cost is not None else 0.0
        full = spent + price > budget if cost is not None else len(rows) == batch_size
        if rows and full:
            yield emit()
            rows, spent = [], 0.0
        rows.append(row)
        spent += price
    if rows:
        yield emit()


def shard_urls(path: str | Path, split: str, manifest: dict[str, Any] | None = None
               ) -> dict[str, int]:
    """The split's shard paths → their sample counts, in manifest order: absolute local paths
    inside ``path``.

    The manifest is data, not code: a shard path is never handed to webdataset as a URL it
    could act on (``pipe:cmd`` runs a shell command, ``http:`` fetches), and never leaves the
    dataset directory.
    """
    manifest = manifest if manifest is not None else load_manifest(path)
    if split not in manifest["splits"]:
        raise KeyError(f"no split {split!r} in {path}; splits: {sorted(manifest['splits'])}")
    root = Path(path).absolute()  # absolute: the url starts with "/", so it has no scheme
    urls = {}
    for shard in manifest["splits"][split]["shards"]:
        rel = PurePosixPath(shard["path"])
        if rel.is_absolute() or ".." in rel.parts or rel.name in ("", "."):
            raise ValueError(f"{root / 'manifest.json'} names shard {shard['path']!r} outside "
                             f"{root}: shard paths are relative to the dataset directory (a "
                             f"tampered or hand-edited manifest?)")
        urls[str(root / rel)] = int(shard["samples"])
    if not urls:
        raise ValueError(f"split {split!r} of {path} has no samples: rebuild with a larger "
                         f"{split}_fraction")
    return urls


def build_loader(path: str | Path, split: str, *, batch_size: int, max_len: int, seed: int = 0,
                 epoch: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 shuffle: bool = True, shuffle_buffer: int = 1000, mode: str = "sequence",
                 on_error: str = "raise", skip_ids: np.ndarray | None = None,
                 tokens_per_batch: int = 0) -> DataLoader:
    """One epoch of ``split`` for this rank as SequenceBatches (DataLoader, batch_size=None),
    without the samples ``skip_ids`` names; ``tokens_per_batch`` > 0 batches by cost
    (``DataConfig.tokens_per_batch``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    if max_len < 2 or batch_size < 1:
        raise ValueError(f"need max_len >= 2 and batch_size >= 1, got {max_len}, {batch_size}")
    if 0 < tokens_per_batch < max_len:
        raise ValueError(f"data.tokens_per_batch={tokens_per_batch} is below data.max_len="
                         f"{max_len}: a batch must hold at least one full-length row")
    handler = ErrorPolicy(on_error)
    # The shard seed depends only on (seed, epoch): every rank and worker sees the same order.
    shard_seed = seed * 1_000_003 + epoch if shuffle else None
    manifest = load_manifest(path)  # read once: the shard list and the feature schema
    urls = shard_urls(path, split, manifest)
    schema = EventSchema.from_manifest(manifest)
    stages: list[Any] = [
        wds.SimpleShardList(list(urls), seed=shard_seed),
        partial(_split_by_rank, rank=rank, world_size=world_size),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=handler),
        partial(_check_sample_counts, expected=urls, handler=handler),
        partial(_decode, max_len=max_len, mode=mode, schema=schema, handler=handler),
    ]
    if skip_ids is not None and len(skip_ids):
        stages.append(partial(skip_consumed, consumed=skip_ids, key="sample_id"))
    if shuffle and shuffle_buffer > 1:
        stages.append(partial(_seeded_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch,
                              rank=rank))
    by_cost = {} if not tokens_per_batch else {
        "cost": lambda row: row_cost(len(row["item"]), max_len),
        "budget": row_cost(max_len, max_len) * tokens_per_batch / max_len}
    stages.append(partial(_batch, batch_size=batch_size, handler=handler, **by_cost))
    # An own generator: creating the iterator draws a base seed from it, and drawing from the
    # global RNG instead would shift dropout and sampling after a resume.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    return DataLoader(wds.DataPipeline(*stages), batch_size=None, num_workers=num_workers,
                      prefetch_factor=PREFETCH if num_workers else None, generator=generator)
