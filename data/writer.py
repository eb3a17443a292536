"""Shard writer: canonical events → per-member webdataset tar shards + manifest.json.

Output layout::

    OUTPUT/manifest.json              written last, atomically: a build is complete iff it exists
    OUTPUT/{train,val,test}/shard-000000.tar
    OUTPUT/item_ids.npy               raw item id per contiguous id (index 0 = padding, -1)
    OUTPUT/item_counts.npy            event count per item id over the train samples (popularity, logQ)
    OUTPUT/item_counts_all.npy        event count per item id over all source events (leaky popularity)
    OUTPUT/item_attributes.npz        jagged attribute ids per item id (when attributes are given)
    OUTPUT/cold_items.npy             item ids removed from train/val samples (cold_items=F)
    OUTPUT/cold_val_items.npy         item ids removed from train samples only (cold_val_items=F)
    OUTPUT/catalogue.parquet          catalogue with remapped ids (when a catalogue is given)
    OUTPUT/items/shard-000000.tar     item content, one sample per item (data/items.py)

Every shard byte is a function of the events and the seed (fixed tar mtime/owner, fixed zip
timestamps), so the same input in parquet, csv or jsonl yields identical shards and checksums.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import webdataset as wds
from omegaconf import MISSING
from tqdm import tqdm

from foundation.checksum import sha256
from foundation.choices import RAISE, Choice, OnError, choice
from foundation.data.items import content_items, read_item_content, write_item_shards
from foundation.data.npz import encode_npz
from foundation.data.schema import EventSchema, default_features
from foundation.data.sources import (
    SourceConfig,
    read_events,
    read_impressions,
    read_item_attributes,
    read_searches,
    read_sends,
    read_table,
)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_KINDS = ("member", "leave_one_out", "time")
# split=auto: a format's own split where its files carry one, else member
# Files whose published numbers all use leave-one-out default to it.
FORMAT_SPLITS = {"unisrec": "leave_one_out", "sasrec_txt": "leave_one_out"}
LOO_MIN_EVENTS = 3  # leave_one_out: shorter members go to train only, whole (as SASRec does)
NO_CUT = int(np.iinfo(np.int64).max)  # a time cut past every event


class SplitKind(Choice):
    auto = "auto"  # a format's own split where its files carry one (FORMAT_SPLITS), else member
    member = "member"
    leave_one_out = "leave_one_out"
    time = "time"


class BuildEngine(Choice):
    local = "local"  # this process (build_shards)
    ray = "ray"  # Ray Data tasks on a local Ray or a cluster (data/ray_build.py): same bytes


class RayShuffle(Choice):
    sort = "sort"  # Ray's sort-based (pull) shuffle: tasks only, quick to start
    hash = "hash"  # Ray's hash shuffle: aggregator actors, for the largest tables


@dataclass
class RayConfig:
    """``engine=ray``: where the tasks run. Workers write the shards themselves, so on a
    cluster ``output`` must be a directory every node sees (a shared file system)."""

    address: str | None = None  # None: a Ray on this machine; "auto" or ray://HEAD:10001: a cluster
    num_cpus: int | None = None  # the local Ray's CPUs (None: all of them)
    partitions: int | None = None  # of each group-by shuffle (None: Ray's default, 200)
    shuffle: RayShuffle = RayShuffle.sort


@dataclass
class BuildConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    output: str = MISSING
    engine: BuildEngine = BuildEngine.local
    ray: RayConfig = field(default_factory=RayConfig)
    split: SplitKind = SplitKind.auto  # see plan_splits
    seed: int = 0  # member split
    val_fraction: float = 0.1  # of the members (split=member) or of the events (split=time)
    test_fraction: float = 0.1
    # split=time: the cuts themselves (unix seconds or an ISO date/time, UTC), instead of the
    # times from which the last val_fraction + test_fraction / test_fraction of events lie
    val_start: str | None = None
    test_start: str | None = None
    shards_per_split: int = 8  # train; val/test get fewer (see split_shard_count)
    max_history: int | None = None  # keep only each member's last N events
    # Cold start: a seeded fraction of the catalogue is removed from every train and val
    # sample (after max_history); test samples keep them. The items stay in the catalogue.
    cold_items: float = 0.0
    cold_seed: int = 0
    # A further seeded fraction removed from train samples only: validation's cold targets,
    # on which a content-match model calibrates the weight of items it scores without an
    # ID (model.cold_budget). Drawn after cold_items, so that set does not change.
    cold_val_items: float = 0.0
    # The event features, each declared once (data/schema.py): a categorical one is read from
    # the events' column of its name (source.columns.<name> maps another), derived ones from
    # the timestamps. Add one with +features.NAME='{vocab: [a, b]}' (values are EventFeature
    # fields, checked by EventSchema when the build starts).
    features: dict[str, Any] = field(default_factory=default_features)
    # A media file that cannot be read (or breaks a limit): raise, naming it, or skip it,
    # counted in manifest.items.skipped.
    on_error: OnError = RAISE


def choose_cold_items(num_items: int, fraction: float, seed: int,
                      val_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-item-id masks of the cold items (a seeded ``fraction`` of ids 1..num_items-1)
    and of the validation-only cold items (the next ``val_fraction``)."""
    for name, value in (("cold_items", fraction), ("cold_val_items", val_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}={value}: a fraction of the catalogue in [0, 1)")
    if fraction + val_fraction >= 1:
        raise ValueError(f"cold_items + cold_val_items = {fraction + val_fraction}: leave "
                         "some of the catalogue warm (their sum must stay below 1)")
    order = 1 + np.random.default_rng(seed).permutation(num_items - 1)
    count, val_count = (int(round((num_items - 1) * f)) for f in (fraction, val_fraction))
    cold, val_cold = np.zeros(num_items, dtype=bool), np.zeros(num_items, dtype=bool)
    cold[order[:count]] = True
    val_cold[order[count:count + val_count]] = True
    return cold, val_cold


def split_shard_count(split: str, samples: int, shards_per_split: int) -> int:
    """Train gets shards_per_split; val/test fewer but ≥4 so 2 ranks × 2 workers all read."""
    wanted = shards_per_split if split == "train" else min(shards_per_split, max(4, shards_per_split // 4))
    return max(1, min(wanted, samples)) if samples else 0


def _check_fractions(cfg: BuildConfig) -> None:
    if not 0 <= cfg.val_fraction + cfg.test_fraction < 1:
        raise ValueError(f"val_fraction + test_fraction must be in [0, 1), got "
                         f"{cfg.val_fraction} + {cfg.test_fraction}")


def assign_splits(num_members: int, cfg: BuildConfig) -> dict[str, np.ndarray]:
    """Member indices per split: a seeded permutation, cut test | val | train."""
    _check_fractions(cfg)
    perm = np.random.default_rng(cfg.seed).permutation(num_members)
    n_test = int(round(num_members * cfg.test_fraction))
    n_val = int(round(num_members * cfg.val_fraction))
    return {"test": perm[:n_test], "val": perm[n_test:n_test + n_val],
            "train": perm[n_test + n_val:]}


Plan = dict[str, tuple[np.ndarray, np.ndarray]]  # split → (member index, row end) per sample


def plan_splits(bounds: np.ndarray, timestamp: np.ndarray, cfg: BuildConfig) -> tuple[Plan, dict[str, Any]]:
    """The samples of each split, and what the manifest records about the split.

    A sample is member ``i``'s events ``bounds[i]:end`` (then cut to its last ``max_history``).
    ``member``: each member's whole sequence goes to one split (seeded, by fractions).
    ``leave_one_out``: every member with ≥ 3 events has three samples: train ends 2 events
    early, val 1 early, test holds all (shorter members: train only, whole, counted).
    ``time``: two global cuts, ``val_start`` and ``test_start``: given, or the times from which
    the last ``val_fraction + test_fraction`` and ``test_fraction`` of all events lie. Train holds a
    member's events before ``val_start``; val ends at its last event before ``test_start`` and
    exists if that event is at or after ``val_start``; test holds all and exists if the last
    event is at or after ``test_start``. Val/test samples need ≥ 2 events (target + history).
    """
    if cfg.split != "time":
        return plan_by_counts(bounds, cfg)
    cuts = configured_cuts(cfg)
    if cuts is None:  # by fractions
        ordered = np.sort(timestamp)
        cuts = tuple(int(ordered[index]) if index < len(ordered) else NO_CUT
                     for index in cut_indices(len(ordered), cfg))
    row_member = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
    before = tuple(np.bincount(row_member, timestamp < cut, len(bounds) - 1).astype(np.int64)
                   for cut in cuts)  # each member's events before the cut
    return plan_by_time(bounds, before, cuts, cfg)


def plan_by_counts(bounds: np.ndarray, cfg: BuildConfig) -> tuple[Plan, dict[str, Any]]:
    """``plan_splits`` for the member and leave-one-out splits: only event counts matter."""
    starts, ends = bounds[:-1], bounds[1:]
    if cfg.split == "member":
        plan = {k: np.sort(v) for k, v in assign_splits(len(starts), cfg).items()}
        return ({k: (v, ends[v]) for k, v in plan.items()},
                {"seed": cfg.seed, "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction})
    everyone, long = np.arange(len(starts)), np.flatnonzero(ends - starts >= LOO_MIN_EVENTS)
    train_end = ends.copy()
    train_end[long] -= 2
    return ({"train": (everyone, train_end), "val": (long, ends[long] - 1),
             "test": (long, ends[long])}, {"short_members": len(starts) - len(long)})


def plan_by_time(bounds: np.ndarray, before: tuple[np.ndarray, np.ndarray], cuts: tuple[int, int],
                 cfg: BuildConfig) -> tuple[Plan, dict[str, Any]]:
    """``plan_splits`` for the time split, from each member's event counts before the cuts."""
    starts, ends = bounds[:-1], bounds[1:]
    (before_val, before_test), (val_start, test_start) = before, cuts
    # val/test samples need a target past the cut and at least one event before it
    train, val = np.flatnonzero(before_val > 0), np.flatnonzero((before_test > before_val) & (before_test >= 2))
    test = np.flatnonzero((ends - starts > before_test) & (ends - starts >= 2))
    return ({"train": (train, starts[train] + before_val[train]),
             "val": (val, starts[val] + before_test[val]), "test": (test, ends[test])},
            {"val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
             "val_start": val_start, "test_start": test_start,
             "cuts": "given" if cfg.val_start is not None else "fractions"})


def configured_cuts(cfg: BuildConfig) -> tuple[int, int] | None:
    """``(val_start, test_start)`` of a time split when given, else None (cut by fractions)."""
    if (cfg.val_start is None) != (cfg.test_start is None):
        raise ValueError("split=time: give both val_start and test_start, or neither (then "
                         "val_fraction and test_fraction place the cuts)")
    if cfg.val_start is None:
        _check_fractions(cfg)
        return None
    val_start, test_start = _unix_seconds("val_start", cfg.val_start), _unix_seconds(
        "test_start", cfg.test_start)
    if val_start > test_start:
        raise ValueError(f"split=time: val_start={cfg.val_start} is after "
                         f"test_start={cfg.test_start}")
    return val_start, test_start


def cut_indices(num_events: int, cfg: BuildConfig) -> tuple[int, int]:
    """Where, in time order, the last ``val_fraction + test_fraction`` and the last
    ``test_fraction`` of the events start (``num_events``: none)."""
    return tuple(num_events - int(round(num_events * fraction))
                 for fraction in (cfg.val_fraction + cfg.test_fraction, cfg.test_fraction))


def _unix_seconds(key: str, value: str | int) -> int:
    """Unix seconds, or an ISO 8601 date/time (UTC unless it names a zone) → unix seconds."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{key}={value!r} is neither unix seconds nor an ISO date/time "
                         f"(e.g. {key}=2019-01-01 or {key}=1546300800)") from None
    moment = moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
    return int(moment.timestamp())


def _group(member_id: np.ndarray, timestamp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable (member, time) order, the sorted unique members and each one's row range start."""
    order = np.lexsort((timestamp, member_id))  # lexsort is stable: ties keep input order
    members, starts = np.unique(member_id[order], return_index=True)
    return order, members, np.append(starts, len(order))


@dataclass
class ItemIds:
    """The item vocabulary: sorted raw ids, contiguous id ``i + 1`` for ``raw_items[i]`` (0 pads)."""

    raw_items: np.ndarray

    @property
    def count(self) -> int:
        """The vocab size, padding included."""
        return len(self.raw_items) + 1

    def remap(self, raw_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.raw_items, raw_ids).astype(np.int64) + 1


class _Tables:
    """Events and impressions grouped per member, items remapped to 1..N."""

    def __init__(self, cfg: BuildConfig, schema: EventSchema):
        self.stored = ("item", "timestamp", *schema.stored)  # the columns of seq.npz
        ev = read_events(cfg.source, schema)
        imp = read_impressions(cfg.source.impressions_path) if cfg.source.impressions_path else None
        searches = read_searches(cfg.source.searches_path) if cfg.source.searches_path else None
        sends = read_sends(cfg.source.sends_path) if cfg.source.sends_path else None
        cat = read_table(cfg.source.catalogue_path) if cfg.source.catalogue_path else None
        self.content, self.skipped_media = read_item_content(cfg.source, cfg.on_error)
        # Items with content but no events stay in the catalogue: they can be recommended.
        raw = [ev["item_id"], content_items(self.content)] + ([imp["item_id"]] if imp else [])
        raw += [table["item_id"] for table in (searches, sends) if table]
        if cat is not None:
            raw.append(cat.column("item_id").to_numpy().astype(np.int64))
        self.items = ItemIds(np.unique(np.concatenate(raw)))  # sorted: order-independent vocab
        self.catalogue = cat
        order, self.members, self.bounds = _group(ev["member_id"], ev["timestamp"])
        self.events = {k: v[order] for k, v in ev.items() if k != "member_id"}
        self.events["item"] = self.items.remap(self.events.pop("item_id"))
        self.impressions = self._per_member(imp, ("label",)) if imp else {}
        self.searches = self._per_member(searches, ("query",)) if searches else {}
        self.sends = self._per_member(sends, tuple(set(sends) - {"member_id", "item_id",
                                                                  "timestamp"})) if sends else {}

    def _per_member(self, table: dict[str, np.ndarray], columns: tuple[str, ...]
                    ) -> dict[int, dict[str, np.ndarray]]:
        """Impressions (label), searches (query) or sends (sent, outcome[, uplift]) of each
        member, in time order, items remapped."""
        order, members, bounds = _group(table["member_id"], table["timestamp"])
        values = {"item": self.items.remap(table["item_id"][order]), "timestamp": table["timestamp"][order],
                  **{name: table[name][order] for name in sorted(columns)}}
        return {member: {name: v[bounds[i]:bounds[i + 1]] for name, v in values.items()}
                for i, member in enumerate(members.tolist())}

    def sample(self, index: int, end: int, max_history: int | None,
               drop: np.ndarray | None = None) -> tuple[dict[str, Any], int]:
        """The tar entries of member ``index`` (its sample id) up to row ``end``, and how many
        events they hold; ``drop`` (per item id) removes those items' events."""
        member = int(self.members[index])
        rows = sample_rows(int(self.bounds[index]), end, max_history, self.events["item"], drop)
        out = sample_entries(member, index, {k: self.events[k][rows] for k in self.stored})
        if member in self.impressions:
            out["imp.npz"] = encode_npz(self.impressions[member])
        if member in self.searches:
            out["search.npz"] = encode_npz(self.searches[member])
        if member in self.sends:
            out["sends.npz"] = encode_npz(self.sends[member])
        return out, len(rows)

    def held(self, samples: tuple[np.ndarray, np.ndarray], max_history: int | None) -> np.ndarray:
        """Per event row: how many of these samples (member index, row end) hold it."""
        members, ends = samples
        starts = self.bounds[members]
        lo = np.maximum(starts, ends - max_history) if max_history else starts
        delta = np.zeros(len(self.events["item"]) + 1, np.int64)
        np.add.at(delta, lo, 1)
        np.add.at(delta, ends, -1)
        return np.cumsum(delta[:-1])


def sample_rows(start: int, end: int, max_history: int | None, item: np.ndarray,
                drop: np.ndarray | None) -> np.ndarray:
    """The event rows of the sample ``start:end``: its last ``max_history``, less the events
    of items ``drop`` marks (per item id)."""
    rows = np.arange(max(start, end - max_history) if max_history else start, end)
    return rows if drop is None else rows[~drop[item[rows]]]


def sample_entries(member: int, index: int, seq: dict[str, np.ndarray]) -> dict[str, Any]:
    """The tar entries of a sample: its events (``seq``) and which member it is."""
    return {"__key__": f"m{member:09d}".replace("-", "n"), "seq.npz": encode_npz(seq),
            "meta.json": json.dumps({"member_id": member, "sample_id": index},
                                    sort_keys=True).encode()}


def without_removed_targets(samples: tuple[np.ndarray, np.ndarray], targets: np.ndarray,
                            removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The samples whose target (last event's item, ``targets``) is not a removed item. Cut
    short instead, a sample's target would become an earlier event, which training may hold
    (leave-one-out and time splits share members), and validation would reward memorising it."""
    members, ends = samples
    keep = ~removed[targets]
    return members[keep], ends[keep]


def chunk_bounds(num_samples: int, num_shards: int) -> np.ndarray:
    """Balanced contiguous chunks: shard ``i`` holds samples ``bounds[i]:bounds[i + 1]``, shard
    sizes differ by at most one sample."""
    return np.arange(num_shards + 1) * num_samples // max(num_shards, 1)


def write_shard(root: Path, rel: str, samples: Iterable[tuple[dict[str, Any], int]]) -> dict[str, Any]:
    """Write ``samples`` ((entries, events held) each; those holding none are left out) to the
    tar ``root/rel``; its manifest entry."""
    events = written = 0
    # An int mtime: a float one gets a pax header per member, twice the tar to parse.
    with wds.TarWriter(str(root / rel), encoder=False, mtime=0) as sink:
        for entries, held in samples:
            if held == 0:  # every event was a removed (cold) item
                continue
            sink.write(entries)
            events, written = events + held, written + 1
    return {"path": rel, "samples": written, "events": events, "sha256": sha256(root / rel)}


def _write_split(tables: _Tables, split: str, samples: tuple[np.ndarray, np.ndarray],
                 cfg: BuildConfig, bar: tqdm, drop: np.ndarray | None) -> list[dict[str, Any]]:
    (Path(cfg.output) / split).mkdir(parents=True, exist_ok=True)
    members, ends = samples

    def chunk(lo: int, hi: int) -> Iterator[tuple[dict[str, Any], int]]:
        for index, end in zip(members[lo:hi].tolist(), ends[lo:hi].tolist()):
            bar.update(1)
            yield tables.sample(index, end, cfg.max_history, drop)

    bounds = chunk_bounds(len(members), split_shard_count(split, len(members), cfg.shards_per_split))
    return [write_shard(Path(cfg.output), shard_path(split, i), chunk(lo, hi))
            for i, (lo, hi) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist()))]


def shard_path(split: str, index: int) -> str:
    return f"{split}/shard-{index:06d}.tar"


def _clean(root: Path) -> None:
    """Drop an old manifest first (an interrupted build must not look complete), then old shards."""
    (root / "manifest.json").unlink(missing_ok=True)
    (root / "item_attributes.npz").unlink(missing_ok=True)
    for old in (root / "items").glob("shard-*.tar"):
        old.unlink()
    for split in SPLITS:
        for old in (root / split).glob("shard-*.tar"):
            old.unlink()


def _write_catalogue(items: ItemIds, catalogue: pa.Table | None, root: Path) -> str | None:
    if catalogue is None:
        return None
    new_ids = items.remap(catalogue.column("item_id").to_numpy().astype(np.int64))
    cat = catalogue.set_column(catalogue.column_names.index("item_id"), "item_id", pa.array(new_ids))
    pq.write_table(cat.take(pc.sort_indices(cat, [("item_id", "ascending")])),
                   root / "catalogue.parquet")
    return "catalogue.parquet"


def _write_item_attributes(items: ItemIds, path: str, root: Path) -> int:
    """``item_attributes.npz``: row i (contiguous item id, 0 = padding) holds the item's
    attribute ids ``values[offsets[i]:offsets[i + 1]]``, remapped to 1..A (0 = padding);
    ``attribute_ids`` maps them back to the raw ids. Items absent from the source are ignored,
    items without attributes get an empty row. Returns the attribute vocab size A + 1."""
    raw_items, lengths, raw_values = read_item_attributes(path)
    if len(np.unique(raw_items)) < len(raw_items):
        raise ValueError(f"{path} lists an item id twice (e.g. as \"7\" and \"07\")")
    known = np.isin(raw_items, items.raw_items)
    item = np.repeat(items.remap(raw_items[known]), lengths[known])
    raw_values = raw_values[np.repeat(known, lengths)]
    attribute_ids = np.unique(raw_values)
    order = np.argsort(item, kind="stable")  # rows by item id, each row in its file order
    values = (np.searchsorted(attribute_ids, raw_values) + 1)[order].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(item, minlength=items.count))])
    (root / "item_attributes.npz").write_bytes(encode_npz({
        "values": values, "offsets": offsets.astype(np.int64),
        "attribute_ids": np.concatenate([[-1], attribute_ids]).astype(np.int64)}))
    return len(attribute_ids) + 1


def build_shards(cfg: BuildConfig, progress: bool = False) -> dict[str, Any]:
    """Read the source, write shards, item tables and (last) the manifest; return the manifest."""
    cfg, schema, root = start_build(cfg)
    tables = _Tables(cfg, schema)
    plan, split_info = plan_splits(tables.bounds, tables.events["timestamp"], cfg)
    item_files = write_item_files(root, cfg, schema, tables.items, tables.catalogue)
    items = write_item_shards(root, tables.content, tables.items.remap, tables.skipped_media)
    events, removed = tables.events["item"], item_files.removed
    plan["val"] = without_removed_targets(plan["val"], events[plan["val"][1] - 1], removed["val"])
    manifest_splits = {}
    total = sum(len(members) for members, _ in plan.values())
    with tqdm(total=total, desc="shards", unit="sample", disable=not progress) as bar:
        for split in SPLITS:
            manifest_splits[split] = split_entry(_write_split(tables, split, plan[split], cfg, bar,
                                                              removed.get(split)))
    held = {split: tables.held(plan[split], cfg.max_history) for split in SPLITS}
    for split, dropped in removed.items():  # these items' events left its samples
        held[split] = held[split] * ~dropped[events]
    num_items = tables.items.count
    np.save(root / "item_counts.npy", np.bincount(events[held["train"] > 0], minlength=num_items).astype(np.int64))
    np.save(root / "item_counts_all.npy", np.bincount(events, minlength=num_items).astype(np.int64))
    return write_manifest(root, cfg, schema, item_files, {
        "created_by": "foundation.data.writer.build_shards",
        "split_info": split_info, "schema": sample_schema(tables.stored),
        "splits": manifest_splits,
        "items": items,  # item content shards (None without content)
        "totals": {"members": len(tables.members),
                   "events": int((sum(held.values()) > 0).sum()),  # distinct events stored
                   "impressions": int(sum(len(v["item"]) for v in tables.impressions.values())),
                   "searches": int(sum(len(v["item"]) for v in tables.searches.values())),
                   "sends": int(sum(len(v["item"]) for v in tables.sends.values())),
                   "items": num_items - 1}})


def start_build(cfg: BuildConfig) -> tuple[BuildConfig, EventSchema, Path]:
    """Check the config (the split it resolves to, the event features), then clear the output
    of an older build; the resolved config, the schema and the output directory."""
    if not cfg.output or cfg.output == MISSING:
        raise ValueError("no output directory: pass output=DIR")
    if cfg.split == "auto":
        cfg = dataclasses.replace(cfg, split=FORMAT_SPLITS.get(cfg.source.format, "member"))
    if cfg.split not in SPLIT_KINDS:
        raise ValueError(f"unknown split {cfg.split!r}: pass split= one of "
                         f"{['auto', *SPLIT_KINDS]}")
    if cfg.source.format in FORMAT_SPLITS and cfg.split != FORMAT_SPLITS[cfg.source.format]:
        raise ValueError(f"source.format={cfg.source.format} files carry their own "
                         f"{FORMAT_SPLITS[cfg.source.format]} split: leave split=auto")
    schema = EventSchema(cfg.features)  # a bad declaration fails before anything is written
    choice(OnError, cfg.on_error, "on_error")
    root = Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    _clean(root)
    return cfg, schema, root


@dataclass
class ItemFiles:
    """What ``write_item_files`` wrote: the vocab sizes, the cold items and each split's
    removed items (per item id), and the manifest's file entries."""

    vocab: dict[str, int]
    cold: np.ndarray
    val_cold: np.ndarray
    removed: dict[str, np.ndarray]
    files: dict[str, str | None]


def write_item_files(root: Path, cfg: BuildConfig, schema: EventSchema, items: ItemIds,
                     catalogue: pa.Table | None) -> ItemFiles:
    """The item tables: ids, attributes, catalogue and the (seeded) cold items."""
    np.save(root / "item_ids.npy", np.concatenate([[-1], items.raw_items]).astype(np.int64))
    vocab = {"item": items.count, **schema.sizes}
    if cfg.source.item_attributes_path:
        vocab["attribute"] = _write_item_attributes(items, cfg.source.item_attributes_path, root)
    cold, val_cold = choose_cold_items(items.count, cfg.cold_items, cfg.cold_seed,
                                       cfg.cold_val_items)
    np.save(root / "cold_items.npy", np.flatnonzero(cold).astype(np.int64))
    np.save(root / "cold_val_items.npy", np.flatnonzero(val_cold).astype(np.int64))
    files = {"item_ids": "item_ids.npy", "item_counts": "item_counts.npy",
             "item_counts_all": "item_counts_all.npy",
             "item_attributes": "item_attributes.npz" if "attribute" in vocab else None,
             "cold_items": "cold_items.npy", "cold_val_items": "cold_val_items.npy",
             "catalogue": _write_catalogue(items, catalogue, root)}
    return ItemFiles(vocab, cold, val_cold, {"train": cold | val_cold, "val": cold}, files)


def split_entry(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """A split's manifest entry: its shards and their totals."""
    return {"shards": shards, "samples": sum(s["samples"] for s in shards),
            "events": sum(s["events"] for s in shards)}


def write_manifest(root: Path, cfg: BuildConfig, schema: EventSchema, item_files: ItemFiles,
                   built: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest atomically, last (a build is complete iff it exists); return it.
    ``built`` holds what the builder measured: created_by, split_info, schema, splits, items,
    totals."""
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {"format": cfg.source.format, "path": str(cfg.source.path)},
        "seed": cfg.seed,
        "split": cfg.split,
        "vocab": item_files.vocab,
        "features": schema.to_manifest(),
        "cold_items": {"fraction": cfg.cold_items, "seed": cfg.cold_seed,
                       "count": int(item_files.cold.sum()), "removed_from": ["train", "val"]},
        "cold_val_items": {"fraction": cfg.cold_val_items, "count": int(item_files.val_cold.sum()),
                           "removed_from": ["train"]},
        "files": item_files.files,
        **built,
    }
    tmp = root / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, root / "manifest.json")
    return manifest


def sample_schema(stored: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """What one shard sample holds (entry → array → dtype), recorded in the manifest."""
    return {"seq.npz": {name: "int64" for name in stored},
            "imp.npz": {"item": "int64", "label": "int64", "timestamp": "int64"},
            "meta.json": {"member_id": "int", "sample_id": "int"}}


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
