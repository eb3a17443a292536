"""A shard, manifest or checkpoint carrying a malicious payload never runs it.

Every payload below, if unpickled (or handed to a shell), creates a sentinel file; each test
asserts the sentinel stays absent. ``test_the_payload_is_live`` shows that it would appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, REPO
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from foundation.data.loader import build_loader
from foundation.data.synthetic import SynthConfig, synthesize
from foundation.data.writer import load_manifest
from foundation.train import checkpoint


class Payload:
    """Unpickling this runs ``touch SENTINEL`` in a shell."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.sentinel))}",)


@pytest.fixture
def sentinel(tmp_path) -> Path:
    return tmp_path / "PAYLOAD-RAN"


def test_the_payload_is_live(tmp_path):
    path = tmp_path / "PAYLOAD-RAN"
    pickle.loads(pickle.dumps(Payload(path)))
    assert path.exists()  # so its absence elsewhere means the payload never ran


# -- shards ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    synthesize(SynthConfig(output=str(out), members=400, items=150, shards_per_split=8))
    return out


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # np.savez pickles object arrays: allow_pickle is on for saving
    return buf.getvalue()


def _good_seq() -> bytes:
    z = np.arange(3, dtype=np.int64)
    return _npz(item=z + 1, action=z, timestamp=z, device=z)


def _append_sample(shard: Path, key: str, entries: dict[str, bytes]) -> None:
    with tarfile.open(shard, "a") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _tampered(shards: Path, tmp_path: Path, kind: str, sentinel: Path) -> tuple[Path, Path]:
    """A copy of the shards whose first val shard ends with one malicious sample."""
    copy = tmp_path / "tampered"
    shutil.copytree(shards, copy)
    shard = copy / load_manifest(copy)["splits"]["val"]["shards"][0]["path"]
    meta = json.dumps({"member_id": 1, "sample_id": 99999}).encode()
    payload = pickle.dumps({"state": Payload(sentinel)})
    entries = {
        "pickle": {"seq.npz": _good_seq(), "meta.json": meta, "pickle": payload},
        "pyd": {"seq.npz": _good_seq(), "meta.json": meta, "pyd": payload},
        "torch-pth": {"seq.npz": _good_seq(), "meta.json": meta, "pth": payload},
        # the arrays themselves: an object array in seq.npz holds the payload
        "object-npz": {"seq.npz": _npz(item=np.array([Payload(sentinel)] * 3, dtype=object),
                                       action=np.zeros(3, np.int64),
                                       timestamp=np.zeros(3, np.int64),
                                       device=np.zeros(3, np.int64)),
                       "meta.json": meta},
    }[kind]
    _append_sample(shard, "mzzzzzz", entries)
    return copy, shard


KINDS = ["pickle", "pyd", "torch-pth", "object-npz"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_with_a_pickle_payload_fails_naming_the_shard(shards, tmp_path, sentinel, kind):
    copy, shard = _tampered(shards, tmp_path, kind, sentinel)
    with pytest.raises(ValueError, match="cannot decode sample 'mzzzzzz'") as err:
        for _ in build_loader(copy, "val", batch_size=4, max_len=20, shuffle=False):
            pass
    assert str(shard) in str(err.value)
    assert not sentinel.exists()


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_a_shard_with_a_pickle_payload_is_skipped_and_counted(shards, tmp_path, sentinel, kind,
                                                              num_workers):
    copy, _ = _tampered(shards, tmp_path, kind, sentinel)
    batches = list(build_loader(copy, "val", batch_size=4, max_len=20, shuffle=False,
                                num_workers=num_workers, on_error="skip"))
    ids = [i for b in batches for i in b.sample_ids.tolist()]
    assert 99999 not in ids and len(ids) == load_manifest(copy)["splits"]["val"]["samples"]
    assert sum(b.skipped for b in batches) == 1
    assert not sentinel.exists()


def test_a_manifest_cannot_make_webdataset_run_a_command(shards, tmp_path, sentinel,
                                                         monkeypatch):
    """webdataset opens ``pipe:CMD`` urls by running CMD in a shell. With data.path=. (run
    from inside the shard directory) the manifest's shard path used to become the url as is."""
    copy = tmp_path / "evil"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    first = manifest["splits"]["val"]["shards"][0]
    first["path"] = f"pipe:touch {shlex.quote(str(sentinel))}; cat {first['path']}"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(copy)
    with pytest.raises(FileNotFoundError, match="pipe:touch"):  # a file of that name: absent
        list(build_loader(".", "val", batch_size=4, max_len=20, shuffle=False))
    batches = list(build_loader(".", "val", batch_size=4, max_len=20, shuffle=False,
                                on_error="skip"))
    assert sum(b.skipped for b in batches) == 1 and sum(len(b) for b in batches) > 0
    assert not sentinel.exists()


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside/shard-000000.tar", ""])
def test_a_manifest_cannot_point_outside_the_dataset(shards, tmp_path, path):
    copy = tmp_path / "escape"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][1]["path"] = path
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="outside"):
        build_loader(copy, "val", batch_size=4, max_len=20)


# -- checkpoint files read in-process ------------------------------------------------------

@pytest.mark.parametrize("fmt", ["pickle", "torch.save"])
def test_safetensors_files_cannot_carry_code(tmp_path, sentinel, fmt):
    """dense.safetensors and rng-rank{r}.safetensors are read with safetensors (a JSON header
    and raw bytes): a pickle put in their place is rejected unread."""
    module = nn.Linear(4, 2)
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    save_file(module.state_dict(), str(ckpt / "dense.safetensors"))
    checkpoint.load_dense(ckpt, nn.Linear(4, 2))  # the untampered file loads
    for name in ("dense.safetensors", "rng-rank0.safetensors"):
        evil = {"weight": torch.zeros(2, 4), "payload": Payload(sentinel)}
        if fmt == "pickle":
            (ckpt / name).write_bytes(pickle.dumps(evil))
        else:
            torch.save(evil, ckpt / name)
    with pytest.raises(SafetensorError):
        checkpoint.load_dense(ckpt, module)
    with pytest.raises(SafetensorError):
        load_file(str(ckpt / "rng-rank0.safetensors"))
    assert not sentinel.exists()


# -- a real run's checkpoint, resumed --------------------------------------------------------

RUN = ["recipe=pretrain_member_fm", "trainer.eval_every=0", "trainer.eval_batches=1",
       "data.batch_size=16", "model.num_layers=1", "logger.log_every=1"]


def _train(synth_shards: Path, run: Path, steps: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "foundation.train", f"data.path={synth_shards}",
                           f"run_dir={run}", *FAST, *RUN, f"trainer.max_steps={steps}"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def trained(synth_shards, tmp_path_factory) -> Path:
    """A real run (one process) with a committed checkpoint at step 2."""
    run = tmp_path_factory.mktemp("trained") / "run"
    result = _train(synth_shards, run, 2)
    assert result.returncode == 0, result.stderr[-4000:]
    return run


def _resume_with(trained: Path, tmp_path: Path, synth_shards: Path, pattern: str,
                 payload: bytes) -> tuple[subprocess.CompletedProcess, Path]:
    """A copy of the trained run with one file of its step-2 checkpoint replaced, resumed."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    targets = sorted((run / "checkpoints" / "step-2").glob(pattern))
    assert len(targets) == 1, targets
    targets[0].write_bytes(payload)
    return _train(synth_shards, run, 4), run


def _torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["engine/engine/*model_states.pt",
                                     "engine/engine/*optim_states.pt"])
def test_a_deepspeed_file_with_a_payload_fails_the_resume_unrun(synth_shards, trained, tmp_path,
                                                                sentinel, pattern):
    evil = _torch_saved({"module": Payload(sentinel), "optimizer_state_dict": Payload(sentinel)})
    result, run = _resume_with(trained, tmp_path, synth_shards, pattern, evil)
    assert result.returncode == 2, result.stderr[-4000:]  # a clear error, not a traceback
    assert "holds more than tensor data (blocked global posix.system)" in result.stderr
    assert "refused to load DeepSpeed state" in result.stderr
    assert not checkpoint.checkpoint_dir(run, 4).exists()  # it did not train on
    assert not sentinel.exists()


@pytest.mark.slow
def test_a_sparse_metadata_file_with_a_payload_fails_the_resume_unrun(synth_shards, trained,
                                                                     tmp_path):
    sentinel = tmp_path / "PAYLOAD-RAN"
    result, _ = _resume_with(trained, tmp_path, synth_shards, "sparse/.metadata",
                             pickle.dumps(Payload(sentinel)))
    assert result.returncode == 2, result.stderr[-4000:]  # a clear error, not a traceback
    assert "sparse/.metadata: refused to unpickle it" in result.stderr
    assert "posix.system is not allowed" in result.stderr
    assert not sentinel.exists(), "the payload in sparse/.metadata ran"


@pytest.mark.parametrize("compressed", [False, True])
def test_an_npz_of_python_objects_is_refused_never_unpickled(compressed, tmp_path):
    """Stored (the fast reader) or compressed (np.load): an object array would need pickle,
    so decoding fails naming why, and the pickled payload never runs."""
    from foundation.data.npz import decode_npz

    marker = tmp_path / "unpickled"
    payload = np.array([Exploit(marker)], dtype=object)
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, item=payload)
    with pytest.raises(ValueError, match="pickle|[Oo]bject"):
        decode_npz(buf.getvalue())
    assert not marker.exists()


class Exploit:
    """Unpickling this writes a file: the proof that pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))
