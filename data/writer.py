"""Shard writer: canonical events → per-member webdataset tar shards + manifest.json.

Output layout::

    OUTPUT/manifest.json              written last, atomically: a build is complete iff it exists
    OUTPUT/{train,val,test}/shard-000000.tar
    OUTPUT/item_ids.npy               raw item id per contiguous id (index 0 = padding, -1)
    OUTPUT/item_counts.npy            train-split event count per item id (popularity, logQ)
    OUTPUT/catalogue.parquet          catalogue with remapped ids (when a catalogue is given)

Every shard byte is a function of the events and the seed (fixed tar mtime/owner, fixed zip
timestamps), so the same input in parquet, csv or jsonl yields identical shards and checksums.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from foundation.data.schema import ACTIONS, DEVICES, NUM_GAP_BUCKETS, NUM_HOURS, SAMPLE_SCHEMA
from foundation.data.sources import SourceConfig, read_events, read_impressions, read_table
from omegaconf import MISSING
from tqdm import tqdm

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass
class BuildConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = MISSING
    seed: int = 0  # member split
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    shards_per_split: int = 8  # train; val/test get fewer (see split_shard_count)
    max_history: int | None = None  # keep only each member's last N events


def encode_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (zip of .npy) with fixed timestamps, so equal arrays give equal bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            npy = io.BytesIO()
            np.lib.format.write_array(npy, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                        npy.getvalue())
    return buf.getvalue()


def split_shard_count(split: str, samples: int, shards_per_split: int) -> int:
    """Train gets shards_per_split; val/test fewer but ≥4 so 2 ranks × 2 workers all read."""
    wanted = shards_per_split if split == "train" else min(shards_per_split, max(4, shards_per_split // 4))
    return max(1, min(wanted, samples)) if samples else 0


def assign_splits(num_members: int, cfg: BuildConfig) -> dict[str, np.ndarray]:
    """Member indices per split: a seeded permutation, cut test | val | train."""
    if not 0 <= cfg.val_fraction + cfg.test_fraction < 1:
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got "
                         f"{cfg.val_fraction} + {cfg.test_fraction}")
    perm = np.random.default_rng(cfg.seed).permutation(num_members)
    n_test = int(round(num_members * cfg.test_fraction))
    n_val = int(round(num_members * cfg.val_fraction))
    return {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
            "train": perm[n_test + n_val:]}


def _group(member_id: np.ndarray, timestamp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable (member, time) order, the sorted unique members and each one's row range start."""
    order = np.lexsort((timestamp, member_id))  # lexsort is stable: ties keep input order
    members, starts = np.unique(member_id[order], return_index=True)
    return order, members, np.append(starts, len(order))


def _tail(start: int, end: int, max_history: int | None) -> slice:
    return slice(max(start, end - max_history) if max_history else start, end)


class _Tables:
    """Events and impressions grouped per member, items remapped to 1..N."""

    def __init__(self, cfg: BuildConfig):
        ev = read_events(cfg.source)
        imp = read_impressions(cfg.source.impressions_path) if cfg.source.impressions_path else None
        cat = read_table(cfg.source.catalogue_path) if cfg.source.catalogue_path else None
        raw = [ev["item_id"]] + ([imp["item_id"]] if imp else [])
        if cat is not None:
            raw.append(cat.column("item_id").to_numpy().astype(np.int64))
        self.raw_items = np.unique(np.concatenate(raw))  # sorted raw ids: order-independent vocab
        self.catalogue = cat
        order, self.members, self.bounds = _group(ev["member_id"], ev["timestamp"])
        self.events = {k: v[order] for k, v in ev.items() if k != "member_id"}
        self.events["item"] = self.remap(self.events.pop("item_id"))
        self.impressions: dict[int, dict[str, np.ndarray]] = {}
        if imp:
            self._group_impressions(imp)

    def remap(self, raw_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.raw_items, raw_ids).astype(np.int64) + 1

    def _group_impressions(self, imp: dict[str, np.ndarray]) -> None:
        order, members, bounds = _group(imp["member_id"], imp["timestamp"])
        item, label, ts = self.remap(imp["item_id"][order]), imp["label"][order], imp["timestamp"][order]
        for i, member in enumerate(members.tolist()):
            s = slice(bounds[i], bounds[i + 1])
            self.impressions[member] = {"item": item[s], "label": label[s].astype(np.int64),
                                        "timestamp": ts[s]}

    def sample(self, index: int, max_history: int | None) -> dict[str, Any]:
        """The tar entries of member ``index`` (its sample id)."""
        member = int(self.members[index])
        s = _tail(int(self.bounds[index]), int(self.bounds[index + 1]), max_history)
        seq = {k: self.events[k][s] for k in ("item", "action", "timestamp", "device")}
        out: dict[str, Any] = {"__key__": f"m{member:09d}".replace("-", "n"),
                               "seq.npz": encode_npz(seq),
                               "meta.json": json.dumps({"member_id": member, "sample_id": index},
                                                       sort_keys=True).encode()}
        if member in self.impressions:
            out["imp.npz"] = encode_npz(self.impressions[member])
        return out

    def num_events(self, index: int, max_history: int | None) -> int:
        s = _tail(int(self.bounds[index]), int(self.bounds[index + 1]), max_history)
        return s.stop - s.start


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _chunks(indices: np.ndarray, num_shards: int) -> Iterator[np.ndarray]:
    """Balanced contiguous chunks: shard sizes differ by at most one sample."""
    n = len(indices)
    for i in range(num_shards):
        yield indices[i * n // num_shards:(i + 1) * n // num_shards]


def _write_split(tables: _Tables, split: str, indices: np.ndarray, cfg: BuildConfig,
                 bar: tqdm) -> list[dict[str, Any]]:
    root = Path(cfg.output)
    (root / split).mkdir(parents=True, exist_ok=True)
    shards = []
    for i, chunk in enumerate(_chunks(indices, split_shard_count(split, len(indices), cfg.shards_per_split))):
        rel = f"{split}/shard-{i:06d}.tar"
        with wds.TarWriter(str(root / rel), encoder=False, mtime=0.0) as sink:
            for index in chunk.tolist():
                sink.write(tables.sample(index, cfg.max_history))
                bar.update(1)
        events = sum(tables.num_events(j, cfg.max_history) for j in chunk.tolist())
        shards.append({"path": rel, "samples": len(chunk), "events": events,
                       "sha256": _sha256(root / rel)})
    return shards


def _clean(root: Path) -> None:
    """Drop an old manifest first (an interrupted build must not look complete), then old shards."""
    (root / "manifest.json").unlink(missing_ok=True)
    for split in SPLITS:
        for old in (root / split).glob("shard-*.tar"):
            old.unlink()


def _write_catalogue(tables: _Tables, root: Path) -> str | None:
    if tables.catalogue is None:
        return None
    cat = tables.catalogue
    new_ids = tables.remap(cat.column("item_id").to_numpy().astype(np.int64))
    cat = cat.set_column(cat.column_names.index("item_id"), "item_id", pa.array(new_ids))
    pq.write_table(cat.take(pc.sort_indices(cat, [("item_id", "ascending")])),
                   root / "catalogue.parquet")
    return "catalogue.parquet"


def build_shards(cfg: BuildConfig, progress: bool = False) -> dict[str, Any]:
    """Read the source, write shards, item tables and (last) the manifest; return the manifest."""
    if not cfg.output or cfg.output == MISSING:
        raise ValueError("no output directory: pass output=DIR")
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    _clean(root)
    tables = _Tables(cfg)
    splits = {k: np.sort(v) for k, v in assign_splits(len(tables.members), cfg).items()}
    num_items = len(tables.raw_items) + 1
    np.save(root / "item_ids.npy", np.concatenate([[-1], tables.raw_items]).astype(np.int64))
    manifest_splits = {}
    with tqdm(total=len(tables.members), desc="shards", unit="member", disable=not progress) as bar:
        for split in SPLITS:
            shards = _write_split(tables, split, splits[split], cfg, bar)
            manifest_splits[split] = {"shards": shards, "samples": sum(s["samples"] for s in shards),
                                      "events": sum(s["events"] for s in shards)}
    np.save(root / "item_counts.npy", _train_counts(tables, splits["train"], cfg, num_items))
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": "foundation.data.writer.build_shards",
        "source": {"format": cfg.source.format, "path": str(cfg.source.path)},
        "seed": cfg.seed,
        "schema": SAMPLE_SCHEMA,
        "vocab": {"item": num_items, "action": len(ACTIONS), "device": len(DEVICES),
                  "gap": NUM_GAP_BUCKETS, "hour": NUM_HOURS},
        "actions": list(ACTIONS), "devices": list(DEVICES),
        "splits": manifest_splits,
        "totals": {"members": len(tables.members),
                   "events": sum(s["events"] for s in manifest_splits.values()),
                   "impressions": int(sum(len(v["item"]) for v in tables.impressions.values())),
                   "items": num_items - 1},
        "files": {"item_ids": "item_ids.npy", "item_counts": "item_counts.npy",
                  "catalogue": _write_catalogue(tables, root)},
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / "manifest.json")
    return manifest


def _train_counts(tables: _Tables, train: np.ndarray, cfg: BuildConfig, num_items: int) -> np.ndarray:
    """Event count per item id over the kept train events (vectorised over all rows)."""
    sizes = np.diff(tables.bounds)
    row_member = np.repeat(np.arange(len(sizes)), sizes)
    keep = np.isin(row_member, train)
    if cfg.max_history:
        from_end = tables.bounds[row_member + 1] - 1 - np.arange(len(row_member))
        keep &= from_end < cfg.max_history
    return np.bincount(tables.events["item"][keep], minlength=num_items).astype(np.int64)


def load_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a shard directory; a clear error when there is none."""
    root = Path(path)
    hint = (f"build shards with `foundation data build source.path=... output={root}` "
            f"or `foundation data synth output={root}`")
    if not root.is_dir():
        raise FileNotFoundError(f"shard directory {root} does not exist: {hint}")
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"no manifest.json in {root}: {hint}")
    return json.loads((root / "manifest.json").read_text())
