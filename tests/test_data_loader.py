"""Streaming loader: exactly-once across ranks × workers, seeded order, jagged batches, errors."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from foundation.data.batch import SequenceBatch
from foundation.data.loader import build_loader
from foundation.data.synthetic import SynthConfig, synthesize
from foundation.data.writer import load_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    synthesize(SynthConfig(output=str(out), members=400, items=150, shards_per_split=8))
    return out


def _split_ids(path: Path, split: str) -> set[int]:
    ids = set()
    for shard in load_manifest(path)["splits"][split]["shards"]:
        with tarfile.open(path / shard["path"]) as tar:
            ids |= {json.loads(tar.extractfile(m).read())["sample_id"]
                    for m in tar.getmembers() if m.name.endswith(".json")}
    return ids


def _ids(loader) -> list[int]:
    return [i for batch in loader for i in batch.sample_ids.tolist()]


def test_every_sample_exactly_once_across_ranks_and_workers(shards):
    seen: list[int] = []
    per_rank = []
    for rank in (0, 1):
        ids = _ids(build_loader(shards, "train", batch_size=16, max_len=20, seed=5, epoch=1,
                                rank=rank, world_size=2, num_workers=2))
        per_rank.append(set(ids))
        seen += ids
    assert len(seen) == len(set(seen)) and set(seen) == _split_ids(shards, "train")
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]


def test_order_is_seeded_by_seed_and_epoch(shards):
    def order(**kw):
        return _ids(build_loader(shards, "train", batch_size=32, max_len=20, shuffle_buffer=50, **kw))

    first = order(seed=0, epoch=0)
    assert first == order(seed=0, epoch=0)
    assert first != order(seed=0, epoch=1) and sorted(first) == sorted(order(seed=0, epoch=1))
    assert first != order(seed=1, epoch=0)
    plain = order(shuffle=False, seed=0, epoch=0)
    assert plain == order(shuffle=False, seed=9, epoch=3)  # no shuffle: manifest order
    assert plain == sorted(plain)  # the writer stores each split's members in sample-id order


def test_batches_are_jagged_truncated_and_round_trip_through_kjt(shards):
    batch = next(iter(build_loader(shards, "val", batch_size=8, max_len=12, shuffle=False)))
    assert isinstance(batch, SequenceBatch) and len(batch) == 8
    assert batch.lengths.min() >= 2 and batch.lengths.max() <= 12
    assert batch.offsets().tolist() == [0, *torch.cumsum(batch.lengths, 0).tolist()]
    n = int(batch.lengths.sum())
    for name in ("item", "timestamp", "action", "gap", "hour", "device"):  # the schema's
        assert batch.jagged(name).shape == (n,) and batch.jagged(name).dtype == torch.int64
    kjt = batch.kjt()
    assert kjt.keys() == ["item", "action", "gap", "hour", "device"]
    for key, jagged in kjt.to_dict().items():
        assert torch.equal(jagged.lengths(), batch.lengths)
        assert torch.equal(jagged.values(), batch.jagged(key))
    # Truncation keeps each member's most recent events, in time order.
    rows = torch.split(batch.timestamp, batch.lengths.tolist())
    assert all((torch.diff(r) >= 0).all() for r in rows)
    full = next(iter(build_loader(shards, "val", batch_size=8, max_len=10_000, shuffle=False)))
    for short, long in zip(torch.split(batch.item, batch.lengths.tolist()),
                           torch.split(full.item, full.lengths.tolist())):
        assert torch.equal(short, long[-len(short):])
    assert batch.to("cpu").item is not None and batch.events["gap"].min() >= 1
    assert batch.events["hour"].min() >= 1


def test_ranking_mode_carries_impressions(shards):
    batches = list(build_loader(shards, "test", batch_size=16, max_len=20, mode="ranking",
                                shuffle=False, num_workers=2))
    batch = batches[0]
    assert batch.candidates is not None and batch.labels.dtype == torch.float32
    assert batch.candidates.shape == batch.labels.shape == (int(batch.candidate_lengths.sum()),)
    shown = SynthConfig().impressions_per_member  # every member sees that many titles
    assert set(batch.labels.unique().tolist()) <= {0.0, 1.0}
    assert (batch.candidate_lengths == shown).all()
    assert sum(len(b) for b in batches) == len(_split_ids(shards, "test"))


def test_search_mode_carries_each_members_queries_and_engaged_titles(shards):
    batches = list(build_loader(shards, "test", batch_size=16, max_len=20, mode="search",
                                shuffle=False, num_workers=0))
    batch = batches[0]
    assert len(batch.queries) == batch.query_items.numel() == int(batch.query_lengths.sum())
    assert batch.query_lengths.min() == 3 and all(isinstance(q, str) and q for q in batch.queries)
    assert batch.query_items.min() >= 1
    assert sum(len(b) for b in batches) == len(_split_ids(shards, "test"))


def test_notification_mode_carries_each_members_randomised_sends(shards):
    batches = list(build_loader(shards, "test", batch_size=16, max_len=20, mode="notification",
                                shuffle=False, num_workers=0))
    batch = batches[0]
    sends = int(batch.candidate_lengths.sum())
    assert batch.candidate_lengths.min() == 40  # world.sends_per_member
    assert batch.candidates.shape == batch.labels.shape == batch.sent.shape == (sends,)
    assert batch.sent.dtype == torch.bool and 0.3 < batch.sent.float().mean() < 0.7
    assert batch.true_uplift.dtype == torch.float32 and batch.true_uplift.abs().max() < 1
    moved = batch.to("cpu")  # the new fields travel with the batch
    assert torch.equal(moved.sent, batch.sent) and torch.equal(moved.true_uplift, batch.true_uplift)
    assert sum(len(b) for b in batches) == len(_split_ids(shards, "test"))


def _corrupt_copy(shards: Path, tmp_path: Path) -> tuple[Path, Path]:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    bad = copy / load_manifest(copy)["splits"]["val"]["shards"][1]["path"]
    data = bad.read_bytes()
    bad.write_bytes(data[:700] + b"\x00garbage" * 40 + data[1100:])  # a damaged member
    return copy, bad


def test_on_error_raise_names_the_shard_and_skip_continues(shards, tmp_path):
    copy, bad = _corrupt_copy(shards, tmp_path)
    with pytest.raises(Exception, match=bad.name):
        _ids(build_loader(copy, "val", batch_size=4, max_len=20, shuffle=False))
    with pytest.warns(UserWarning, match="skipping"):
        ids = _ids(build_loader(copy, "val", batch_size=4, max_len=20, shuffle=False, on_error="skip"))
    assert 0 < len(ids) < len(_split_ids(shards, "val"))


def test_unknown_entries_such_as_pickle_are_rejected(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = copy / load_manifest(copy)["splits"]["val"]["shards"][0]["path"]
    with tarfile.open(shard, "a") as tar:  # a sample that smuggles a pickle next to its arrays
        for name, data in (("seq.npz", _npz_bytes()), ("meta.json", b'{"member_id": 1, "sample_id": 999}'),
                           ("state.pkl", b"\x80\x04K\x01.")):
            info = tarfile.TarInfo(f"mzzzz.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"unexpected entries \['state\.pkl'\].*never"):
        _ids(build_loader(copy, "val", batch_size=4, max_len=20, shuffle=False))


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    z = np.arange(3, dtype=np.int64)
    np.savez(buf, item=z + 1, action=z, timestamp=z, device=z)
    return buf.getvalue()


def test_bad_arguments_fail_clearly(shards, tmp_path):
    with pytest.raises(KeyError, match="no split 'dev'"):
        build_loader(shards, "dev", batch_size=4, max_len=8)
    with pytest.raises(ValueError, match="mode"):
        build_loader(shards, "val", batch_size=4, max_len=8, mode="pairs")
    with pytest.raises(ValueError, match="on_error"):
        build_loader(shards, "val", batch_size=4, max_len=8, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        build_loader(tmp_path, "train", batch_size=4, max_len=8)


# -- data.on_error=skip: every skip is counted on the batches ----------------------------------

def _append_samples(shard: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(shard, "a") as tar:
        for key, entries in samples.items():
            for name, data in entries.items():
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _object_npz() -> bytes:
    buf = io.BytesIO()
    z = np.arange(3, dtype=np.int64)
    np.savez(buf, item=np.array([{"x": 1}] * 3, dtype=object), action=z, timestamp=z, device=z)
    return buf.getvalue()


def _meta(sample_id: int) -> bytes:
    return json.dumps({"member_id": sample_id, "sample_id": sample_id}).encode()


# Each corruption is one exception the ErrorPolicy sees, so each counts exactly 1.
CORRUPTIONS = {  # name: (val shard index, what is done to it)
    "object-npz": (0, lambda s: _append_samples(s, {"mzz1": {"seq.npz": _object_npz(),
                                                            "meta.json": _meta(90001)}})),
    "pickle-entry": (0, lambda s: _append_samples(s, {"mzz2": {"seq.npz": _npz_bytes(),
                                                              "meta.json": _meta(90002),
                                                              "state.pickle": b"\x80\x04K\x01."}})),
    "not-a-tar": (1, lambda s: s.write_bytes(b"\x13garbage" * 500)),
    "missing-shard": (2, lambda s: s.unlink()),
    "bad-json": (3, lambda s: _append_samples(s, {"mzz3": {"seq.npz": _npz_bytes(),
                                                          "meta.json": b"{not json"}})),
}


def _corrupted(shards: Path, tmp_path: Path, names) -> tuple[Path, dict[str, Path]]:
    copy = tmp_path / "corrupted"
    shutil.copytree(shards, copy)
    entries = load_manifest(copy)["splits"]["val"]["shards"]
    hit = {}
    for name in names:
        index, corrupt = CORRUPTIONS[name]
        hit[name] = copy / entries[index]["path"]
        corrupt(hit[name])
    return copy, hit


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_corruptions_are_counted_exactly_on_the_batches(shards, tmp_path, num_workers):
    # val: 4 shards of 10. Shards 1 (not a tar) and 2 (missing) are lost, 0 and 3 stay whole
    # with bad samples appended after their last good one. Worker 0 reads shards 0, 2 and
    # worker 1 reads 1, 3: each ends with 10 rows (two full batches of 5) and then a skip, the
    # tail that must ride on its last batch.
    copy, _ = _corrupted(shards, tmp_path, CORRUPTIONS)
    batches = list(build_loader(copy, "val", batch_size=5, max_len=20, shuffle=False,
                                num_workers=num_workers, on_error="skip"))
    assert sum(len(b) for b in batches) == 20
    assert all(isinstance(b.skipped, int) for b in batches)
    assert sum(b.skipped for b in batches) == len(CORRUPTIONS) == 5
    if num_workers == 0:  # rows 1-10 | two bad samples, shards 1, 2 | rows 11-20 | bad json
        assert [b.skipped for b in batches] == [0, 4, 0, 1]
    clean = list(build_loader(shards, "val", batch_size=5, max_len=20, shuffle=False,
                              num_workers=num_workers, on_error="skip"))
    assert [b.skipped for b in clean] == [0] * 8


def test_a_truncated_shard_counts_one_per_read_error(shards, tmp_path):
    """What is counted is exceptions, not lost samples: a tar cut mid-member reports a read
    error, then a broken stream, then the partial sample it left behind."""
    copy = tmp_path / "truncated"
    shutil.copytree(shards, copy)
    bad = copy / load_manifest(copy)["splits"]["val"]["shards"][1]["path"]
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])
    with pytest.warns(UserWarning) as seen:
        batches = list(build_loader(copy, "val", batch_size=4, max_len=20, shuffle=False,
                                    on_error="skip"))
    skips = [w for w in seen if "skipping unreadable data" in str(w.message)]
    assert skips and sum(b.skipped for b in batches) == len(skips)
    assert all(bad.name in str(w.message) for w in skips)


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_on_error_raise_names_the_shard_of_each_corruption(shards, tmp_path, name, num_workers):
    copy, hit = _corrupted(shards, tmp_path, [name])
    with pytest.raises(Exception) as err:  # noqa: B017 - the type varies; the message matters
        list(build_loader(copy, "val", batch_size=5, max_len=20, shuffle=False,
                          num_workers=num_workers))
    assert str(hit[name]) in str(err.value)


def test_moving_a_batch_keeps_its_skip_count():
    lengths = torch.tensor([2, 1])
    batch = SequenceBatch(sample_ids=torch.arange(2), lengths=lengths,
                          item=torch.arange(3), timestamp=torch.arange(3),
                          events={"action": torch.arange(3)}, skipped=3)
    moved = batch.to("cpu")
    assert moved.skipped == 3 and moved.candidates is None and torch.equal(moved.item, batch.item)
    assert batch._map(lambda t: t + 1).skipped == 3  # only tensors are mapped
    assert SequenceBatch(**{**batch.__dict__, "skipped": 0}).skipped == 0


def test_a_batch_travels_between_processes_as_one_buffer():
    """Loader workers hand a batch over through one shared-memory handle, not one per tensor."""
    from multiprocessing.reduction import ForkingPickler  # with torch's reducers registered

    import torch.multiprocessing  # noqa: F401

    batch = SequenceBatch(sample_ids=torch.arange(2), lengths=torch.tensor([2, 1]),
                          item=torch.arange(3), timestamp=torch.arange(3),
                          events={"action": torch.arange(3)}, labels=torch.ones(3),
                          sent=torch.tensor([True, False, True]), queries=["a"], skipped=2)
    arrived = pickle.loads(bytes(ForkingPickler.dumps(batch)))
    assert arrived.skipped == 2 and arrived.queries == ["a"] and arrived.candidates is None
    for key in ("sample_ids", "lengths", "item", "labels", "sent"):
        got, want = getattr(arrived, key), getattr(batch, key)
        assert got.dtype == want.dtype and torch.equal(got, want), key
    assert torch.equal(arrived.events["action"], batch.events["action"])
    storages = {t.untyped_storage().data_ptr() for t in (
        arrived.sample_ids, arrived.item, arrived.labels, arrived.sent, arrived.events["action"])}
    assert len(storages) == 1


def test_a_shard_cut_at_a_member_boundary_is_caught_by_its_sample_count(shards, tmp_path):
    """Such a tar reads as a valid, shorter archive: only the manifest's count shows the loss."""
    copy = tmp_path / "short"
    shutil.copytree(shards, copy)
    bad = copy / load_manifest(copy)["splits"]["val"]["shards"][2]["path"]
    with tarfile.open(bad) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    kept = {m.name.split(".")[0] for m, _ in members}
    kept = sorted(kept)[:3]  # the first 3 samples of 10
    with tarfile.open(bad, "w") as tar:
        for member, data in members:
            if member.name.split(".")[0] in kept:
                tar.addfile(member, io.BytesIO(data))
    with pytest.raises(ValueError, match=rf"shard {bad} held 3 samples, its manifest says 10"):
        list(build_loader(copy, "val", batch_size=5, max_len=20, shuffle=False))
    with pytest.warns(UserWarning, match="held 3 samples"):
        batches = list(build_loader(copy, "val", batch_size=5, max_len=20, shuffle=False,
                                    on_error="skip"))
    assert sum(b.skipped for b in batches) == 1 and sum(len(b) for b in batches) == 33
    batches = list(build_loader(copy, "val", batch_size=5, max_len=20, shuffle=False,
                                num_workers=2, on_error="skip"))
    assert sum(b.skipped for b in batches) == 1 and sum(len(b) for b in batches) == 33


def test_the_fast_npz_reader_reads_what_numpy_reads():
    """Stored entries of every dtype, empty, 2-D and Fortran-ordered arrays through the fast
    path; a compressed archive through np.load; both equal to np.load's arrays."""
    import io

    from foundation.data.npz import decode_npz, encode_npz

    arrays = {"item": np.arange(7, dtype=np.int64), "action": np.array([1, 0, 2], np.int8),
              "empty": np.zeros(0, np.int64), "grid": np.arange(6.0, dtype=np.float32).reshape(2, 3),
              "fortran": np.asfortranarray(np.arange(6).reshape(3, 2)), "flag": np.array([True, False])}
    compressed = io.BytesIO()
    np.savez_compressed(compressed, **arrays)
    for data in (encode_npz(arrays), compressed.getvalue()):
        decoded = decode_npz(data)
        assert list(decoded) == list(arrays)
        for name, array in arrays.items():
            assert decoded[name].dtype == array.dtype and decoded[name].shape == array.shape
            np.testing.assert_array_equal(decoded[name], array)


@pytest.fixture(scope="module")
def zipf_shards(tmp_path_factory) -> Path:
    """Members with Zipf-distributed history lengths (most short, a few at max_len and
    beyond), built through the sasrec_txt importer into 8 train shards."""
    from foundation.data.sources import SourceConfig
    from foundation.data.writer import BuildConfig, build_shards

    root = tmp_path_factory.mktemp("zipf")
    rng = np.random.default_rng(0)
    lengths = np.minimum(3 + rng.zipf(1.4, size=1200), 120)
    lines = [" ".join([str(member)] + [str(i) for i in rng.integers(1, 500, size=n)])
             for member, n in enumerate(lengths, start=1)]
    (root / "seq.txt").write_text("\n".join(lines) + "\n")
    build_shards(BuildConfig(source=SourceConfig(format="sasrec_txt", path=str(root / "seq.txt")),
                             output=str(root / "shards"), split="leave_one_out"))
    return root / "shards"


def step_costs(path: Path, rank: int, **batching) -> tuple[list[float], list[int]]:
    """Each batch's summed row cost on ``rank`` of 2, and the sample ids of the epoch."""
    from foundation.data.loader import row_cost

    costs, ids = [], []
    for batch in build_loader(path, "train", max_len=50, seed=3, rank=rank, world_size=2,
                              **batching):
        costs.append(sum(row_cost(int(n), 50) for n in batch.lengths))
        ids += batch.sample_ids.tolist()
    return costs, ids


def test_token_budget_batches_balance_ranks_by_cost_and_keep_every_sample_once(zipf_shards):
    """data.tokens_per_batch on Zipf lengths: each step's cost on the two ranks within 10%
    (the last, partial batches aside), while batches of 32 members differ far more; one
    epoch over both ranks holds every training sample exactly once."""
    manifest = load_manifest(zipf_shards)
    by_cost = [step_costs(zipf_shards, rank, batch_size=32, tokens_per_batch=1024)
               for rank in (0, 1)]
    by_rows = [step_costs(zipf_shards, rank, batch_size=32) for rank in (0, 1)]
    ids = by_cost[0][1] + by_cost[1][1]
    assert len(ids) == len(set(ids)) == manifest["splits"]["train"]["samples"]
    assert sorted(ids) == sorted(by_rows[0][1] + by_rows[1][1])

    def worst_gap(runs) -> float:
        steps = min(len(runs[0][0]), len(runs[1][0])) - 1  # both ranks' full batches
        return max(abs(a - b) / max(a, b) for a, b in zip(runs[0][0][:steps], runs[1][0][:steps]))

    assert worst_gap(by_cost) <= 0.10
    assert worst_gap(by_rows) > 0.3  # what a fixed member count gives on these lengths
    assert max(by_cost[0][0]) <= 2 * 1024  # the budget: 1,024 events in full-length rows


def test_a_token_budget_below_one_full_row_is_refused(zipf_shards):
    with pytest.raises(ValueError, match="tokens_per_batch=40 is below data.max_len=50"):
        build_loader(zipf_shards, "train", batch_size=8, max_len=50, tokens_per_batch=40)
