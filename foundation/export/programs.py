"""Exporting one program to both serving formats."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class ProgramInput:
    """One input of an exported program: an example, its dynamic dimensions, and what the
    manifest says of it."""

    example: Tensor
    dynamic: dict[int, Any]
    described: dict[str, Any]


def history_inputs(dim: int, max_len: int, rows: Any) -> dict[str, ProgramInput]:
    """The member's history as every serving program reads it: event tokens, lengths and,
    for encoders that read time, timestamps; ``rows`` is the batch's ``torch.export.Dim``."""
    longest = min(4, max_len)
    seq = torch.export.Dim("seq", min=1, max=max_len)
    return {
        "tokens": ProgramInput(torch.randn(3, longest, dim), {0: rows, 1: seq}, {
            "dtype": "float32", "shape": [rows.__name__, "seq", dim],
            "meaning": "per event: item_scale · item_vectors[item] + sum of <feature>_table[id] "
                       "over token_features[1:]"}),
        "lengths": ProgramInput(torch.tensor([longest, 2, 1]), {0: rows}, {
            "dtype": "int64", "shape": [rows.__name__],
            "meaning": "events per row; rows are left-aligned"}),
        "timestamps": ProgramInput(torch.randint(0, 1 << 31, (3, longest)), {0: rows, 1: seq}, {
            "dtype": "int64", "shape": [rows.__name__, "seq"],
            "meaning": "each event's unix seconds"}),
    }


def export_inputs(program: nn.Module, inputs: dict[str, ProgramInput], stem: Path,
                  output_name: str) -> dict[str, Any]:
    """Export a program whose ``forward(*inputs)`` reads ``program.input_names``, each from
    ``inputs``; returns the manifest's description of those inputs."""
    names = program.input_names
    export_program(program, tuple(inputs[n].example for n in names),
                   (tuple(inputs[n].dynamic for n in names),), stem, output_name)
    return {name: inputs[name].described for name in names}


def export_program(program: nn.Module, inputs: tuple[Tensor, ...], shapes: tuple[dict, ...],
                   stem: Path, output_name: str) -> None:
    """``STEM.pt2`` (torch.export, no pickled entries) and ``STEM.onnx`` (checked): one
    program, dynamic in the dimensions ``shapes`` names."""
    import onnx

    stem.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        exported = torch.export.export(program, inputs, dynamic_shapes=shapes)
        exported._example_inputs = None  # else saved as a pickle inside the archive
        torch.export.save(exported, f"{stem}.pt2")
        torch.onnx.export(program, inputs, f"{stem}.onnx", input_names=program.input_names,
                          output_names=[output_name], dynamic_shapes=shapes, dynamo=True,
                          verbose=False, external_data=False)
    onnx.checker.check_model(onnx.load(f"{stem}.onnx"), full_check=True)
