"""Source readers: event tables in many formats → one canonical set of numpy columns.

A format is one function ``(path) -> pyarrow.Table`` in ``READERS``; column mapping, defaults and
vocabulary encoding are shared, so a new format is one function. Readers of fixed layouts
(``sasrec_txt``, ``movielens``) return the canonical column names themselves.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from omegaconf import MISSING

from foundation.choices import Choice
from foundation.data.schema import (
    EVENT_COLUMNS,
    IMPRESSION_COLUMNS,
    SEARCH_COLUMNS,
    SEND_COLUMNS,
    EventSchema,
)


class SourceFormat(Choice):
    """The readers of ``READERS``."""
    parquet = "parquet"
    csv = "csv"
    jsonl = "jsonl"
    sasrec_txt = "sasrec_txt"
    movielens = "movielens"
    unisrec = "unisrec"


@dataclass
class SourceConfig:
    format: SourceFormat = SourceFormat.parquet
    path: str = MISSING
    # Canonical field (member_id, item_id, timestamp, or an event feature) → its column in
    # the file when the names differ, e.g. source.columns.member_id=user (read_events checks)
    columns: dict[str, str] = field(default_factory=dict)
    impressions_path: str | None = None  # member_id, item_id, timestamp, label (canonical names)
    searches_path: str | None = None  # member_id, item_id (engaged), timestamp, query (text)
    sends_path: str | None = None  # member_id, item_id, timestamp, sent, outcome [, uplift]
    catalogue_path: str | None = None  # item_id, genres, series_id, episode, release_time
    item_attributes_path: str | None = None  # JSON {"raw item id": [attribute id, ...]}
    # Item content, keyed by the same raw item ids as the events (data/items.py):
    item_text_path: str | None = None  # TSV item_id<TAB>text (a RecBole typed header is fine)
    item_vectors_path: str | None = None  # .safetensors {vectors, item_ids} or .npy matrix
    item_vector_ids_path: str | None = None  # with a .npy matrix: its row ids (.npy or text)
    item_media_dir: str | None = None  # ITEM_ID.jpg|png (images), ITEM_ID.wav|flac (audio)


def parquet_files(path: Path) -> list[Path]:
    """A parquet file, or a directory's ``*.parquet`` files in name order (its rows in order)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"source file {path} does not exist: pass the event table as "
                                "source.path=/path/to/events.parquet (or a directory of parts)")
    files = sorted(path.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.parquet files: pass the event table's file "
                                "or a directory of its parquet parts as source.path")
    return files


def read_parquet(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(file) for file in parquet_files(path)])


def read_csv(path: Path) -> pa.Table:
    return pacsv.read_csv(path)


def read_jsonl(path: Path) -> pa.Table:
    return pajson.read_json(path)


def read_sasrec_txt(path: Path) -> pa.Table:
    """``user item item ...`` per line, items in time order (the SASRec / S3-Rec release format).

    The file has no times: an event's timestamp is its 0-based position in its line, which keeps
    the order (and makes the derived gap/hour features constant, i.e. uninformative).
    """
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                ids = np.array(line.split(), dtype=np.int64)
            except ValueError as err:
                raise ValueError(f"{path}:{number}: expected integer ids `user item item ...` "
                                 f"({err})") from None
            if ids.size:
                rows.append(ids)
    lengths = np.array([len(r) - 1 for r in rows], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    return pa.table({
        "member_id": np.repeat(np.array([r[0] for r in rows], dtype=np.int64), lengths),
        "item_id": np.concatenate([r[1:] for r in rows] or [np.zeros(0, np.int64)]),
        "timestamp": np.arange(lengths.sum()) - np.repeat(starts, lengths),
    })


MOVIELENS_CSV_COLUMNS = {"userId": "member_id", "movieId": "item_id", "rating": "rating",
                         "timestamp": "timestamp"}


def read_movielens(path: Path) -> pa.Table:
    """MovieLens ratings: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``, ML-1M/10M)
    or ``ratings.csv`` (``userId,movieId,rating,timestamp`` header, ML-20M/25M/latest).

    The rating is kept as a column but not mapped to an action: every rating is a ``play``
    (implicit feedback, as in the sequential-recommendation literature).
    """
    if path.suffix.lower() == ".dat":
        data = path.read_bytes().replace(b"::", b"\t")
        return pacsv.read_csv(io.BytesIO(data),
                              read_options=pacsv.ReadOptions(column_names=["member_id", "item_id",
                                                                           "rating", "timestamp"]),
                              parse_options=pacsv.ParseOptions(delimiter="\t"))
    if path.suffix.lower() == ".csv":
        table = pacsv.read_csv(path)
        missing = sorted(set(MOVIELENS_CSV_COLUMNS) - set(table.column_names))
        if missing:
            raise KeyError(f"{path} lacks MovieLens column(s) {missing}; found {table.column_names}")
        return table.select(list(MOVIELENS_CSV_COLUMNS)).rename_columns(
            list(MOVIELENS_CSV_COLUMNS.values()))
    raise ValueError(f"source.format=movielens reads ratings.dat or ratings.csv, got {path.name}")


UNISREC_SPLITS = ("train", "valid", "test")


def unisrec_file(directory: Path, suffix: str) -> Path:
    """The one ``*.<suffix>`` file of a UniSRec/RecBole dataset directory."""
    found = sorted(directory.glob(f"*.{suffix}"))
    if len(found) != 1:
        raise FileNotFoundError(f"{directory} must hold exactly one *.{suffix} file (a "
                                f"UniSRec/RecBole dataset directory), found {len(found)}")
    return found[0]


def _inter_rows(path: Path) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """A RecBole ``.inter`` file: (user per row, history per row, target per row)."""
    users, histories, targets = [], [], []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if [h.split(":")[0] for h in header] != ["user_id", "item_id_list", "item_id"]:
            raise ValueError(f"{path}: expected the header user_id:token<TAB>item_id_list:"
                             f"token_seq<TAB>item_id:token, found {header}")
        for number, line in enumerate(f, 2):
            try:
                user, history, target = line.rstrip("\n").split("\t")
                histories.append([int(i) for i in history.split()])
                users.append(int(user))
                targets.append(int(target))
            except ValueError:
                raise ValueError(f"{path}:{number}: expected user<TAB>items<TAB>item as "
                                 f"integers, got {line.strip()[:80]!r}") from None
    return np.array(users, np.int64), histories, np.array(targets, np.int64)


def read_unisrec(path: Path) -> pa.Table:
    """A UniSRec/RecBole dataset directory (``X.train.inter``, ``X.valid.inter``,
    ``X.test.inter``; histories truncated to their last 50 items) → each user's whole
    sequence, its position as the timestamp.

    A user's train rows are every prefix of its training sequence, newest first: the oldest
    row's history plus every row's target, oldest first, is that sequence. The valid and test
    targets follow. The files' histories are checked against the reconstruction, so
    ``split=leave_one_out`` gives back exactly the files' own split.
    """
    train_user, train_hist, train_target = _inter_rows(unisrec_file(path, "train.inter"))
    sequences: dict[int, list[int]] = {}
    bounds = np.flatnonzero(np.diff(train_user, prepend=-1, append=-1))
    for start, end in zip(bounds[:-1], bounds[1:]):  # one user's rows, newest first
        user = int(train_user[start])
        if user in sequences:
            raise ValueError(f"{path}: the train rows of user {user} are not contiguous")
        sequences[user] = train_hist[end - 1] + train_target[start:end][::-1].tolist()
    for split in ("valid", "test"):
        file = unisrec_file(path, f"{split}.inter")
        for user, history, target in zip(*_inter_rows(file)):
            seq = sequences.setdefault(int(user), [])
            if history != seq[len(seq) - len(history):]:
                raise ValueError(f"{file}: user {user}'s history is not its training sequence "
                                 f"(files of different datasets or processings?)")
            seq.append(int(target))
    users = np.array(sorted(sequences), dtype=np.int64)
    lengths = np.array([len(sequences[u]) for u in users], dtype=np.int64)
    return pa.table({
        "member_id": np.repeat(users, lengths),
        "item_id": np.array([i for u in users for i in sequences[int(u)]], dtype=np.int64),
        "timestamp": np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths),
    })


READERS: dict[str, Callable[[Path], pa.Table]] = {
    "parquet": read_parquet,
    "csv": read_csv,
    "jsonl": read_jsonl,
    "sasrec_txt": read_sasrec_txt,
    "movielens": read_movielens,
    "unisrec": read_unisrec,
}
DIRECTORY_FORMATS = ("unisrec",)  # formats whose source.path is a directory
PARTED_FORMATS = ("parquet",)  # formats whose source.path may also be a directory of parts
SUFFIX_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl",
                  ".json": "jsonl"}


def read_table(path: str | Path, fmt: str | None = None) -> pa.Table:
    """Read ``path`` with reader ``fmt`` (or the one its suffix names), with actionable errors."""
    path = Path(path)
    fmt = fmt or SUFFIX_FORMATS.get(path.suffix.lower(), "")
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r} for {path}: supported formats are "
                         f"{sorted(READERS)} (pass source.format=...)")
    if fmt in DIRECTORY_FORMATS and not path.is_dir():
        raise FileNotFoundError(f"source.format={fmt} reads a dataset directory; {path} is not "
                                f"one (pass source.path=/path/to/dataset_dir)")
    if fmt not in DIRECTORY_FORMATS and not (path.is_file() or (fmt in PARTED_FORMATS and path.is_dir())):
        raise FileNotFoundError(f"source file {path} does not exist: pass the event table as "
                                f"source.path=/path/to/events.{fmt}")
    return READERS[fmt](path)


def _column(table: pa.Table, name: str, mapped: str, path: Path) -> np.ndarray:
    if mapped not in table.column_names:
        raise KeyError(f"column {mapped!r} (for {name}) not found in {path}; available columns: "
                       f"{table.column_names} (map it with source.columns.{name}=<column>)")
    col = table.column(mapped)
    if pa.types.is_timestamp(col.type):  # datetimes → int seconds since the epoch
        col = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    return col.to_numpy(zero_copy_only=False)


def _int_column(table: pa.Table, name: str, mapped: str, path: Path) -> np.ndarray:
    values = _column(table, name, mapped, path)
    if values.dtype.kind not in "iub":
        raise TypeError(f"column {mapped!r} (for {name}) in {path} must hold integers, "
                        f"found {values.dtype}")
    return values.astype(np.int64)


def read_events(source: SourceConfig, schema: EventSchema) -> dict[str, np.ndarray]:
    """Events as int64 columns member_id, item_id, timestamp and one per stored feature of
    ``schema`` (its ids; a feature whose column the file lacks gets its default)."""
    path = Path(source.path)
    return events_from_table(read_table(path, source.format), source, schema, path)


def events_from_table(table: pa.Table, source: SourceConfig, schema: EventSchema,
                      path: Path) -> dict[str, np.ndarray]:
    """``read_events`` of rows already read (``path`` names them in errors)."""
    fields = (*EVENT_COLUMNS, *schema.stored)
    columns = {k: v for k, v in dict(source.columns).items() if v != k}  # the renamed ones
    unknown = set(columns) - set(fields)
    if unknown:
        raise KeyError(f"source.columns names unknown field(s) {sorted(unknown)}; fields are "
                       f"{list(fields)} (event features come from features.<name>)")
    names = {name: columns.get(name) or name for name in fields}
    out = {name: _int_column(table, name, names[name], path) for name in EVENT_COLUMNS}
    for name in schema.stored:
        present = names[name] in table.column_names or name in columns  # renamed → required
        values = _column(table, name, names[name], path) if present else None
        out[name] = schema.encode(name, values, len(out["member_id"]))
    return out


def read_impressions(path: str | Path) -> dict[str, np.ndarray]:
    """Impressions as int64 columns member_id, item_id, timestamp, label (0/1)."""
    table = read_table(path)
    return {name: _int_column(table, name, name, Path(path)) for name in IMPRESSION_COLUMNS}


def read_searches(path: str | Path) -> dict[str, np.ndarray]:
    """Search sessions: int64 member_id, item_id (the engaged title), timestamp, and the
    query text."""
    table, path = read_table(path), Path(path)
    columns = {name: _int_column(table, name, name, path) for name in SEARCH_COLUMNS[:3]}
    columns["query"] = np.asarray(_column(table, "query", "query", path), dtype=str)
    return columns


def read_sends(path: str | Path) -> dict[str, np.ndarray]:
    """Randomised messages: int64 member_id, item_id, timestamp, sent and outcome (0/1), and
    float ``uplift`` where a simulator wrote its true uplift."""
    table, path = read_table(path), Path(path)
    columns = {name: _int_column(table, name, name, path) for name in SEND_COLUMNS}
    for flag in ("sent", "outcome"):
        if not np.isin(columns[flag], (0, 1)).all():
            raise ValueError(f"{path}: column {flag!r} must hold 0 or 1")
    if "uplift" in table.column_names:
        columns["uplift"] = table.column("uplift").to_numpy().astype(np.float64)
    return columns


def read_item_attributes(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A JSON map raw item id → list of attribute ids, as (item ids, row lengths, flat values)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"item attributes file {path} does not exist "
                                f"(source.item_attributes_path)")
    data = json.loads(path.read_text())
    rows = list(data.items()) if isinstance(data, dict) else []
    bad = [k for k, v in rows if not (isinstance(v, list) and all(type(a) is int for a in v))]
    if not isinstance(data, dict) or bad:
        raise ValueError(f"{path} must map item id → list of integer attribute ids, "
                         f'e.g. {{"12": [3, 7]}}; bad entry: {bad[:1] or type(data).__name__}')
    try:
        items = np.array([int(k) for k, _ in rows], dtype=np.int64)
    except ValueError as err:
        raise ValueError(f"{path}: item ids must be integers ({err})") from None
    lengths = np.array([len(v) for _, v in rows], dtype=np.int64)
    values = np.array([a for _, v in rows for a in v], dtype=np.int64)
    return items, lengths, values
