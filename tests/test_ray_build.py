"""``foundation data build engine=ray``: Ray Data (a local Ray, 2 CPUs) writes the single-process
writer's shards, item tables and manifest byte for byte."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from foundation.compose import compose
from foundation.data.commands import run_build
from foundation.data.ray_build import build_shards_ray
from foundation.data.sources import SourceConfig
from foundation.data.writer import BuildConfig, BuildEngine, build_shards


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module; each build uses it rather than starting its own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _outputs(root: Path) -> dict[str, bytes]:
    """Every file a build wrote, the manifest without the name of the builder."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    manifest = json.loads(files.pop("manifest.json"))
    assert manifest.pop("created_by").startswith("foundation.data.")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def _both(source: SourceConfig, tmp_path: Path, **options) -> tuple[dict, dict[str, bytes], dict[str, bytes]]:
    """Build with each engine; the local manifest and both engines' files."""
    local = build_shards(BuildConfig(source=source, output=str(tmp_path / "local"), **options))
    build_shards_ray(BuildConfig(source=source, output=str(tmp_path / "ray"), **options))
    return local, _outputs(tmp_path / "local"), _outputs(tmp_path / "ray")


@pytest.mark.parametrize("options", [
    {"split": "member", "cold_items": 0.1, "cold_val_items": 0.05, "max_history": 30},
    {"split": "leave_one_out", "cold_items": 0.05, "shards_per_split": 3},
    {"split": "time", "max_history": 20},
], ids=["member", "leave_one_out", "time"])
def test_ray_writes_the_writers_shards_on_the_synthetic_world(synth_shards, local_ray, tmp_path, options):
    raw = synth_shards / "raw"
    attributes = tmp_path / "attributes.json"  # item attributes and a catalogue: item-sized, on the driver
    attributes.write_text(json.dumps({str(i): [i % 7, 100 + i % 3] for i in range(0, 1000, 3)}))
    source = SourceConfig(path=str(raw / "events.parquet"), catalogue_path=str(raw / "catalogue.parquet"),
                          item_attributes_path=str(attributes))
    manifest, local, on_ray = _both(source, tmp_path, **options)
    assert local.keys() == on_ray.keys()
    assert [name for name in local if local[name] != on_ray[name]] == []  # same bytes, every file
    # ... of a real build: every member, every split, cold items held out
    assert manifest["totals"]["members"] == 3000
    assert all(manifest["splits"][split]["samples"] > 0 for split in ("train", "val", "test"))
    assert sum(len(split["shards"]) for split in manifest["splits"].values()) == len(
        [name for name in local if name.endswith(".tar")])
    assert manifest["cold_items"]["count"] == round(999 * options.get("cold_items", 0))
    assert manifest["vocab"]["attribute"] == 7 + 1 + 1  # i % 7, 100 (every third item), padding


def test_events_at_the_same_second_keep_the_table_order_across_parts(local_ray, tmp_path):
    """Coarse timestamps (many ties within a member) over a directory of parquet parts, each
    of several row groups: ties break by the place in the table, as the writer's stable sort."""
    rng = np.random.default_rng(3)
    rows = 3000
    events = pa.table({"member_id": rng.integers(0, 80, rows), "item_id": rng.integers(0, 300, rows),
                       "timestamp": rng.integers(0, 20, rows) * 3600,
                       "action": rng.choice(["play", "complete", "add_to_list"], rows)})
    parts = tmp_path / "events"
    parts.mkdir()
    for index, start in enumerate(range(0, rows, 1000)):
        pq.write_table(events.slice(start, 1000), parts / f"part-{index:03d}.parquet", row_group_size=300)
    member = events.column("member_id").to_numpy()
    timestamp = events.column("timestamp").to_numpy()
    assert len(np.unique(np.stack([member, timestamp]), axis=1)[0]) < rows / 2  # ties abound
    _, local, on_ray = _both(SourceConfig(path=str(parts)), tmp_path, split="leave_one_out",
                             max_history=25)
    assert [name for name in local if local.get(name) != on_ray.get(name)] == []


def test_the_build_command_selects_ray_with_engine_ray(synth_shards, local_ray, tmp_path):
    out = tmp_path / "shards"
    run_build(compose("data_build", [f"source.path={synth_shards / 'raw' / 'events.parquet'}",
                                     f"output={out}", "engine=ray", "ray.partitions=4",
                                     "progress=false"]))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["created_by"] == "foundation.data.ray_build.build_shards_ray"
    assert manifest["totals"]["members"] == 3000


@pytest.mark.parametrize(("source", "named"), [
    ({"format": "csv"}, "source.format=csv"),
    ({"impressions_path": "imp.parquet"}, "source.impressions_path"),
    ({"item_media_dir": "media"}, "source.item_media_dir"),
])
def test_sources_only_the_local_writer_reads_are_refused_before_ray_starts(tmp_path, source, named):
    cfg = BuildConfig(source=SourceConfig(path=str(tmp_path / "events"), **source),
                      output=str(tmp_path / "out"), engine=BuildEngine.ray)
    with pytest.raises(ValueError, match="engine=local") as err:
        build_shards_ray(cfg)
    assert named in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_training_engine_is_not_a_build_engine():
    from foundation.compose import ConfigError

    with pytest.raises(ConfigError, match="engine"):
        compose("data_build", ["source.path=e.parquet", "output=o", "engine=deepspeed"])


def test_a_members_samples_do_not_depend_on_the_order_its_events_arrive_in():
    """A shuffle delivers a member's events in any order; time then place in the table decide."""
    from foundation.data.ray_build import ROW, _member_samples

    rng = np.random.default_rng(0)
    count = 40
    group = pa.table({"member_id": np.full(count, 7), "item_id": rng.integers(0, 5, count),
                      "timestamp": rng.integers(0, 4, count), ROW: np.arange(count) * 3})
    absent = {"end": np.array([-1]), "shard": np.array([-1]), "position": np.array([-1])}
    layout = {"train": {"end": np.array([count - 1]), "shard": np.array([0]), "position": np.array([0])},
              "val": absent, "test": absent}
    kwargs = {"members": np.array([7]), "layout": layout, "raw_items": np.arange(5),
              "stored": ("item", "timestamp"), "max_history": None, "removed": {}}
    samples = _member_samples(group, **kwargs)
    assert samples.num_rows == 1 and samples.column("held")[0].as_py() == count - 1
    for _ in range(3):
        assert _member_samples(group.take(rng.permutation(count)), **kwargs).equals(samples)


def test_a_corrupt_part_or_a_missing_ray_is_named_with_the_fix(tmp_path, monkeypatch):
    parts = tmp_path / "events"
    parts.mkdir()
    pq.write_table(pa.table({"member_id": [1], "item_id": [2], "timestamp": [3]}), parts / "a.parquet")
    (parts / "b.parquet").write_bytes(b"not parquet")
    cfg = BuildConfig(source=SourceConfig(path=str(parts)), output=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="b.parquet is not a readable parquet file"):
        build_shards_ray(cfg)  # on the driver, before Ray starts
    (parts / "b.parquet").unlink()
    monkeypatch.setitem(sys.modules, "ray", None)  # as where the extra is not installed
    with pytest.raises(ImportError, match=r"pip install 'foundation\[ray\]'.*engine=local"):
        build_shards_ray(cfg)
