"""Exporting a candidate scorer (ranking, messaging): its program, the inputs the parity gate
serves, and the manifest's description of both (docs/serving.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from foundation.eval.run import TrainedRun
from foundation.export.bundle import table_file
from foundation.export.programs import ProgramInput, export_inputs, history_inputs
from foundation.export.recorded import caller_history, raw_ids, save_rank, whole_histories
from foundation.models.candidates import CandidateScorerProgram
from foundation.tasks import keep_last


def write_candidate_program(run: TrainedRun, root: Path) -> dict[str, Any]:
    """``model.pt2`` / ``model.onnx`` of the scorer, dynamic in batch, history length and
    candidates per member; returns the manifest's ``inputs`` and ``outputs``."""
    program = CandidateScorerProgram(run.model.dense_module).eval()
    dim = run.cfg.model.embedding_dim
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    wide = torch.export.Dim("candidates", min=1, max=1 << 16)
    inputs = history_inputs(dim, run.cfg.model.max_len, batch)
    inputs["candidates"] = ProgramInput(torch.randn(3, 3, dim), {0: batch, 1: wide}, {
        "dtype": "float32", "shape": ["batch", "candidates", dim],
        "meaning": "item_vectors[candidate]; rows padded to the longest candidate list "
                   "(padded scores are not read)"})
    units = program.scorer.units
    if units is not None:
        width, tokens = units.shape[1], inputs["tokens"]
        inputs["history_units"] = ProgramInput(
            torch.randn(*tokens.example.shape[:2], width), tokens.dynamic,
            {"dtype": "float32", "shape": ["batch", "seq", width],
             "meaning": "content_units[item] of each event"})
        inputs["candidate_units"] = ProgramInput(torch.randn(3, 3, width), {0: batch, 1: wide}, {
            "dtype": "float32", "shape": ["batch", "candidates", width],
            "meaning": "content_units[candidate]"})
    return {"inputs": export_inputs(program, inputs, root / "model", "logits"),
            "outputs": {"logits": {"dtype": "float32",
                                   "shape": ["batch", "candidates", len(run.task.output_names)],
                                   "columns": list(run.task.output_names),
                                   "meaning": run.task.output_meaning}}}


def write_content_units(run: TrainedRun, root: Path) -> dict[str, Any] | None:
    """The frozen unit content vectors the scorer compares candidates with the history by."""
    units = run.model.dense_module.units
    if units is None:
        return None
    save_file({"weight": units.numpy().astype(np.float32)}, str(root / table_file("content_units")))
    return {"shape": list(units.shape), "precisions": ["fp32"]}


def write_candidate_parity_inputs(run: TrainedRun, root: Path, cfg) -> None:
    """Each rank's evaluation members as a caller holds them (whole histories, the
    candidates' raw ids) and the trained scorer's logits for them."""
    parts: dict[str, list[np.ndarray]] = {}
    ids = raw_ids(run)
    for batch, real in whole_histories(run, cfg, run.task.data_mode):
        logits = run.task.raw_logits(run.model, keep_last(batch, run.cfg.model.max_len))
        if real:
            for key, value in {**caller_history(run, batch, ids),
                               "candidates": ids[batch.candidates.numpy()],
                               "candidate_lengths": batch.candidate_lengths.numpy(),
                               "logits": logits.numpy()}.items():
                parts.setdefault(key, []).append(value)
    save_rank(root, run, parts)
