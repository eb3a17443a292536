"""Event and item schemas: vocabularies and the derived time features every model reads."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Id 0 is padding in every vocabulary, so jagged values padded with 0 never alias a real token.
ACTIONS: tuple[str, ...] = ("<pad>", "play", "complete", "thumbs_up", "thumbs_down", "add_to_list",
                            "search")
DEVICES: tuple[str, ...] = ("<pad>", "tv", "mobile", "web", "tablet")
NUM_GAP_BUCKETS = 16
NUM_HOURS = 25  # 0 = pad, 1..24 = hour of day + 1

EVENT_COLUMNS: tuple[str, ...] = ("member_id", "item_id", "timestamp", "action", "device")
OPTIONAL_EVENT_COLUMNS: dict[str, str] = {"action": "play", "device": "<pad>"}
IMPRESSION_COLUMNS: tuple[str, ...] = ("member_id", "item_id", "timestamp", "label")
CATALOGUE_COLUMNS: tuple[str, ...] = ("item_id", "genres", "series_id", "episode", "release_time")

# What one shard sample holds (name -> dtype), recorded in manifest.json.
SAMPLE_SCHEMA: dict[str, dict[str, str]] = {
    "seq.npz": {"item": "int64", "action": "int64", "timestamp": "int64", "device": "int64"},
    "imp.npz": {"item": "int64", "label": "int64", "timestamp": "int64"},
    "meta.json": {"member_id": "int", "sample_id": "int"},
}


def encode_vocab(values: np.ndarray, vocab: Sequence[str], column: str) -> np.ndarray:
    """Names (str) or ids (int) → int64 ids; unknown names/ids raise naming the column."""
    values = np.asarray(values)
    if values.dtype.kind in "iu":
        ids = values.astype(np.int64)
        bad = (ids < 0) | (ids >= len(vocab))
        if bad.any():
            raise ValueError(f"column {column!r} has id {ids[bad][0]} outside 0..{len(vocab) - 1} "
                             f"(vocabulary {list(vocab)})")
        return ids
    lookup = {name: i for i, name in enumerate(vocab)}
    uniques, inverse = np.unique(values.astype(str), return_inverse=True)
    unknown = [u for u in uniques if u not in lookup]
    if unknown:
        raise ValueError(f"column {column!r} has unknown value(s) {unknown[:5]} "
                         f"(known: {list(vocab[1:])})")
    return np.array([lookup[u] for u in uniques], dtype=np.int64)[inverse.reshape(-1)]


def time_gap_bucket(gap_seconds: np.ndarray, num_buckets: int = NUM_GAP_BUCKETS) -> np.ndarray:
    """Log2-minute buckets: 0 pad, 1 first event (gap -1), 2.. growing gaps, capped."""
    gap = np.asarray(gap_seconds, dtype=np.float64)
    scaled = np.floor(np.log2(1.0 + np.maximum(gap, 0.0) / 60.0))
    buckets = 2 + np.minimum(num_buckets - 3, scaled).astype(np.int64)
    return np.where(gap < 0, 1, buckets).astype(np.int64)


def sequence_gaps(timestamp: np.ndarray) -> np.ndarray:
    """Seconds since the previous event of one time-ordered sequence; -1 for the first."""
    ts = np.asarray(timestamp, dtype=np.int64)
    return np.concatenate([np.full(min(1, ts.size), -1, np.int64), np.diff(ts)])


def hour_of_day(ts: np.ndarray) -> np.ndarray:
    """UTC hour of day as 1..24, keeping 0 free for padding."""
    return (np.asarray(ts, dtype=np.int64) // 3600) % 24 + 1
