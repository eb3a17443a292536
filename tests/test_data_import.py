"""Importers (sasrec_txt, movielens), item side information and the split kinds, exact on
small hand-made inputs."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest

from foundation.compose import ConfigError, compose
from foundation.data.commands import run_build
from foundation.data.schema import ACTIONS
from foundation.data.sources import SourceConfig, read_table
from foundation.data.writer import BuildConfig, build_shards

SASREC = "7 30 10 20 40\n5 20 10\n\n9 30 10 20\n"  # member 5 has 2 events: too short for LOO


def _samples(root: Path, split: str) -> dict[int, dict]:
    """member id → raw items, timestamps, actions and sample id of its sample in ``split``."""
    manifest = json.loads((root / "manifest.json").read_text())
    item_ids = np.load(root / "item_ids.npy")
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(root / shard["path"]) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in files.items():
            if name.endswith(".meta.json"):
                meta = json.loads(data)
                seq = np.load(io.BytesIO(files[name.replace("meta.json", "seq.npz")]))
                out[meta["member_id"]] = {"item": item_ids[seq["item"]].tolist(),
                                          "timestamp": seq["timestamp"].tolist(),
                                          "action": seq["action"].tolist(),
                                          "sample_id": meta["sample_id"]}
    return out


def _items(root: Path, split: str) -> dict[int, list[int]]:
    return {m: s["item"] for m, s in _samples(root, split).items()}


def _build(tmp_path: Path, text: str, name: str, fmt: str, out: str = "out", **kw) -> dict:
    (tmp_path / name).write_text(text)
    source = SourceConfig(format=fmt, path=str(tmp_path / name),
                          item_attributes_path=kw.pop("item_attributes_path", None))
    return build_shards(BuildConfig(source=source, output=str(tmp_path / out), **kw))


def test_sasrec_txt_keeps_the_line_order_as_time(tmp_path):
    (tmp_path / "seq.txt").write_text(SASREC)
    table = read_table(tmp_path / "seq.txt", "sasrec_txt").to_pydict()
    assert table == {"member_id": [7, 7, 7, 7, 5, 5, 9, 9, 9],
                     "item_id": [30, 10, 20, 40, 20, 10, 30, 10, 20],
                     "timestamp": [0, 1, 2, 3, 0, 1, 0, 1, 2]}
    (tmp_path / "bad.txt").write_text("1 2 3\n2 x 4\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected integer ids"):
        read_table(tmp_path / "bad.txt", "sasrec_txt")


def test_leave_one_out_gives_every_member_train_val_and_test(tmp_path):
    m = _build(tmp_path, SASREC, "seq.txt", "sasrec_txt", split="leave_one_out")
    root = tmp_path / "out"
    assert _items(root, "train") == {5: [20, 10], 7: [30, 10], 9: [30]}
    assert _items(root, "val") == {7: [30, 10, 20], 9: [30, 10]}
    assert _items(root, "test") == {7: [30, 10, 20, 40], 9: [30, 10, 20]}
    # a member keeps its sample id (its index) in every split
    assert {s["sample_id"] for s in _samples(root, "test").values()} == {1, 2}
    assert _samples(root, "val")[9]["sample_id"] == _samples(root, "train")[9]["sample_id"] == 2
    assert m["split"] == "leave_one_out" and m["split_info"] == {"short_members": 1}
    assert {k: (s["samples"], s["events"]) for k, s in m["splits"].items()} == {
        "train": (3, 5), "val": (2, 5), "test": (2, 7)}
    assert m["totals"] == {"members": 3, "events": 9, "items": 4, "impressions": 0, "searches": 0,
                           "sends": 0}
    # item ids 1..4 are the raw 10, 20, 30, 40; train counts = the train samples
    assert np.load(root / "item_counts.npy").tolist() == [0, 2, 1, 2, 0]
    assert np.load(root / "item_counts_all.npy").tolist() == [0, 3, 3, 2, 1]
    assert m["files"]["item_counts_all"] == "item_counts_all.npy"
    assert m["files"]["item_attributes"] is None and "attribute" not in m["vocab"]


def test_leave_one_out_with_max_history_counts_what_train_samples_hold(tmp_path):
    m = _build(tmp_path, SASREC, "seq.txt", "sasrec_txt", split="leave_one_out", max_history=1)
    root = tmp_path / "out"
    assert _items(root, "train") == {5: [10], 7: [10], 9: [30]}
    assert _items(root, "val") == {7: [20], 9: [10]}
    assert _items(root, "test") == {7: [40], 9: [20]}
    assert np.load(root / "item_counts.npy").tolist() == [0, 2, 0, 1, 0]
    assert np.load(root / "item_counts_all.npy").tolist() == [0, 3, 3, 2, 1]
    assert m["totals"]["events"] == 7  # distinct events stored


def test_time_split_cuts_the_timeline(tmp_path):
    rows = [(1, 10, 1), (1, 20, 2), (1, 30, 5), (1, 40, 8), (2, 10, 3), (2, 30, 6),
            (3, 20, 4), (3, 40, 7), (3, 10, 9), (4, 30, 9)]
    text = "member_id,item_id,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)
    # 10 events: the last 4 (t >= 7) are val + test, the last 2 (t >= 9) test
    m = _build(tmp_path, text, "events.csv", "csv", split="time", val_fraction=0.2,
               test_fraction=0.2)
    root = tmp_path / "out"
    assert m["split"] == "time" and m["split_info"]["val_start"] == 7
    assert m["split_info"]["test_start"] == 9
    assert _items(root, "train") == {1: [10, 20, 30], 2: [10, 30], 3: [20]}  # t < 7
    assert _items(root, "val") == {1: [10, 20, 30, 40], 3: [20, 40]}  # last event in [7, 9)
    assert _items(root, "test") == {3: [20, 40, 10]}  # member 4's lone event has no history
    assert np.load(root / "item_counts.npy").tolist() == [0, 2, 2, 2, 0]
    assert np.load(root / "item_counts_all.npy").tolist() == [0, 3, 2, 3, 2]
    assert m["totals"]["members"] == 4 and m["totals"]["events"] == 9
    # The same cuts given as times (unix seconds, or ISO dates in UTC) split identically.
    given = _build(tmp_path, text, "events.csv", "csv", out="given", split="time",
                   val_start="7", test_start="1970-01-01T00:00:09")
    assert given["split_info"]["cuts"] == "given" and given["splits"] == m["splits"]
    assert (given["split_info"]["val_start"], given["split_info"]["test_start"]) == (7, 9)
    for bad, message in ((dict(val_start="7"), "give both val_start and test_start"),
                         (dict(val_start="9", test_start="7"), "val_start=9 is after"),
                         (dict(val_start="last tuesday", test_start="9"),
                          "neither unix seconds nor an ISO date")):
        with pytest.raises(ValueError, match=message):
            _build(tmp_path, text, "events.csv", "csv", out="bad", split="time", **bad)


ML_ROWS = [(1, 10, 5, 978300760), (1, 20, 3, 978300700), (2, 10, 4, 978300800)]


def test_movielens_dat_and_csv_read_the_same_plays(tmp_path):
    dat = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ML_ROWS)
    csv = "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r}.5,{t}\n" for u, i, r, t in ML_ROWS)
    kw = {"val_fraction": 0.0, "test_fraction": 0.0}
    m_dat = _build(tmp_path, dat, "ratings.dat", "movielens", out="dat", **kw)
    m_csv = _build(tmp_path, csv, "ratings.csv", "movielens", out="csv", **kw)
    assert {**m_dat, "source": None} == {**m_csv, "source": None}
    train = _samples(tmp_path / "dat", "train")
    assert train[1]["item"] == [20, 10] and train[1]["timestamp"] == [978300700, 978300760]
    assert train[2]["item"] == [10] and set(train[1]["action"]) == {ACTIONS.index("play")}
    with pytest.raises(ValueError, match=r"ratings\.dat or ratings\.csv, got ratings\.tsv"):
        _build(tmp_path, dat, "ratings.tsv", "movielens")
    with pytest.raises(KeyError, match=r"lacks MovieLens column\(s\) \['movieId'\]"):
        _build(tmp_path, "userId,itemId,rating,timestamp\n1,2,3,4\n", "ratings.csv", "movielens")


def test_item_attributes_are_jagged_in_the_remapped_item_space(tmp_path):
    # item 20 has no attributes (empty row); item 99 never occurs (ignored, with attribute 5)
    (tmp_path / "attrs.json").write_text(json.dumps({"10": [7, 3], "30": [3], "99": [5], "40": []}))
    m = _build(tmp_path, SASREC, "seq.txt", "sasrec_txt",
               item_attributes_path=str(tmp_path / "attrs.json"))
    assert m["vocab"]["attribute"] == 3 and m["files"]["item_attributes"] == "item_attributes.npz"
    with np.load(tmp_path / "out" / "item_attributes.npz", allow_pickle=False) as z:
        assert z["offsets"].tolist() == [0, 0, 2, 2, 3, 3]  # rows: pad, 10, 20, 30, 40
        assert z["values"].tolist() == [2, 1, 1]  # 10: [7, 3] → [2, 1]; 30: [3] → [1]
        assert z["attribute_ids"].tolist() == [-1, 3, 7]
    for bad in ({"10": "3"}, {"10": [1.5]}, {"x": [1]}, [1, 2]):
        (tmp_path / "attrs.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="attrs.json"):
            _build(tmp_path, SASREC, "seq.txt", "sasrec_txt",
                   item_attributes_path=str(tmp_path / "attrs.json"))


def test_build_command_split_and_attributes_keys(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("foundation"), "propagate", True)  # to caplog
    caplog.set_level(logging.INFO, logger="foundation")
    (tmp_path / "seq.txt").write_text(SASREC)
    base = ["source.format=sasrec_txt", f"source.path={tmp_path / 'seq.txt'}",
            f"output={tmp_path / 'out'}", "progress=false"]
    with pytest.raises(ConfigError, match="item_atributes_path"):
        compose("data_build", [*base, "source.item_atributes_path=a.json"])
    with pytest.raises(ConfigError, match=r"'leave_1_out', expected one of .*leave_one_out"):
        compose("data_build", [*base, "split=leave_1_out"])  # before anything is read
    assert run_build(compose("data_build", base)) == 0  # split=auto: the files' protocol
    assert "built 3 members, 9 events, 4 items" in caplog.text
    assert json.loads((tmp_path / "out/manifest.json").read_text())["split"] == "leave_one_out"


def test_a_validation_sample_whose_target_is_cold_is_left_out(tmp_path):
    """Cut short instead, its target would be an event of its own training sample."""
    full = {7: [30, 10, 20], 9: [30, 10]}  # the val samples without cold items
    dropped = set()
    for seed in (0, 1, 2, 12):  # these seeds make each of the four items cold in turn
        _build(tmp_path, SASREC, "seq.txt", "sasrec_txt", out=f"out{seed}",
               split="leave_one_out", cold_items=0.25, cold_seed=seed)
        root = tmp_path / f"out{seed}"
        cold = set(np.load(root / "item_ids.npy")[np.load(root / "cold_items.npy")].tolist())
        expected = {member: [i for i in items if i not in cold]
                    for member, items in full.items() if items[-1] not in cold}
        assert _items(root, "val") == expected
        dropped |= full.keys() - expected.keys()
        train = _items(root, "train")  # a sample left with no event is left out
        assert all(train.values()) and (9 in train) == (30 not in cold)
    assert dropped == {7, 9}  # both members' val targets were cold under some seed


def test_sends_are_stored_per_member_and_bad_arms_are_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from foundation.data.sources import read_sends

    events = {"member_id": [1, 1, 2, 2], "item_id": [10, 20, 10, 30],
              "timestamp": [1, 2, 1, 2]}
    pq.write_table(pa.table(events), tmp_path / "events.parquet")
    sends = {"member_id": [2, 1, 1], "item_id": [40, 30, 10], "timestamp": [5, 9, 4],
             "sent": [1, 0, 1], "outcome": [0, 0, 1]}
    pq.write_table(pa.table(sends), tmp_path / "sends.parquet")
    source = SourceConfig(path=str(tmp_path / "events.parquet"),
                          sends_path=str(tmp_path / "sends.parquet"))
    manifest = build_shards(BuildConfig(source=source, output=str(tmp_path / "out")))
    assert manifest["totals"]["sends"] == 3 and manifest["totals"]["items"] == 4  # item 40 too
    stored = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            with tarfile.open(tmp_path / "out" / shard["path"]) as tar:
                stored |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    ids = np.load(tmp_path / "out" / "item_ids.npy")
    first = np.load(io.BytesIO(stored[next(n for n in stored if "000000001" in n
                                           and n.endswith("sends.npz"))]))
    assert ids[first["item"]].tolist() == [10, 30]  # member 1's, in time order
    assert first["sent"].tolist() == [1, 0] and first["outcome"].tolist() == [1, 0]
    pq.write_table(pa.table({**sends, "sent": [1, 2, 0]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="'sent' must hold 0 or 1"):
        read_sends(tmp_path / "bad.parquet")
