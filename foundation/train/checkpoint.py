"""Checkpoints: ``RUN/checkpoints/step-N/`` with

* ``sparse/`` — the sharded tables and their fused-optimizer state, written shard by shard
  with torch.distributed.checkpoint (loads on any world size: DCP reshards);
* ``engine/`` — the DeepSpeed engine's own state (dense weights + ZeRO optimizer partitions);
* ``dense.safetensors`` — the dense weights consolidated in fp32, for warm starts and export;
* ``dense_optim.safetensors`` — AdamW's moments consolidated likewise, and its step: with the
  weights, a layout-free copy of the dense state for resuming on another world size;
* ``trainer_state.json`` — step, config hash, world size and, for a fine-tune that trains
  only part of its model (``recipe.mode`` freeze / partial / lora), ``base``: the pretrain
  checkpoint (and its config hash) holding everything this one leaves out — its frozen
  weights, and its tables when they are frozen (``sparse/`` is then absent);
* ``rank{r}.json``, ``rng-rank{r}.safetensors`` and ``ids-rank{r}.safetensors`` — each
  rank's data-stream position, RNG, and the ids of the samples its epoch has consumed (what
  another layout of ranks continues without);
* ``COMMITTED`` — written last, by rank 0, after every rank finished. A directory without it
  is never loaded.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

COMMIT_MARKER = "COMMITTED"
BEST = "best.json"  # in the run dir: the step of the best validation so far
BASE = "base"  # trainer_state key: the checkpoint a fine-tune's partial checkpoint builds on


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: the message names the file or keys and the way out."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint that does not fit the model being built: names the keys."""


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file holding more than data (a pickled object that could run code)."""


# torch.distributed.checkpoint keeps its metadata as a pickle; these are the only globals it
# writes there (plus torch dtypes). Anything else in that file is refused, never constructed.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
     ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed")


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader, except that its metadata pickle may hold only DCP's own classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpoint(f"{path}: refused to unpickle it ({err}): checkpoint "
                                   f"metadata holds only torch.distributed.checkpoint's own "
                                   f"classes; this file was altered") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def committed_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    found = [p for p in root.glob("step-*") if (p / COMMIT_MARKER).exists()] if root.exists() else []
    return sorted(found, key=step_of)


def step_of(path: Path) -> int:
    """``…/step-N`` → N."""
    return int(path.name.split("-")[1])


def resolve(source: str | Path, which: str = "latest") -> Path:
    """A run dir or checkpoint dir → a committed checkpoint dir, or a clear error. ``which``:
    ``latest``, ``best`` (the best validation, with ``trainer.patience``), ``auto`` (best
    where the run kept one: early stopping chose it; else latest) or ``step-N``."""
    path = Path(source)
    if (path / COMMIT_MARKER).exists():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run dir (run_dir=...) or a "
                                f"checkpoint dir (…/checkpoints/step-N)")
    if which == "auto":
        which = "best" if (path / BEST).exists() else "latest"
    if which == "best":
        if not (path / BEST).exists():
            raise FileNotFoundError(f"{path} has no {BEST}: train with trainer.patience > 0 "
                                    f"and trainer.eval_every > 0 to keep the best checkpoint")
        which = f"step-{json.loads((path / BEST).read_text())['step']}"
    found = committed_checkpoints(path)
    if which != "latest":
        found = [p for p in found if p.name == which]
    if not found:
        raise FileNotFoundError(f"no committed checkpoint {'' if which == 'latest' else which} "
                                f"in {path}/checkpoints: train the run first (or finish it)")
    return found[-1]


def save(path: Path, *, sparse: nn.Module | None, engine, state: dict[str, Any],
         rank_state: dict[str, Any], rank: int, barrier, background=None,
         trained_only: bool = False, rank_ids: dict[str, Any] | None = None
         ) -> Future | None:
    """Every rank writes its part; rank 0 commits once all ranks are done. ``sparse`` None:
    the tables are frozen and not written; ``trained_only``: the dense state holds only what
    trains (and buffers) — ``state["base"]`` must name the checkpoint with the rest.

    With ``background`` (a gloo process group), the tables are copied to memory and written
    by a background thread: the returned future finishes the write, and ``commit`` must follow
    on every rank once all futures are done. Until then the checkpoint is invisible."""
    path.mkdir(parents=True, exist_ok=True)
    pending = None
    if sparse is not None and background is None:
        dcp.save(_sparse_state(sparse), checkpoint_id=str(path / "sparse"))
    elif sparse is not None:
        pending = _background_writer().submit(  # from a copy: training updates the tables on
            dcp.save, _snapshot(_sparse_state(sparse)), checkpoint_id=str(path / "sparse"),
            process_group=background)
    engine.save(str(path / "engine"), trained_only=trained_only)
    dense = engine.consolidated_state_dict()  # collectives under ZeRO: every rank calls them
    if trained_only:
        frozen = {n for n, p in engine.module.named_parameters() if not p.requires_grad}
        dense = {k: v for k, v in dense.items() if k not in frozen}
    dense_optim = engine.full_optimizer_state()
    save_file({"torch": torch.get_rng_state()}, str(path / f"rng-rank{rank}.safetensors"))
    _write_json(path / f"rank{rank}.json", rank_state)
    if rank_ids is not None:
        save_numpy(rank_ids, str(path / f"ids-rank{rank}.safetensors"))
    if rank == 0:
        save_file(dense, str(path / "dense.safetensors"))
        save_file(dense_optim, str(path / "dense_optim.safetensors"))
        _write_json(path / "trainer_state.json", state)
    if pending is None:
        commit(path, rank=rank, barrier=barrier)
    return pending


@functools.cache
def _background_writer() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")


def _snapshot(value: Any) -> Any:
    """A copy of a state dict in memory, sharded tensors included (DCP's own async staging
    does not handle TorchRec's ShardedTensors)."""
    if isinstance(value, ShardedTensor):
        shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in value.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, value.metadata(), process_group=value._process_group)
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_snapshot(v) for v in value)
    return value


def commit(path: Path, *, rank: int, barrier) -> None:
    """Make a fully written checkpoint visible: after every rank is done, rank 0 writes the
    marker, last."""
    barrier()
    if rank == 0:
        _write_json(path / COMMIT_MARKER, {"step": step_of(path)})
    barrier()


def restore(path: Path, *, sparse: nn.Module, engine, rank: int,
            same_engine: bool = True) -> dict[str, Any]:
    """Load everything ``save`` wrote back into a freshly built model (warm-started from the
    checkpoint's ``base``, if it has one); returns this rank's state (data position). A
    checkpoint of the other dense engine (``same_engine`` False) gives its consolidated dense
    weights and moments."""
    if (path / "sparse").exists():
        _load_sparse_and_optimizer(path, sparse)
    if not same_engine or not (path / "engine").is_dir():  # the other engine's, or FSDP's
        _load_full_dense(path, engine)
    else:
        try:
            engine.load(str(path / "engine"), trained_only=BASE in read_state(path))
        except pickle.UnpicklingError as err:  # weights_only refused a global: name it
            raise UnsafeCheckpoint(f"refused to load DeepSpeed state of {path}: {err}") from None
    torch.set_rng_state(load_file(str(path / f"rng-rank{rank}.safetensors"))["torch"])
    return json.loads((path / f"rank{rank}.json").read_text())


def rank_ids(path: Path, rank: int) -> dict[str, Any] | None:
    """The sample ids rank ``rank`` saved (None: a checkpoint written before they were)."""
    file = path / f"ids-rank{rank}.safetensors"
    return load_numpy(str(file)) if file.exists() else None


def consumed_ids(path: Path, world_size: int) -> Any | None:
    """Every sample the checkpoint's epoch consumed, over all the ranks that saved it
    (None when a rank's ids are missing)."""
    import numpy as np

    saved = [rank_ids(path, rank) for rank in range(world_size)]
    if any(ids is None for ids in saved):
        return None
    return np.unique(np.concatenate([a for ids in saved for a in (ids["skip"], ids["taken"])]))


def restore_resharded(path: Path, *, sparse: nn.Module, engine) -> None:
    """Load a checkpoint saved on another layout: DCP reshards the tables and their optimizer
    state; every rank takes its partition of the consolidated dense weights and moments.
    RNG and data positions belong to the old layout and are not restored."""
    if (path / "sparse").exists():
        _load_sparse_and_optimizer(path, sparse)
    _load_full_dense(path, engine)


def _load_full_dense(path: Path, engine) -> None:
    """The consolidated dense weights and AdamW moments, into any engine on any layout."""
    if not (path / "dense_optim.safetensors").exists():
        raise CheckpointMismatch(f"{path} has no dense_optim.safetensors (written by an older "
                                 f"version): resume it on its own layout and engine")
    engine.load_full_state(load_file(str(path / "dense.safetensors")),
                           load_file(str(path / "dense_optim.safetensors")))


def prune(run_dir: Path, keep_last: int, keep_step: int | None = None) -> None:
    """Retention: drop committed checkpoints beyond the newest ``keep_last`` (except step
    ``keep_step``, the best) and incomplete ones older than the newest committed. The newest
    committed one is never deleted."""
    import shutil

    committed = committed_checkpoints(run_dir)
    if not committed:
        return
    newest = step_of(committed[-1])
    doomed = [p for p in committed[:-keep_last] if step_of(p) != keep_step] if keep_last > 0 else []
    doomed += [p for p in (run_dir / "checkpoints").glob("step-*")
               if not (p / COMMIT_MARKER).exists() and step_of(p) < newest]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)


def _load_sparse_and_optimizer(path: Path, sparse: nn.Module) -> None:
    state = _sparse_state(sparse)
    _check_sparse_fits(path, state)
    reader = SafeReader(path / "sparse")
    regrouped = _read_whole_row_states(reader.read_metadata().state_dict_metadata, state)
    dcp.load(state, storage_reader=reader)  # reshards to this world size
    for states, name, target, whole, rows in regrouped:
        _place_row_state(target, whole, rows)
        states[name] = target
    sparse.fused_optimizer.load_state_dict(state["optim"])


def _read_whole_row_states(saved: dict[str, Any], state: dict[str, Any]) -> list[tuple]:
    """Row-wise optimizer states whose saved size differs from this layout's: a column-wise
    table keeps one value per row for each column shard, so their number changes with the
    ranks. Each is read whole instead (a plain tensor in ``state``, filled by the load)."""
    regrouped = []
    for param, states in state["optim"]["state"].items():
        for name, value in states.items():
            have = tuple(getattr(saved.get(f"optim.state.{param}.{name}"), "size", ()))
            want, rows = tuple(value.size()), state["model"][param].size(0)
            if not have or have == want:
                continue
            if len(have) != 1 or len(want) != 1 or have[0] % rows or want[0] % rows:
                raise CheckpointMismatch(f"the saved optimizer state {param}.{name} {have} does "
                                         f"not reshard to {want}")
            states[name] = torch.empty(have, dtype=value.dtype)
            regrouped.append((states, name, value, states[name], rows))
    return regrouped


def _place_row_state(target: ShardedTensor, whole: torch.Tensor, rows: int) -> None:
    """A per-row state saved for k column shards, ``[k·rows]``, into this layout's shards of
    ``target``: each row's value is the mean over the saved shards (row-wise Adagrad keeps
    the mean squared gradient over a shard's columns; equal-width shards average to the
    row's), repeated for each of this layout's column shards."""
    per_row = whole.view(-1, rows).mean(0).repeat(target.size(0) // rows)
    for shard in target.local_shards():
        start = shard.metadata.shard_offsets[0]
        shard.tensor.copy_(per_row[start:start + shard.tensor.shape[0]])


def _sparse_state(sparse: nn.Module) -> dict[str, Any]:
    return {"model": sparse.state_dict(), "optim": sparse.fused_optimizer.state_dict()}


def load_sparse(path: Path, sparse: nn.Module, optimizer: bool = False) -> None:
    """Load the sharded tables into ``sparse`` (resharding to this world size as needed);
    with ``optimizer``, also their fused optimizer's state where the checkpoint's optimizer
    is the same kind (a warm start then continues the tables' adaptive step sizes instead of
    taking the large first steps of a fresh Adagrad)."""
    if optimizer and _same_sparse_optimizer(path, sparse):
        _load_sparse_and_optimizer(path, sparse)
        return
    state = {"model": sparse.state_dict()}
    _check_sparse_fits(path, state)
    dcp.load(state, storage_reader=SafeReader(path / "sparse"))


def _same_sparse_optimizer(path: Path, sparse: nn.Module) -> bool:
    saved = SafeReader(path / "sparse").read_metadata().state_dict_metadata
    wanted = _flat_keys("optim.state", sparse.fused_optimizer.state_dict()["state"])
    return bool(wanted) and all(key in saved for key in wanted)


def _flat_keys(prefix: str, value: Any) -> list[str]:
    """DCP's flattened keys of a nested dict of tensors."""
    if isinstance(value, dict):
        return [k for key, v in value.items() for k in _flat_keys(f"{prefix}.{key}", v)]
    return [prefix]


def _check_sparse_fits(path: Path, state: dict[str, Any]) -> None:
    saved = SafeReader(path / "sparse").read_metadata().state_dict_metadata
    wanted = {f"model.{k}": tuple(v.size()) for k, v in state["model"].items()}
    have = {k: tuple(getattr(v, "size", ())) for k, v in saved.items()}
    missing = sorted(k for k in wanted if k not in have)
    mismatched = sorted(f"{k} {have[k]} vs {wanted[k]}" for k in wanted
                        if k in have and have[k] != wanted[k])
    if missing or mismatched:
        raise CheckpointMismatch(
            f"the sparse tables of {path} do not fit this model: missing {missing[:8]}, "
            f"shape-mismatched (saved vs model) {mismatched[:8]} "
            f"(a checkpoint of a different model or config?)")


def load_dense(path: Path, module: nn.Module, new: tuple[str, ...] = (),
               unused: tuple[str, ...] = ()) -> None:
    """Load consolidated dense weights. A warm start names its allow-lists: ``new``, prefixes
    of the model's keys the checkpoint does not provide (initialised fresh), and ``unused``,
    prefixes of the checkpoint's keys the model leaves; any other key missing on either side,
    or of another shape, fails naming it."""
    weights = load_file(str(path / "dense.safetensors"))
    own = module.state_dict()
    wanted = {k for k in own if not k.startswith(new)}
    missing = sorted(wanted - weights.keys())
    mismatched = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}"
                        for k in wanted & weights.keys() if weights[k].shape != own[k].shape)
    unexpected = sorted(k for k in weights.keys() - own.keys() if not k.startswith(unused))
    if missing or mismatched or unexpected:
        allowed = (f"; the recipe allows new keys under {list(new)} and unused ones under "
                   f"{list(unused)}: fine-tune with the source run's model.* settings (its "
                   f"config.yaml)" if new or unused else "")
        raise CheckpointMismatch(
            f"checkpoint {path} does not fit this model: missing {missing[:8]}, "
            f"shape-mismatched (saved vs model) {mismatched[:8]}, unexpected {unexpected[:8]}"
            f"{allowed} (a checkpoint of a different model or config?)")
    module.load_state_dict({k: weights[k] for k in wanted}, strict=not new)


def load_trained(path: Path, module: nn.Module) -> None:
    """Load a ``trained_only`` checkpoint's dense weights over ``module`` (which holds its
    base's): every trained parameter must be in it, and nothing the module lacks."""
    weights = load_file(str(path / "dense.safetensors"))
    own = module.state_dict()
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(trained - weights.keys()), sorted(weights.keys() - own.keys())
    if missing or unexpected:
        raise CheckpointMismatch(f"checkpoint {path} does not fit this model: trained weights "
                                 f"missing {missing[:8]}, unexpected {unexpected[:8]} (a "
                                 f"checkpoint of another recipe.mode or model?)")
    module.load_state_dict(weights, strict=False)


def base_pointer(base: Path) -> dict[str, Any]:
    """What a ``trained_only`` checkpoint records of the checkpoint holding the rest."""
    saved = read_state(base)
    return {"checkpoint": str(base.resolve()), "step": saved["step"],
            "config_hash": saved.get("config_hash")}


def base_of(path: Path | None) -> Path | None:
    """The base checkpoint a ``trained_only`` checkpoint needs (None for a whole one),
    checked to be the one it was trained from."""
    if path is None:
        return None
    pointer = read_state(path).get(BASE)
    if pointer is None:
        return None
    base = Path(pointer["checkpoint"])
    if not (base / COMMIT_MARKER).exists():
        raise FileNotFoundError(f"{path} holds only what its fine-tune trained; the rest is "
                                f"in its base checkpoint {base}, which is gone: restore it "
                                f"(retention in the pretrain run: trainer.keep_last) or "
                                f"retrain the fine-tune")
    if read_state(base).get("config_hash") != pointer["config_hash"]:
        raise CheckpointMismatch(f"{path} was fine-tuned from {base} with config hash "
                                 f"{pointer['config_hash']}, but that checkpoint now has "
                                 f"another config: it was overwritten by a different run")
    return base


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)


def mark_best(run_dir: Path, step: int, metric: str, value: float) -> None:
    _write_json(run_dir / BEST, {"step": step, "metric": metric, "value": value})


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


