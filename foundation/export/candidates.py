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
from foundation.export.programs import export_program
from foundation.export.recorded import caller_history, raw_ids, save_rank, whole_histories
from foundation.models.candidates import CandidateScorerProgram
from foundation.tasks import keep_last


def write_candidate_program(run: TrainedRun, root: Path) -> dict[str, Any]:
    """``model.pt2`` / ``model.onnx`` of the scorer, dynamic in batch, history length and
    candidates per member; returns the manifest's ``inputs`` and ``outputs``."""
    program = CandidateScorerProgram(run.model.dense_module).eval()
    dim, max_len = run.cfg.model.embedding_dim, run.cfg.model.max_len
    longest, wide = min(4, max_len), 3
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    candidates = torch.export.Dim("candidates", min=1, max=1 << 16)
    units = program.scorer.units
    examples = {"tokens": (torch.randn(3, longest, dim), {0: batch, 1: seq}),
                "lengths": (torch.tensor([longest, 2, 1]), {0: batch}),
                "timestamps": (torch.randint(0, 1 << 31, (3, longest)), {0: batch, 1: seq}),
                "candidates": (torch.randn(3, wide, dim), {0: batch, 1: candidates})}
    if units is not None:
        examples["history_units"] = (torch.randn(3, longest, units.shape[1]), {0: batch, 1: seq})
        examples["candidate_units"] = (torch.randn(3, wide, units.shape[1]),
                                       {0: batch, 1: candidates})
    inputs = tuple(examples[name][0] for name in program.input_names)
    shapes = (tuple(examples[name][1] for name in program.input_names),)  # one *inputs
    export_program(program, inputs, shapes, root / "model", output_name="logits")
    return {"inputs": _input_manifest(program.input_names, dim, units),
            "outputs": {"logits": {"dtype": "float32",
                                   "shape": ["batch", "candidates", len(run.task.output_names)],
                                   "columns": list(run.task.output_names),
                                   "meaning": run.task.output_meaning}}}


def _input_manifest(names: list[str], dim: int, units: torch.Tensor | None) -> dict[str, Any]:
    width = None if units is None else units.shape[1]
    described = {
        "tokens": {"dtype": "float32", "shape": ["batch", "seq", dim],
                   "meaning": "per event: item_scale · item_vectors[item] + sum of "
                              "<feature>_table[id] over token_features[1:]"},
        "lengths": {"dtype": "int64", "shape": ["batch"],
                    "meaning": "events per row; rows are left-aligned"},
        "timestamps": {"dtype": "int64", "shape": ["batch", "seq"],
                       "meaning": "each event's unix seconds"},
        "candidates": {"dtype": "float32", "shape": ["batch", "candidates", dim],
                       "meaning": "item_vectors[candidate]; rows padded to the longest "
                                  "candidate list (padded scores are not read)"},
        "history_units": {"dtype": "float32", "shape": ["batch", "seq", width],
                          "meaning": "content_units[item] of each event"},
        "candidate_units": {"dtype": "float32", "shape": ["batch", "candidates", width],
                            "meaning": "content_units[candidate]"},
    }
    return {name: described[name] for name in names}


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
