"""Exporting one program to both serving formats."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn


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
