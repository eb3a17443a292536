"""Shard writer: format-independent output, checksums, no pickle, actionable errors."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from foundation.compose import ConfigError, compose
from foundation.data.commands import run_build
from foundation.data.schema import ACTIONS, hour_of_day, time_gap_bucket
from foundation.data.sources import SourceConfig
from foundation.data.synthetic import SynthConfig, generate
from foundation.data.writer import BuildConfig, build_shards, choose_cold_items, load_manifest

RENAMED = {"member_id": "user", "item_id": "movie", "timestamp": "ts"}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Path]:
    """The same small event table as parquet, csv and jsonl (renamed columns), + impressions."""
    root = tmp_path_factory.mktemp("raw")
    w = generate(SynthConfig(output="unused", members=150, items=120, seed=1))
    events = pa.table({RENAMED.get(k, k): v for k, v in w["events"].items()})
    pq.write_table(events, root / "events.parquet")
    pacsv.write_csv(events, root / "events.csv")
    with open(root / "events.jsonl", "w") as f:
        for row in events.to_pylist():
            f.write(json.dumps(row) + "\n")
    pq.write_table(pa.table(w["impressions"]), root / "impressions.parquet")
    return {"parquet": root / "events.parquet", "csv": root / "events.csv",
            "jsonl": root / "events.jsonl", "impressions": root / "impressions.parquet"}


def _build(raw: dict[str, Path], fmt: str, out: Path, **kw) -> dict:
    source = SourceConfig(format=fmt, path=str(raw[fmt]), columns=RENAMED,
                          impressions_path=str(raw["impressions"]))
    return build_shards(BuildConfig(source=source, output=str(out), shards_per_split=4, **kw))


def test_parquet_csv_jsonl_give_identical_shards(raw, tmp_path):
    manifests = {fmt: _build(raw, fmt, tmp_path / fmt) for fmt in ("parquet", "csv", "jsonl")}
    for m in manifests.values():
        m.pop("source")
    assert manifests["parquet"] == manifests["csv"] == manifests["jsonl"]
    m = manifests["parquet"]
    for split in m["splits"].values():
        for shard in split["shards"]:
            for fmt in manifests:  # the recorded checksum is the file's
                data = (tmp_path / fmt / shard["path"]).read_bytes()
                assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert m["vocab"] == {"item": 121, "action": len(ACTIONS), "device": 5, "gap": 16, "hour": 25}
    assert m["totals"]["members"] == 150 == sum(s["samples"] for s in m["splits"].values())
    assert [s["samples"] for s in m["splits"]["train"]["shards"]] == [30, 30, 30, 30]  # balanced


def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shards_hold_no_pickle_and_round_trip_the_events(raw, tmp_path):
    m = _build(raw, "parquet", tmp_path)
    item_ids = np.load(tmp_path / "item_ids.npy", allow_pickle=False)
    events = pq.read_table(raw["parquet"]).to_pydict()
    seen = set()
    for split in m["splits"].values():
        for shard in split["shards"]:
            for key, entries in _tar_samples(tmp_path / shard["path"]).items():
                assert set(entries) <= {"seq.npz", "imp.npz", "meta.json"}
                seq = np.load(io.BytesIO(entries["seq.npz"]), allow_pickle=False)
                imp = np.load(io.BytesIO(entries["imp.npz"]), allow_pickle=False)
                meta = json.loads(entries["meta.json"])
                assert key == f"m{meta['member_id']:09d}" and meta["sample_id"] not in seen
                seen.add(meta["sample_id"])
                rows = [i for i, u in enumerate(events["user"]) if u == meta["member_id"]]
                assert item_ids[seq["item"]].tolist() == [events["movie"][i] for i in rows]
                assert (np.diff(seq["timestamp"]) >= 0).all() and seq["item"].min() >= 1
                assert imp["timestamp"].min() > seq["timestamp"].max()
    assert seen == set(range(150))
    counts = np.load(tmp_path / "item_counts.npy", allow_pickle=False)
    assert counts.shape == (121,) and counts[0] == 0
    assert counts.sum() == m["splits"]["train"]["events"]
    counts_all = np.load(tmp_path / "item_counts_all.npy", allow_pickle=False)
    assert counts_all.sum() == len(events["user"]) == m["totals"]["events"]
    assert (counts_all >= counts).all() and m["split"] == "member"


def test_max_history_keeps_the_last_events(raw, tmp_path):
    full = _build(raw, "parquet", tmp_path / "full")
    short = _build(raw, "parquet", tmp_path / "short", max_history=6)
    _, sizes = np.unique(pq.read_table(raw["parquet"]).column("user").to_numpy(), return_counts=True)
    assert full["totals"]["events"] == sizes.sum()
    assert short["totals"]["events"] == np.minimum(sizes, 6).sum()
    counts = np.load(tmp_path / "short" / "item_counts.npy", allow_pickle=False)
    assert counts.sum() == short["splits"]["train"]["events"]


def test_missing_file_column_and_format_errors_name_the_fix(raw, tmp_path):
    def build(**source):
        return build_shards(BuildConfig(source=SourceConfig(**source), output=str(tmp_path)))

    with pytest.raises(FileNotFoundError, match=r"nowhere\.csv.*source\.path="):
        build(format="csv", path=str(tmp_path / "nowhere.csv"))
    with pytest.raises(KeyError, match=r"'member_id'.*available columns.*'user'.*source\.columns\.member_id"):
        build(format="parquet", path=str(raw["parquet"]))
    with pytest.raises(ValueError, match=r"unknown source format 'xls'.*\['csv', 'jsonl', 'movielens', 'parquet', 'sasrec_txt', 'unisrec'\]"):
        build(format="xls", path=str(raw["parquet"]))
    assert not (tmp_path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match=r"no manifest\.json in .*foundation data synth output="):
        load_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(tmp_path / "absent")


def test_build_command(raw, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("foundation"), "propagate", True)  # to caplog
    caplog.set_level(logging.INFO, logger="foundation")
    with pytest.raises(ConfigError, match="output"):
        compose("data_build", [f"source.path={raw['csv']}"])
    cfg = compose("data_build", ["source.format=csv", f"source.path={raw['csv']}", f"output={tmp_path}",
                                 "source.columns.member_id=user", "source.columns.item_id=movie",
                                 "source.columns.timestamp=ts", "progress=false"])
    assert run_build(cfg) == 0
    assert "built 150 members" in caplog.text
    assert load_manifest(tmp_path)["totals"]["impressions"] == 0


def test_time_features():
    gaps = np.array([-1, 0, 59, 60, 3600, 10**9])
    assert time_gap_bucket(gaps).tolist() == [1, 2, 2, 3, 7, 15]
    assert hour_of_day(np.array([0, 3599, 3600, 86399])).tolist() == [1, 1, 2, 24]


def test_validation_cold_items_are_drawn_after_the_cold_ones():
    cold, none = choose_cold_items(101, 0.2, seed=3)
    same, val_cold = choose_cold_items(101, 0.2, seed=3, val_fraction=0.1)
    assert (cold == same).all() and not none.any()  # adding cold_val_items keeps the cold set
    assert cold.sum() == 20 and val_cold.sum() == 10 and not (cold & val_cold).any()
    assert not cold[0] and not val_cold[0]  # never the padding id
    with pytest.raises(ValueError, match="cold_items \\+ cold_val_items"):
        choose_cold_items(101, 0.6, seed=0, val_fraction=0.5)
    with pytest.raises(ValueError, match="cold_val_items=1.5"):
        choose_cold_items(101, 0.2, seed=0, val_fraction=1.5)
