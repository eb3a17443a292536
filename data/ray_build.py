"""``foundation data build engine=ray``: the shards of ``build_shards``, byte for byte, from
Ray Data tasks, for event tables larger than one machine.

The driver holds what is per member or per item (the split plan, the item vocabulary), never
the events. Four passes over the parquet event table:

1. read: one task per parquet row group, each row numbered by its place in the table, so
   events at the same second keep the table's order, as in the single-process writer;
2. per item and per distinct timestamp: counts (the vocabulary, popularity, time cuts);
3. per member (a group-by): its event count, events before the time cuts, and its
   validation target, from which the driver plans the splits exactly as ``plan_splits`` does
   and places every sample in its shard;
4. per member again: its samples' tar entries; then per shard (a group-by on split and
   shard) a task writes the tar, in the planned order, and reports its checksum.

Ray is an optional extra (``pip install 'foundation[ray]'``); nothing here imports it at
module level, so the error for a missing Ray is ours.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from foundation.data.npz import decode_npz
from foundation.data.schema import EventSchema
from foundation.data.sources import SourceConfig, events_from_table, parquet_files, read_table
from foundation.data.writer import (
    NO_CUT,
    SPLITS,
    BuildConfig,
    ItemIds,
    Plan,
    RayConfig,
    RayShuffle,
    chunk_bounds,
    configured_cuts,
    cut_indices,
    plan_by_counts,
    plan_by_time,
    sample_entries,
    sample_rows,
    sample_schema,
    shard_path,
    split_entry,
    split_shard_count,
    start_build,
    without_removed_targets,
    write_item_files,
    write_manifest,
    write_shard,
)

# Sources only the single-process writer reads (they are per member or per item, joined there).
LOCAL_ONLY_SOURCES = ("impressions_path", "searches_path", "sends_path", "item_text_path",
                      "item_vectors_path", "item_media_dir")
ROW = "__row"  # an event's place in the table: the tie-break of events at the same second
DAY = 86_400  # seconds: the buckets in which split=time finds its cuts


def build_shards_ray(cfg: BuildConfig, progress: bool = False) -> dict[str, Any]:
    """``build_shards`` with Ray Data: the same shards, item tables and manifest."""
    _check_source(cfg.source)
    cfg, schema, root = start_build(cfg)
    stored = ("item", "timestamp", *schema.stored)
    groups = _row_groups(cfg.source)  # a missing or corrupt part fails before Ray starts
    with ray_session(cfg.ray, progress):
        events = _read_events(groups, cfg.source, schema)
        catalogue = read_table(cfg.source.catalogue_path) if cfg.source.catalogue_path else None
        items, counts_all = _item_counts(events, catalogue, cfg.ray.partitions)
        members, bounds, plan, split_info = _plan(events, cfg)
        item_files = write_item_files(root, cfg, schema, items, catalogue)
        val_targets = items.remap(members["val_target"][plan["val"][0]])
        plan["val"] = without_removed_targets(plan["val"], val_targets, item_files.removed["val"])
        layout = _layout(plan, bounds, cfg)
        written = _write_samples(events, root, cfg, layout, {
            "members": members["member_id"], "layout": layout, "raw_items": items.raw_items,
            "stored": stored, "max_history": cfg.max_history, "removed": item_files.removed})
    np.save(root / "item_counts.npy", _train_item_counts(written, items.count))
    np.save(root / "item_counts_all.npy", counts_all)
    return write_manifest(root, cfg, schema, item_files, {
        "created_by": "foundation.data.ray_build.build_shards_ray",
        "split_info": split_info, "schema": sample_schema(stored),
        "splits": _split_entries(written, layout), "items": None,
        "totals": {"members": len(members["member_id"]),
                   "events": int(written.column("distinct").to_numpy().sum()),  # distinct stored
                   "impressions": 0, "searches": 0, "sends": 0, "items": items.count - 1}})


def _plan(events: Any, cfg: BuildConfig) -> tuple[dict[str, np.ndarray], np.ndarray, Plan, dict[str, Any]]:
    """The member summaries, the members' row bounds (as the writer's, in member order) and
    the writer's split plan from them."""
    cuts = (configured_cuts(cfg) or _time_cuts(events, cfg)) if cfg.split == "time" else None
    members = _member_summaries(events, cfg, cuts)
    bounds = np.concatenate([[0], np.cumsum(members["count"])])
    plan, split_info = (plan_by_counts(bounds, cfg) if cuts is None else plan_by_time(
        bounds, (members["before_val"], members["before_test"]), cuts, cfg))
    return members, bounds, plan, split_info


def _write_samples(events: Any, root: Path, cfg: BuildConfig, layout: dict[str, dict[str, Any]],
                   member_kwargs: dict[str, Any]) -> pa.Table:
    """Each member's samples (``_member_samples``), then each shard written by one task;
    the shard tasks' reports."""
    for split in SPLITS:
        (root / split).mkdir(parents=True, exist_ok=True)
    samples = events.groupby("member_id", num_partitions=cfg.ray.partitions).map_groups(
        _member_samples, batch_format="pyarrow", fn_kwargs=member_kwargs)
    return _collect(samples.groupby(["split", "shard"], num_partitions=cfg.ray.partitions)
                    .map_groups(_write_shard, batch_format="pyarrow", fn_kwargs={"root": str(root)}))


def _train_item_counts(written: pa.Table, num_items: int) -> np.ndarray:
    """Events per item over the train samples (popularity, logQ), from the shard reports."""
    counts = np.zeros(num_items, np.int64)
    for shard_items, shard_counts in zip(*(written.column(name).to_pylist()
                                           for name in ("train_items", "train_counts"))):
        counts[np.asarray(shard_items, np.int64)] += np.asarray(shard_counts, np.int64)  # unique
    return counts


def _check_source(source: SourceConfig) -> None:
    if source.format != "parquet":
        raise ValueError(f"engine=ray reads a parquet event table (a file or a directory of "
                         f"parts), not source.format={source.format}: convert it, or build "
                         "with engine=local")
    given = [name for name in LOCAL_ONLY_SOURCES if getattr(source, name)]
    if given:
        raise ValueError(f"engine=ray builds from the events (and catalogue, item attributes) "
                         f"only; source.{given[0]} is read by engine=local: build with "
                         f"engine=local, or leave out {', '.join(f'source.{g}' for g in given)}")


@contextmanager
def ray_session(cfg: RayConfig, progress: bool) -> Iterator[None]:
    """A Ray to run on: the one already started in this process, or one started here (local,
    or connected to ``cfg.address``) and shut down after."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("engine=ray needs Ray Data: pip install 'foundation[ray]' "
                          "(`make env` installs it), or build with engine=local") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.address, num_cpus=cfg.num_cpus if cfg.address is None else None,
                 include_dashboard=False, log_to_driver=progress, logging_level=logging.WARNING)
    from ray.data.context import ShuffleStrategy

    context = ray.data.DataContext.get_current()
    before = context.enable_progress_bars, context.shuffle_strategy
    context.enable_progress_bars = progress
    context.shuffle_strategy = {RayShuffle.sort: ShuffleStrategy.SORT_SHUFFLE_PULL_BASED,
                                RayShuffle.hash: ShuffleStrategy.HASH_SHUFFLE}[cfg.shuffle]
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)
    try:
        yield
    finally:
        context.enable_progress_bars, context.shuffle_strategy = before
        if started:
            ray.shutdown()


def _collect(dataset: Any) -> pa.Table:
    """A (small) dataset's rows on the driver."""
    tables = list(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(tables) if tables else dataset.schema().base_schema.empty_table()


def _row_groups(source: SourceConfig) -> list[dict[str, Any]]:
    """The event table's parquet row groups (read on the driver, from the footers): file,
    index and the table row each starts at."""
    groups, offset = [], 0
    for file in parquet_files(Path(source.path)):
        try:
            metadata = pq.ParquetFile(file).metadata
        except pa.ArrowInvalid as err:
            raise ValueError(f"{file} is not a readable parquet file ({err}): rewrite or "
                             "remove it from source.path") from None
        for index in range(metadata.num_row_groups):
            groups.append({"path": str(file), "row_group": index, "offset": offset})
            offset += metadata.row_group(index).num_rows
    return groups


def _read_events(groups: list[dict[str, Any]], source: SourceConfig, schema: EventSchema) -> Any:
    """The events as a dataset of int64 columns (``read_events``'s) and ``ROW``, one read
    task per parquet row group."""
    import ray.data

    return ray.data.from_items(groups).map_batches(
        _read_row_groups, batch_size=1, batch_format="pyarrow",
        fn_kwargs={"source": source, "schema": schema})


def _read_row_groups(tasks: pa.Table, source: SourceConfig, schema: EventSchema) -> pa.Table:
    parts = []
    for task in tasks.to_pylist():
        path = Path(task["path"])
        table = pq.ParquetFile(path).read_row_group(task["row_group"])
        columns = events_from_table(table, source, schema, path)
        columns[ROW] = task["offset"] + np.arange(table.num_rows, dtype=np.int64)
        parts.append(pa.table(columns))
    return pa.concat_tables(parts)


def _item_counts(events: Any, catalogue: pa.Table | None, partitions: int | None
                 ) -> tuple[ItemIds, np.ndarray]:
    """The item vocabulary (event items and catalogue items) and each item's event count."""
    counted = _collect(events.groupby("item_id", num_partitions=partitions).count())
    raw = counted.column("item_id").to_numpy()
    extra = [catalogue.column("item_id").to_numpy().astype(np.int64)] if catalogue else []
    items = ItemIds(np.unique(np.concatenate([raw, *extra])))
    counts = np.zeros(items.count, np.int64)
    counts[items.remap(raw)] = counted.column("count()").to_numpy()
    return items, counts


def _time_cuts(events: Any, cfg: BuildConfig) -> tuple[int, int]:
    """``plan_splits``'s cuts by fractions: the times of the events at ``cut_indices`` in time
    order, exact, without sorting the events: events per day (per block, summed here) find
    the day of each cut and its rank within the day; that day's timestamps, sorted, the time."""
    timestamps = events.select_columns(["timestamp"])
    days = _collect(timestamps.map_batches(_events_per_day, batch_format="numpy"))
    day, block_counts = days.column("day").to_numpy(), days.column("count").to_numpy()
    unique_days = np.unique(day)
    ends = np.cumsum(np.bincount(np.searchsorted(unique_days, day), block_counts,
                                 len(unique_days)).astype(np.int64))  # events up to each day
    total = int(ends[-1]) if len(ends) else 0
    cuts = []
    for index in cut_indices(total, cfg):
        if index >= total:
            cuts.append(NO_CUT)
            continue
        at = int(np.searchsorted(ends, index, side="right"))
        in_day = _collect(timestamps.map_batches(_events_on_day, batch_format="numpy",
                                                 fn_kwargs={"day": int(unique_days[at])}))
        rank = index - (int(ends[at - 1]) if at else 0)
        cuts.append(int(np.sort(in_day.column("timestamp").to_numpy())[rank]))
    return tuple(cuts)


def _events_per_day(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    day, count = np.unique(batch["timestamp"] // DAY, return_counts=True)
    return {"day": day, "count": count}


def _events_on_day(batch: dict[str, np.ndarray], day: int) -> dict[str, np.ndarray]:
    return {"timestamp": batch["timestamp"][batch["timestamp"] // DAY == day]}


def _member_summaries(events: Any, cfg: BuildConfig, cuts: tuple[int, int] | None
                      ) -> dict[str, np.ndarray]:
    """Per member, in member order: its event count, its events before the time cuts and
    its validation sample's target (raw item id)."""
    summaries = _collect(events.select_columns(["member_id", "item_id", "timestamp", ROW])
                         .groupby("member_id", num_partitions=cfg.ray.partitions)
                         .map_groups(_member_summary, batch_format="pyarrow",
                                     fn_kwargs={"split": str(cfg.split), "cuts": cuts}))
    summaries = summaries.sort_by("member_id")
    return {name: summaries.column(name).to_numpy() for name in summaries.column_names}


def _time_order(group: pa.Table) -> np.ndarray:
    """A member's rows in time order, ties in table order (the writer's stable sort)."""
    return np.lexsort((group.column(ROW).to_numpy(), group.column("timestamp").to_numpy()))


def _member_summary(group: pa.Table, split: str, cuts: tuple[int, int] | None) -> pa.Table:
    order = _time_order(group)
    timestamp, item = (group.column(name).to_numpy()[order] for name in ("timestamp", "item_id"))
    count = len(order)
    before = [int(np.sum(timestamp < cut)) for cut in cuts] if cuts else [0, 0]
    # where the validation sample ends, as in plan_by_counts / plan_by_time
    val_end = {"member": count, "leave_one_out": count - 1, "time": before[1]}[split]
    return pa.table({"member_id": group.column("member_id").to_numpy()[:1],
                     "count": [count], "before_val": [before[0]], "before_test": [before[1]],
                     "val_target": [int(item[val_end - 1]) if val_end > 0 else 0]})


def _layout(plan: dict[str, tuple[np.ndarray, np.ndarray]], bounds: np.ndarray,
            cfg: BuildConfig) -> dict[str, dict[str, np.ndarray]]:
    """Per split, per member index: its sample's end (events from its first; -1: none), its
    shard and its place in the split (the writer's order: by member)."""
    layout = {}
    for split in SPLITS:
        members, ends = plan[split]
        count = split_shard_count(split, len(members), cfg.shards_per_split)
        place = np.arange(len(members))
        end, shard, position = (np.full(len(bounds) - 1, -1, np.int64) for _ in range(3))
        end[members] = ends - bounds[members]
        shard[members] = np.searchsorted(chunk_bounds(len(members), count), place, side="right") - 1
        position[members] = place
        layout[split] = {"end": end, "shard": shard, "position": position, "shards": count}
    return layout


def _member_samples(group: pa.Table, members: np.ndarray, layout: dict[str, dict[str, Any]],
                    raw_items: np.ndarray, stored: tuple[str, ...], max_history: int | None,
                    removed: dict[str, np.ndarray]) -> pa.Table:
    """A member's samples: split, shard, position, tar entries, events held; ``distinct``
    (on its first sample) counts the events any of them holds."""
    order = _time_order(group)
    member = int(group.column("member_id")[0].as_py())
    index = int(np.searchsorted(members, member))
    events = {name: group.column(name).to_numpy()[order] for name in stored if name != "item"}
    events["item"] = ItemIds(raw_items).remap(group.column("item_id").to_numpy()[order])
    rows: dict[str, list[Any]] = {name: [] for name in (
        "split", "shard", "position", "key", "seq", "meta", "held", "distinct")}
    held_any = np.zeros(len(order), bool)
    for split in SPLITS:
        end = int(layout[split]["end"][index])
        if end < 0:
            continue
        held = sample_rows(0, end, max_history, events["item"], removed.get(split))
        held_any[held] = True
        entries = sample_entries(member, index, {name: events[name][held] for name in stored})
        for name, value in (("split", split), ("shard", int(layout[split]["shard"][index])),
                            ("position", int(layout[split]["position"][index])),
                            ("key", entries["__key__"]), ("seq", entries["seq.npz"]),
                            ("meta", entries["meta.json"]), ("held", len(held)), ("distinct", 0)):
            rows[name].append(value)
    if rows["distinct"]:
        rows["distinct"][0] = int(held_any.sum())
    return pa.table(rows, schema=SAMPLE_SCHEMA)


SAMPLE_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.int64()), ("position", pa.int64()),
                           ("key", pa.string()), ("seq", pa.binary()), ("meta", pa.binary()),
                           ("held", pa.int64()), ("distinct", pa.int64())])


def _write_shard(group: pa.Table, root: str) -> pa.Table:
    """Write one shard's samples, in their planned order; its manifest entry, the events it
    holds per item (train: the popularity counts) and its share of the distinct events."""
    group = group.sort_by("position")
    split, shard = group.column("split")[0].as_py(), int(group.column("shard")[0].as_py())
    samples = [({"__key__": key, "seq.npz": seq, "meta.json": meta}, held) for key, seq, meta, held
               in zip(*(group.column(name).to_pylist() for name in ("key", "seq", "meta", "held")))]
    entry = write_shard(Path(root), shard_path(split, shard), samples)
    items = (np.concatenate([decode_npz(entries["seq.npz"])["item"] for entries, _ in samples])
             if split == "train" and samples else np.zeros(0, np.int64))
    train_items, train_counts = np.unique(items, return_counts=True)
    return pa.table({"split": [split], "shard": [shard], "path": [entry["path"]],
                     "samples": [entry["samples"]], "events": [entry["events"]],
                     "sha256": [entry["sha256"]], "distinct": [int(group.column("distinct").to_numpy().sum())],
                     "train_items": pa.array([train_items.tolist()], pa.list_(pa.int64())),
                     "train_counts": pa.array([train_counts.tolist()], pa.list_(pa.int64()))})


def _split_entries(written: pa.Table, layout: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's splits from the shard tasks' reports, checked against the plan."""
    entries = {}
    for split in SPLITS:
        reports = sorted((row for row in written.to_pylist() if row["split"] == split),
                         key=lambda row: row["shard"])
        if [row["shard"] for row in reports] != list(range(layout[split]["shards"])):
            raise RuntimeError(f"engine=ray wrote {len(reports)} {split} shards, planned "
                               f"{layout[split]['shards']}: a shard task's output went missing")
        entries[split] = split_entry([{name: row[name] for name in
                                       ("path", "samples", "events", "sha256")} for row in reports])
    return entries
