"""Export to serving: a 2-rank sharded member model → bundle → served by torch.export and by
onnxruntime in fresh processes where torchrec and deepspeed cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, foundation

from foundation.export.bundle import BundleError, dequantise_rows, load_bundle, quantise_rows

pytestmark = pytest.mark.slow
SURFACES = ["home", "search", "row", "continue_watching"]


@pytest.fixture(scope="module")
def surface_shards(synth_shards, tmp_path_factory) -> Path:
    """The test world's events with one more event feature (the page each play started
    from), added in one place: a schema entry of the build, plus its column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw, out = synth_shards / "raw", tmp_path_factory.mktemp("surface")
    events = pq.read_table(raw / "events.parquet")
    picked = np.random.default_rng(0).integers(len(SURFACES), size=events.num_rows)
    pq.write_table(events.append_column("surface", pa.array(np.asarray(SURFACES)[picked])),
                   out / "events.parquet")
    foundation("data", "build", f"source.path={out / 'events.parquet'}", f"output={out}",
               f"+features.surface={{vocab: [{', '.join(SURFACES)}]}}", "progress=false")
    return out


@pytest.fixture(scope="module")
def trained_run(surface_shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export_run")
    foundation("train", "--nproc=2", "recipe=pretrain_member_fm", f"data.path={surface_shards}",
               f"run_dir={run}", "trainer.max_steps=150", "trainer.eval_every=0",
               "model.item_scale=8.0",  # the predictor must scale items like the model
               "model.attention=pointwise",  # the serving program reads event times too
               "model.history_bias=true",  # the predictor offsets history items as trained
               *FAST)
    foundation("eval", f"run_dir={run}", "split=val")
    return run


@pytest.fixture(scope="module")
def bundle(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "member"
    printed = foundation("export", "--nproc=2", f"run_dir={trained_run}", f"output={out}",
                         "member_embeddings=test")
    assert "export:" in printed and "parity" in printed  # the one-line summary
    return out


def test_bundle_holds_every_table_gathered_and_a_checksummed_manifest(bundle, trained_run):
    manifest = json.loads((bundle / "manifest.json").read_text())
    on_disk = {str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()}
    assert on_disk - {"manifest.json"} == set(manifest["files"])
    assert {"model.pt2", "model.onnx", "ann/items.faiss"} <= on_disk
    tables = manifest["tables"]
    # Every sharded table of the 2-rank run, whole (both ranks' shards), in three precisions.
    for name, rows in {"item_table": 1001, "action_table": 7, "gap_table": 16,
                       "hour_table": 25, "device_table": 5, "surface_table": 5,
                       "item_vectors": 1001}.items():
        assert tables[name]["shape"] == [rows, 64] and tables[name]["precisions"] == [
            "fp32", "fp16", "int8"]
    from safetensors.numpy import load_file

    item_table = load_file(bundle / "embeddings/item_table.safetensors")["weight"]
    assert item_table.shape == (1001, 64) and np.abs(item_table[1:]).sum(1).min() > 0
    members = load_file(bundle / "embeddings/member_vectors.safetensors")  # on request
    assert members["weight"].shape == (300, 64) and len(set(members["sample_ids"])) == 300
    assert tables["member_vectors"]["split"] == "test"
    source = manifest["source"]
    assert source["run_dir"] == str(trained_run.resolve()) and source["step"] == 150
    learnt, popular = manifest["eval"]["metrics"], manifest["eval"]["baselines"]["most_popular"]
    assert learnt["hr@10"] >= 2 * popular["hr@10"]  # HSTU layers learn, too
    assert manifest["inputs"]["tokens"]["shape"] == ["batch", "seq", 64]
    assert manifest["inputs"]["timestamps"]["shape"] == ["batch", "seq"]
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])


def test_a_new_event_feature_declared_once_reaches_serving(bundle):
    """``surface`` was only declared in the build (surface_shards): the model trained on it,
    the gate served it from raw histories, and callers pass it by name."""
    from foundation.export import History

    manifest = json.loads((bundle / "manifest.json").read_text())
    surface = {f["name"]: f for f in manifest["features"]}["surface"]
    assert surface["vocab"] == SURFACES and surface["served_from"] == "History(surface=...)"
    assert "surface" in manifest["model"]["token_features"]
    assert [f["name"] for f in manifest["item_features"]] == ["item"]  # an ID-only model
    predictor = load_bundle(bundle)
    items = [int(i) for i in predictor.item_ids[1:6]]
    times = [0, 60, 120, 3600, 7200]
    vectors = np.concatenate([predictor.member_vectors([History(items, times)])] + [  # <pad>
        predictor.member_vectors([History(items, times, surface=[s] * 5)]) for s in SURFACES])
    distances = np.abs(vectors[:, None] - vectors[None]).max(-1)
    assert distances[~np.eye(len(vectors), dtype=bool)].min() > 1e-4  # each value counts
    with pytest.raises(ValueError, match="did you mean 'surface'"):
        predictor.recommend(History(items, times, surfaces=["home"] * 5))
    with pytest.raises(ValueError, match="unknown value.*homepage"):
        predictor.recommend(History(items, times, surface=["homepage"] * 5))


def test_parity_gate_passed_on_real_data_and_reports_quantisation_and_ann(bundle):
    parity = json.loads((bundle / "manifest.json").read_text())["parity"]
    assert parity["members"] >= 256  # the val split's members, both ranks
    for backend in ("torch", "onnx"):
        assert parity["backends"][backend]["max_abs_diff"] <= 1e-4
        assert parity["backends"][backend]["top10_identical"] >= 0.99
    precisions = parity["precisions"]
    assert precisions["fp32"]["hr@10"] > 0.1  # a trained model, not noise
    assert abs(precisions["fp16"]["hr@10_change"]) <= 0.02
    assert abs(precisions["int8"]["hr@10_change"]) <= 0.05
    assert parity["ann"]["recall@10"] >= 0.9


SERVE = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu", "deepspeed"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from foundation.export import History, load_bundle
bundle, backend = sys.argv[1], sys.argv[2]
p = load_bundle(bundle, backend=backend)
history = [int(i) for i in p.item_ids[1:6]]
member = History(items=history, timestamps=[0, 60, 120, 3600, 7200])
top = p.recommend(member, k=10)
scores = p.score(member, top).tolist()
print(json.dumps({"top": top, "scores": scores, "history": history,
                  "loaded": sorted(m for m in ("torchrec", "deepspeed", "fbgemm_gpu", "torch")
                                   if m in sys.modules)}))
"""


def serve(bundle: Path, backend: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SERVE, str(bundle), backend], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fresh_processes_without_torchrec_or_deepspeed_serve_the_same_recommendations(bundle):
    by_torch, by_onnx = serve(bundle, "torch"), serve(bundle, "onnx")
    assert "torchrec" not in by_torch["loaded"] and "deepspeed" not in by_torch["loaded"]
    assert "torch" not in by_onnx["loaded"]  # onnxruntime alone serves the onnx backend
    assert by_torch["top"] == by_onnx["top"] and len(by_torch["top"]) == 10
    assert not set(by_torch["top"]) & set(by_torch["history"])  # seen items excluded
    scores = np.array(by_torch["scores"])
    assert np.all(np.diff(scores) <= 1e-6)  # score() agrees with recommend()'s order
    assert np.allclose(scores, by_onnx["scores"], atol=1e-4)


def test_served_scores_carry_the_trained_history_bias(bundle):
    """Items of the history gain the learned offset of each of their events, by age; the
    gate's reference adds the training model's, so a bundle that dropped it would fail."""
    predictor = load_bundle(bundle)
    weight = predictor.history_bias
    assert weight is not None and np.abs(weight).max() > 1e-3  # trained, above the gate's 1e-4
    items = [int(i) for i in predictor.item_ids[[3, 5, 3, 8]]]
    events = [predictor._events(items)]
    offset = predictor.scores_of(events) - predictor.member_vectors_of(events) @ predictor.catalogue.T
    rows = predictor._known(items, "history")
    expected = np.zeros_like(offset[0])
    np.add.at(expected, rows, weight[[3, 2, 1, 0]])
    assert np.allclose(offset[0], expected, atol=1e-5)
    assert np.allclose(predictor.score(items, items[:2]), predictor.scores_of(events)[0, rows[:2]])


def test_the_gate_serves_raw_histories_and_fails_a_skewed_served_feature(trained_run, bundle,
                                                                        tmp_path):
    """The gate feeds the predictor raw ``History`` objects (items, actions, times, devices)
    as a caller would: served faithfully it passes; with the device skew the predictor once
    had (device 0 for every event) it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "tests/workers/parity_skew.py"),
                           str(trained_run), str(bundle), str(tmp_path / "parity")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    reports = json.loads(done.stdout.strip().splitlines()[-1])
    for backend in ("torch", "onnx"):
        assert reports["served"]["backends"][backend]["max_abs_diff"] <= 1e-4
        assert reports["skewed"]["backends"][backend]["max_abs_diff"] > 1e-3


def test_a_changed_file_fails_the_checksum_naming_it(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / "embeddings/item_vectors.safetensors"
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="item_vectors.safetensors does not match its sha256"):
        load_bundle(copy)
    shutil.copy(bundle / "embeddings/item_vectors.safetensors", target)
    (copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="model.onnx is missing"):
        load_bundle(copy, backend="onnx")


def test_a_pickle_planted_in_the_exported_program_is_refused_not_run(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    import pickle

    program = copy / "model.pt2"
    with zipfile.ZipFile(program) as archive:
        entries = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    sample = next(name for name in entries if "sample_inputs" in name)
    entries[sample] = pickle.dumps(Payload())
    with zipfile.ZipFile(program, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    # An attacker able to edit the bundle can edit the manifest's checksums too.
    from foundation.export.bundle import sha256

    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["model.pt2"] = sha256(program)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="holds a pickle"):
        load_bundle(copy)
    assert not sentinel.exists()


def test_a_failed_parity_gate_writes_no_bundle(trained_run, tmp_path):
    out = tmp_path / "strict"
    # On 2 ranks: rank 0 fails the gate, rank 1 must hear of it and exit too (not hang).
    result = foundation("export", "--nproc=2", f"run_dir={trained_run}", f"output={out}", "ann=false",
                        "precisions=[fp32]", "max_abs_diff=-1", check=False)
    assert result.returncode != 0  # torchrun reports its workers' exit 2 as a failure
    assert "parity gate failed, no bundle written" in result.stderr
    assert "the export failed on rank 0" in result.stderr  # rank 1 stopped too
    assert not out.exists() and not list(tmp_path.glob(".strict*"))


def test_an_existing_output_is_not_overwritten_unless_asked(bundle, trained_run):
    result = foundation("export", f"run_dir={trained_run}", f"output={bundle}", check=False)
    assert result.returncode == 2 and "overwrite=true" in result.stderr


def test_row_wise_int8_keeps_each_row_within_half_a_step():
    rows = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    stored = quantise_rows(rows, "int8")
    assert stored["weight"].dtype == np.int8
    step = (rows.max(1) - rows.min(1)) / 255
    assert np.all(np.abs(dequantise_rows(stored) - rows).max(1) <= step / 2 + 1e-6)
    assert np.array_equal(dequantise_rows(quantise_rows(rows, "fp16")), rows.astype(np.float16)
                          .astype(np.float32))


@pytest.mark.parametrize("attention", ["softmax", "pointwise"])
def test_exported_programs_compute_what_the_encoder_computes(attention, tmp_path):
    """Both attention kinds export (torch.export and ONNX, dynamic batch and length) to
    programs that match the eager encoder on a batch of another shape than the example."""
    import onnxruntime
    import torch

    from foundation.export.exporter import MemberEncoderProgram
    from foundation.export.programs import export_inputs, history_inputs
    from foundation.models.member import EventEncoder, MemberModelConfig

    torch.manual_seed(0)
    cfg = MemberModelConfig(embedding_dim=16, num_layers=2, num_heads=2, max_len=12,
                            attention=attention)
    program = MemberEncoderProgram(EventEncoder(cfg)).eval()
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    export_inputs(program, history_inputs(16, 12, batch), tmp_path / "model", "member")
    lengths = torch.tensor([12, 5, 1, 9, 3])
    inputs = (torch.randn(5, 12, 16), lengths, torch.randint(0, 10**9, (5, 12)).cumsum(1))
    inputs = inputs[:len(program.input_names)]
    with torch.no_grad():
        expected = program(*inputs).numpy()
        exported = torch.export.load(str(tmp_path / "model.pt2")).module()(*inputs).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    served = session.run(None, {name: x.numpy() for name, x in
                                zip(program.input_names, inputs)})[0]
    assert [i.name for i in session.get_inputs()] == program.input_names
    assert np.abs(exported - expected).max() < 1e-5 and np.abs(served - expected).max() < 1e-4
