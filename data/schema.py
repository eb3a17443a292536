"""The event feature schema: every event feature declared once, and the vocabulary helpers.

A feature is one ``EventFeature`` under ``features.<name>`` of the build config
(``configs/data_build.yaml``). The build records the schema in ``manifest.json``; from there
it drives everything downstream, so a new feature is one entry plus its column in the events:

* the writer stores each categorical feature's ids in ``seq.npz`` (a source without the
  column gets the feature's ``default``); derived features are computed from timestamps;
* the loader and the predictor turn stored or served values into model ids with the same
  ``EventSchema.event_ids``, so training and serving cannot drift apart;
* the model gets one sharded embedding table per feature (``<name>_table``, placed by the
  TorchRec planner beside the item table) and sums them into each event's token;
* the bundle manifest lists the features with their vocabularies, and ``History(items,
  timestamps, <name>=[...])`` is how a caller serves each one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

PAD = "<pad>"  # id 0 of every vocabulary: jagged values padded with 0 never alias a value
# The default vocabularies (names of ids 1..): the synthetic world and most sources use these.
ACTION_NAMES = ("play", "complete", "thumbs_up", "thumbs_down", "add_to_list", "search")
DEVICE_NAMES = ("tv", "mobile", "web", "tablet")
ACTIONS: tuple[str, ...] = (PAD, *ACTION_NAMES)
DEVICES: tuple[str, ...] = (PAD, *DEVICE_NAMES)
NUM_GAP_BUCKETS = 16
NUM_HOURS = 25  # 0 = pad, 1..24 = hour of day + 1

EVENT_COLUMNS: tuple[str, ...] = ("member_id", "item_id", "timestamp")  # + categorical features
IMPRESSION_COLUMNS: tuple[str, ...] = ("member_id", "item_id", "timestamp", "label")
SEARCH_COLUMNS: tuple[str, ...] = ("member_id", "item_id", "timestamp", "query")
# Randomised messages: sent 1 / held out 0, outcome 1 = the title was played in the window;
# an optional float ``uplift`` column holds a simulator's true uplift (for checking only).
SEND_COLUMNS: tuple[str, ...] = ("member_id", "item_id", "timestamp", "sent", "outcome")
CATALOGUE_COLUMNS: tuple[str, ...] = ("item_id", "genres", "series_id", "episode", "release_time")
# Names the model and the batches use for other things.
RESERVED_NAMES = frozenset({"item", "candidate", "negative", "timestamp", "lengths",
                            *EVENT_COLUMNS})


class FeatureKind(str, Enum):
    categorical = "categorical"  # a column of the event log: names from `vocab` (or their ids)
    time_gap = "time_gap"  # from timestamps: log2-minute bucket of the gap to the previous event
    hour = "hour"  # from timestamps: the event's UTC hour of day


@dataclass
class EventFeature:
    kind: FeatureKind = FeatureKind.categorical
    vocab: list[str] = field(default_factory=list)  # categorical: the names of ids 1, 2, ...
    default: str = PAD  # categorical: the value of events whose source or History lacks it
    context: bool = False  # in the tokens only with model.context_features=true

    def size(self) -> int:
        """Rows of the feature's embedding table (padding included)."""
        if self.kind == FeatureKind.time_gap:
            return NUM_GAP_BUCKETS
        if self.kind == FeatureKind.hour:
            return NUM_HOURS
        return len(self.vocab) + 1

    @property
    def names(self) -> tuple[str, ...]:
        return (PAD, *self.vocab)


DEFAULT_FEATURES: dict[str, EventFeature] = {
    "action": EventFeature(vocab=list(ACTION_NAMES), default="play"),
    "gap": EventFeature(kind=FeatureKind.time_gap),
    "hour": EventFeature(kind=FeatureKind.hour, context=True),
    "device": EventFeature(vocab=list(DEVICE_NAMES), context=True),
}


def default_features() -> dict[str, EventFeature]:
    return {name: EventFeature(**asdict(f)) for name, f in DEFAULT_FEATURES.items()}


class EventSchema:
    """The event features of one dataset, in declaration order (see the module docstring)."""

    def __init__(self, features: Mapping[str, EventFeature | Mapping[str, Any]]):
        self.features = {name: _feature(name, f) for name, f in features.items()}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> EventSchema:
        """The schema a build recorded (builds older than the schema had the defaults)."""
        recorded = manifest.get("features")
        if recorded is None:
            return cls(DEFAULT_FEATURES)
        return cls({f["name"]: {k: f[k] for k in ("kind", "vocab", "default", "context")}
                    for f in recorded})

    def to_manifest(self) -> list[dict[str, Any]]:
        return [{"name": name, "kind": f.kind.value, "vocab": list(f.vocab), "default": f.default,
                 "context": f.context, "size": f.size(),
                 "served_from": (f"History({name}=...)" if f.kind == FeatureKind.categorical
                                 else "History(timestamps=...)")}
                for name, f in self.features.items()]

    @property
    def stored(self) -> tuple[str, ...]:
        """The features whose ids are stored in the shards (the event log's columns)."""
        return tuple(n for n, f in self.features.items() if f.kind == FeatureKind.categorical)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: f.size() for name, f in self.features.items()}

    def token_features(self, context: bool = True) -> tuple[str, ...]:
        """The features summed into each event's token (context ones only with ``context``)."""
        return tuple(n for n, f in self.features.items() if context or not f.context)

    def encode(self, name: str, values: Sequence[str | int] | np.ndarray | None, n: int
               ) -> np.ndarray:
        """One categorical feature's names or ids → int64 ids; ``None``: ``n`` defaults."""
        feature = self.features[name]
        if values is None:
            return np.full(n, feature.names.index(feature.default), np.int64)
        if len(values) != n:
            raise ValueError(f"feature {name!r} has {len(values)} values for {n} events")
        return encode_vocab(np.asarray(values), feature.names, name)

    def event_ids(self, stored: Mapping[str, np.ndarray], timestamps: np.ndarray,
                  keep: slice = slice(None)) -> dict[str, np.ndarray]:
        """Every feature's ids for one member's events, oldest first: the stored ones as they
        are, the derived ones from ``timestamps`` (of the whole history, then cut to ``keep``:
        the oldest kept event's gap comes from the one before it)."""
        ts = np.asarray(timestamps, dtype=np.int64)
        out = {}
        for name, f in self.features.items():
            if f.kind == FeatureKind.time_gap:
                out[name] = time_gap_bucket(sequence_gaps(ts))[keep]
            elif f.kind == FeatureKind.hour:
                out[name] = hour_of_day(ts)[keep]
            else:
                out[name] = np.asarray(stored[name], dtype=np.int64)[keep]
        return out


def _feature(name: str, f: EventFeature | Mapping[str, Any]) -> EventFeature:
    """A checked feature declaration; errors name the feature and the fix."""
    where = f"features.{name}"
    if not isinstance(f, EventFeature):
        known = [k.name for k in fields(EventFeature)]
        unknown = sorted(set(f) - set(known))
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}; an event feature has "
                             f"{known}")
        kind = f.get("kind", FeatureKind.categorical)
        kinds = [k.value for k in FeatureKind]
        if getattr(kind, "value", kind) not in kinds:
            raise ValueError(f"{where}.kind={kind!r}: choose from {kinds}")
        f = EventFeature(**{**f, "kind": FeatureKind(kind), "vocab": list(f.get("vocab", []))})
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in RESERVED_NAMES:
        raise ValueError(f"{where}: feature names are lower_snake_case and not one of "
                         f"{sorted(RESERVED_NAMES)}")
    kind = FeatureKind(f.kind)
    if kind == FeatureKind.categorical:
        if not f.vocab or PAD in f.vocab or len(set(f.vocab)) != len(f.vocab):
            raise ValueError(f"{where}: a categorical feature needs vocab=[distinct names] "
                             f"(id 0 is {PAD} and is added for you)")
        if f.default not in (PAD, *f.vocab):
            raise ValueError(f"{where}.default={f.default!r} is not in its vocab {f.vocab} "
                             f"(or {PAD})")
    elif f.vocab:
        raise ValueError(f"{where}: a {kind.value} feature is derived from timestamps and "
                         f"takes no vocab")
    return EventFeature(kind=kind, vocab=[str(v) for v in f.vocab], default=str(f.default),
                        context=bool(f.context))


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
