"""``foundation export run_dir=RUN output=BUNDLE``: a trained member model → a serving bundle.

Runs alone or under torchrun (``--nproc N``): the checkpoint is loaded sharded over the ranks,
each table is gathered to rank 0 one at a time and written as safetensors (never the whole
model in one process), the encoder is exported with ``torch.export`` and to ONNX, and the
parity gate compares the sharded model with the bundle, served in a fresh process by both
backends, on real evaluation data. The bundle is written under a staging name and renamed
into place only when the gate passes: a failed export leaves no bundle.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig
from safetensors.numpy import save_file
from torch import Tensor, nn

from foundation.checksum import sha256
from foundation.choices import BundleKind
from foundation.config import config_hash
from foundation.console import setup_logging
from foundation.distributed.env import init_distributed
from foundation.eval.run import TrainedRun, load_run
from foundation.export.bundle import (
    BUNDLE_FORMAT,
    MANIFEST,
    PRECISIONS,
    quantise_rows,
    table_file,
)
from foundation.export.candidates import (
    write_candidate_parity_inputs,
    write_candidate_program,
    write_content_units,
)
from foundation.export.content import write_content, write_content_parity_inputs
from foundation.export.programs import export_inputs, history_inputs
from foundation.export.recorded import caller_history, raw_ids, save_rank, whole_histories
from foundation.export.search import (
    search_query_manifest,
    write_search_parity_inputs,
    write_search_program,
)
from foundation.metrics.ann import EF_SEARCH, HNSW_NEIGHBOURS, hnsw_index
from foundation.models.finetune import merge_adapters
from foundation.models.member import last_states
from foundation.tasks import all_concat, keep_last, split_last_event, synchronised
from foundation.train import checkpoint

log = logging.getLogger(__name__)

# torch.export and the ONNX exporter log notes meant for their developers (torchvision ops
# skipped, fx-tracing API names); the export prints its own summary.
for _name in ("torch.onnx._internal.exporter._registration", "torch.fx._symbolic_trace"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class ExportError(RuntimeError):
    """An export that must not produce a bundle (the parity gate failed, ...)."""


class MemberEncoderProgram(nn.Module):
    """The exported path: summed event tokens ``[B, L, D]`` (rows left-aligned), their
    lengths ``[B]`` and, for encoders that read time, the events' unix seconds ``[B, L]`` →
    member embeddings ``[B, D]`` (unit length with ``normalise``, for cosine scoring).
    Scores are ``member · item_vectors`` (item vectors unit length for cosine)."""

    def __init__(self, encoder: nn.Module, normalise: bool = False,
                 head: nn.Module | None = None):
        super().__init__()
        self.encoder, self.normalise = encoder, normalise
        self.head = head if head is not None else nn.Identity()  # a retrieval member tower's

    def forward(self, *inputs: Tensor) -> Tensor:
        """``inputs``: tokens, lengths and, if read, timestamps (``input_names``)."""
        given = dict(zip(self.input_names, inputs))
        tokens = given["tokens"]
        mask = torch.arange(tokens.shape[1], device=tokens.device) < given["lengths"].unsqueeze(1)
        member = self.head(last_states(
            self.encoder.encode_padded(tokens, mask, timestamps=given.get("timestamps")), mask))
        return torch.nn.functional.normalize(member, dim=-1) if self.normalise else member

    @property
    def input_names(self) -> list[str]:
        return ["tokens", "lengths"] + (["timestamps"] if self.encoder.uses_time else [])


def export_run(cfg: DictConfig) -> Path:
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:
        raise FileExistsError(f"{output} exists: choose another output= or add overwrite=true")
    bad = sorted(set(cfg.precisions) - set(PRECISIONS)) or ("fp32" not in cfg.precisions)
    if bad:
        raise ValueError(f"precisions={list(cfg.precisions)}: must include fp32, from "
                         f"{list(PRECISIONS)}")
    env = init_distributed()
    staging = output.with_name(f".{output.name}.staging")
    parity_dir = output.with_name(f".{output.name}.parity")
    try:
        run = load_run(Path(cfg.run_dir), cfg.checkpoint, env)
        merge_adapters(run.model.dense_module)  # a LoRA run serves plain, merged weights
        kind = run.task.export_kind
        if kind is None:
            raise ValueError(f"recipe {run.task.name} exports no bundle of its own (bundles: "
                             f"{', '.join(BundleKind)}); export a run that uses it")
        member = kind == BundleKind.member_model
        if cfg.member_embeddings and not member:
            raise ValueError(f"member_embeddings: a {run.task.export_kind} bundle has no member "
                             f"vectors; export the pretraining run for them")
        if env.is_main:
            for d in (staging, parity_dir):
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
        env.barrier()
        start = time.time()
        tables, scoring = write_tables(run, staging, cfg.precisions,
                                       with_scoring=kind != BundleKind.candidate_scorer)
        if member:
            write_parity_inputs(run, parity_dir, cfg)
            if env.is_main:
                write_content_parity_inputs(run.model.dense_module, run.cfg.data.path,
                                            run.task.manifest, parity_dir)
        elif kind == BundleKind.search:
            write_search_parity_inputs(run, parity_dir, cfg)
        else:
            write_candidate_parity_inputs(run, parity_dir, cfg)
            if env.is_main and (units := write_content_units(run, staging)):
                tables["content_units"] = units
        if cfg.member_embeddings:
            tables["member_vectors"] = write_member_vectors(run, staging, cfg)
        env.barrier()
        failure: Exception | None = None
        if env.is_main:
            try:
                report = _finish(run, cfg, staging, parity_dir, tables, scoring, output)
                log.info(f"export: {output} | parity max|Δ| {report['max_abs_diff']:.1e}, "
                         f"top-10 identical {report['top10_identical']:.1%} | {len(tables)} "
                         f"tables | {time.time() - start:.0f}s")
            except Exception as err:  # raised after the other ranks heard of it
                failure = err
                shutil.rmtree(staging, ignore_errors=True)
            finally:
                shutil.rmtree(parity_dir, ignore_errors=True)
        ok = torch.tensor([int(failure is None)])
        if env.world_size > 1:
            dist.broadcast(ok, src=0)
        if failure is not None:
            raise failure
        if not ok.item():
            raise ExportError("the export failed on rank 0 (see its error); no bundle written")
        return output
    finally:
        if dist.is_initialized():
            dist.barrier()  # no rank tears the group down while another still talks on it
            dist.destroy_process_group()


def write_tables(run: TrainedRun, root: Path, precisions: list[str], with_scoring: bool = True
                 ) -> tuple[dict[str, Any], np.ndarray | None]:
    """Every table, gathered to rank 0 one at a time, plus the catalogue's vectors as event
    inputs; returns the tables and (on rank 0, ``with_scoring``) the catalogue's scoring
    vectors."""
    tables: dict[str, Any] = {}

    def write(name: str, weight: np.ndarray) -> None:
        for precision in precisions:
            save_file(quantise_rows(weight, precision), str(root / table_file(name, precision)))
        tables[name] = {"shape": list(weight.shape), "precisions": list(precisions)}

    (root / "embeddings").mkdir(exist_ok=True)
    for key, value in run.model.sparse.state_dict().items():
        name = key.split(".")[-2]  # "...embeddings.<table>.weight"
        full = torch.empty(value.size()) if run.env.is_main else None
        value.gather(dst=0, out=full)
        if run.env.is_main:
            write(name, full.numpy())
        del full
    dense = run.model.dense_module
    for name, module in dense.named_modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and run.env.is_main:
            write(name.replace(".", "_") or "table", module.weight.detach().numpy())
    catalogue = run.task.catalogue_vectors(run.model, mode="tokens")  # collective
    scoring = (run.task.catalogue_vectors(run.model, mode="items").numpy()  # collective
               if with_scoring else None)
    if run.env.is_main:
        write("item_vectors", catalogue.numpy())
        if run.task.export_kind == BundleKind.search:  # what queries score against
            write("search_vectors", scoring)
        ids = np.load(Path(run.cfg.data.path) / "item_ids.npy", allow_pickle=False)
        save_file({"ids": ids.astype(np.int64)}, str(root / table_file("item_ids")))
    return tables, scoring if run.env.is_main else None


def write_member_vectors(run: TrainedRun, root: Path, cfg: DictConfig) -> dict[str, Any]:
    """Every member of a split: the embedding of their whole history, by sample id."""
    vectors, ids = [], []
    batches = run.batches(cfg.member_embeddings, cfg.batch_size)
    for batch, real in synchronised(batches, run.env.world_size):
        encoded = run.task.member_vectors(run.model, batch)
        if real:
            vectors.append(encoded.numpy().ravel())
            ids.append(batch.sample_ids.numpy())
    dim = run.cfg.model.embedding_dim
    weight = all_concat(vectors, run.env.world_size).astype(np.float32).reshape(-1, dim)
    sample_ids = all_concat(ids, run.env.world_size).astype(np.int64)
    if run.env.is_main:
        order = np.argsort(sample_ids)
        save_file({"weight": weight[order], "sample_ids": sample_ids[order]},
                  str(root / table_file("member_vectors")))
    return {"shape": list(weight.shape), "precisions": ["fp32"], "split": cfg.member_embeddings}


def write_parity_inputs(run: TrainedRun, root: Path, cfg: DictConfig) -> None:
    """Each rank's evaluation histories as a caller holds them (whole, raw catalogue ids,
    every event attribute) and the sharded model's member vectors for them: the gate serves
    the raw histories through the predictor's public API, so any difference between the
    features trained on and the features served fails it."""
    parts: dict[str, list[np.ndarray]] = {}
    ids = raw_ids(run)
    for batch, real in whole_histories(run, cfg):
        history, targets = split_last_event(batch)
        served = keep_last(history, run.cfg.model.max_len)
        vectors = run.task.member_vectors(run.model, served)
        if real:
            _record_history_offsets(run, served, parts)
            for key, value in {**caller_history(run, history, ids), "targets": targets.numpy(),
                               "vectors": vectors.numpy()}.items():
                parts.setdefault(key, []).append(value)
    save_rank(root, run, parts)


def _record_history_offsets(run: TrainedRun, served, parts: dict[str, list]) -> None:
    """The training model's history-bias offsets for these members (the gate adds them to
    the reference scores), as (member within the rank's file, internal item id, offset)."""
    offsets_of = getattr(run.model.dense_module, "history_offsets", None)
    offsets = offsets_of(served) if offsets_of is not None else None
    if offsets is None:
        return
    member, item, value = (t.detach().numpy() for t in offsets)
    before = sum(len(v) for v in parts.get("targets", []))  # members already recorded
    for key, array in (("bias_member", member + before), ("bias_item", item),
                       ("bias_value", value)):
        parts.setdefault(key, []).append(array)


def write_history_bias(dense: nn.Module, root: Path) -> dict[str, Any] | None:
    """The history bias's weights (models/history.py), if the model has one."""
    history = getattr(dense, "history", None)
    if history is None:
        return None
    rel = "embeddings/history_bias.safetensors"
    save_file({"weight": history.weight.detach().numpy()}, str(root / rel))
    return {"file": rel, "meaning": "an item's score gains weight[age] for each of its events in "
                                    "the member's newest max_len (age 0: the newest), in "
                                    "recommend and score"}


def _finish(run: TrainedRun, cfg: DictConfig, staging: Path, parity_dir: Path,
            tables: dict[str, Any], scoring: np.ndarray | None, output: Path) -> dict[str, Any]:
    kind = run.task.export_kind
    if kind == BundleKind.member_model:
        manifest = _member_model_parts(run, cfg, staging, tables, scoring)
    elif kind == BundleKind.search:
        ann = write_ann_index(staging, scoring) if cfg.ann else None
        manifest = _manifest(run, tables, ann, write_search_program(run, staging))
        manifest["query"] = search_query_manifest(run, staging)
    else:
        manifest = _manifest(run, tables, None, write_candidate_program(run, staging))
    _write_manifest(staging, manifest)
    report = run_parity_gate(staging, parity_dir)
    failures = [f"{backend}: max|Δ| {r['max_abs_diff']:.2e} (limit {cfg.max_abs_diff:.0e}), "
                f"top-10 identical {r['top10_identical']:.2%} (need "
                f"{cfg.min_top10_agreement:.0%})"
                for backend, r in report["backends"].items()
                if r["max_abs_diff"] > cfg.max_abs_diff
                or r["top10_identical"] < cfg.min_top10_agreement]
    failures += [f"new items through the {backend} towers: max|Δ| {diff:.2e} (limit "
                 f"{cfg.max_abs_diff:.0e})"
                 for backend, diff in report.get("towers", {}).get("max_abs_diff", {}).items()
                 if diff > cfg.max_abs_diff]
    if failures:
        raise ExportError("parity gate failed, no bundle written: the exported model does "
                          "not compute what was trained — " + "; ".join(failures))
    manifest["parity"] = report
    _write_manifest(staging, manifest)
    if output.exists():
        shutil.rmtree(output)
    os.replace(staging, output)
    worst = max(report["backends"].values(), key=lambda r: r["max_abs_diff"])
    return {"max_abs_diff": worst["max_abs_diff"],
            "top10_identical": min(r["top10_identical"] for r in report["backends"].values())}


def _member_model_parts(run: TrainedRun, cfg: DictConfig, staging: Path,
                        tables: dict[str, Any], scoring: np.ndarray) -> dict[str, Any]:
    """A member model's programs, ANN index, content towers and history bias; its manifest."""
    dense = run.model.dense_module
    io = write_member_program(run, staging)
    ann = write_ann_index(staging, scoring) if cfg.ann else None
    manifest = _manifest(run, tables, ann, io)
    manifest["content"] = write_content(dense, run.cfg.model, staging)
    manifest["history_bias"] = write_history_bias(dense, staging)
    return manifest


def write_member_program(run: TrainedRun, root: Path) -> dict[str, Any]:
    """``model.pt2`` (torch.export, no pickled entries) and ``model.onnx`` (checked) of the
    member encoder; returns the manifest's ``inputs`` and ``outputs``."""
    cosine = run.cfg.recipe.get("similarity", "dot") == "cosine"
    dense = run.model.dense_module
    program = MemberEncoderProgram(dense.encoder, normalise=cosine,
                                   head=getattr(dense, "member_head", None)).eval()
    dim = run.cfg.model.embedding_dim
    inputs = history_inputs(dim, run.cfg.model.max_len, torch.export.Dim("batch", min=1,
                                                                        max=1 << 20))
    return {"inputs": export_inputs(program, inputs, root / "model", "member"),
            "outputs": {"member": {"dtype": "float32", "shape": ["batch", dim],
                                   "meaning": "member embedding; score = member · item_vectors "
                                              "(+ content.match's score, if any)"}}}


def write_ann_index(root: Path, vectors: np.ndarray) -> dict[str, Any]:
    """The HNSW index over the items' scoring ``vectors`` (the model's own: unit length under
    cosine similarity, with the content part under content_match), as evaluation measures it."""
    try:
        import faiss
    except ImportError as err:
        raise ExportError("ann=true needs faiss (pip install faiss-cpu), or export with "
                          "ann=false") from err

    (root / "ann").mkdir(exist_ok=True)
    faiss.write_index(hnsw_index(vectors), str(root / "ann" / "items.faiss"))
    return {"file": "ann/items.faiss", "kind": f"faiss HNSW{HNSW_NEIGHBOURS}, inner product",
            "id_offset": 1, "ef_search": EF_SEARCH}


def run_parity_gate(bundle: Path, parity_dir: Path) -> dict[str, Any]:
    """Serve the bundle in a fresh process (torchrec, fbgemm and deepspeed unimportable) with
    both backends, against the sharded model's vectors; returns its report."""
    cmd = [sys.executable, "-m", "foundation.export.parity", str(bundle), str(parity_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ExportError(f"parity gate process failed (exit {done.returncode}):\n"
                          f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _manifest(run: TrainedRun, tables: dict[str, Any], ann: dict[str, Any] | None,
              io: dict[str, Any]) -> dict[str, Any]:
    import onnx
    import onnxruntime

    model_cfg = run.cfg.model
    encoder = run.model.dense_module.encoder
    data_manifest = run.task.manifest
    eval_path = Path(run.cfg.run_dir) / "eval.json"
    state = checkpoint.read_state(run.checkpoint)
    return {
        "format": BUNDLE_FORMAT,
        "kind": str(run.task.export_kind),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {"run_dir": str(Path(run.cfg.run_dir).resolve()),
                   "checkpoint": run.checkpoint.name, "step": state.get("step"),
                   "recipe": run.task.name, "config_hash": config_hash(run.cfg),
                   "data": data_manifest.get("source", {})},
        "model": {"embedding_dim": model_cfg.embedding_dim, "max_len": model_cfg.max_len,
                  "num_items": run.task.num_items, "item_table": model_cfg.item_table,
                  "token_features": list(encoder.token_features),
                  "item_scale": model_cfg.item_scale,
                  "similarity": str(run.cfg.recipe.get("similarity", "dot"))},
        **io,  # the program's inputs and outputs
        "vocab": data_manifest["vocab"],
        # Every event feature: its vocabulary and how serving obtains it (data/schema.py),
        # and what each item's vector is made of.
        "features": run.task.schema.to_manifest(),
        "item_features": run.task.item_features(),
        "tables": tables,
        "ann": ann,
        "eval": json.loads(eval_path.read_text()) if eval_path.exists() else None,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
                     "foundation": _version()},
    }


def _write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest["files"] = {str(p.relative_to(root)): sha256(p) for p in files}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _version() -> str:
    from importlib.metadata import version

    return version("foundation")


def main(argv: list[str] | None = None) -> int:
    from foundation.compose import ConfigError, compose

    setup_logging()
    try:
        cfg = compose("export", sys.argv[1:] if argv is None else argv)
        export_run(cfg)
    except (ConfigError, checkpoint.CheckpointError, FileNotFoundError, FileExistsError,
            ValueError, ExportError) as err:
        log.error(err)
        return 2
    return 0

