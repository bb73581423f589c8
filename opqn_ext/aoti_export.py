"""A trained model as an AOTInductor package for deployment (``opqn export -o model.pt2``): the
graph of :class:`~opqn_ext.onnx_export.RetrievalEncoder` (inputs as training read them -> codes
[B, M] uint8 and query tables [B, M, K] float32, any batch size) compiled ahead of time by
Inductor for the CPU into one file. Python runs it with ``torch._inductor.aoti_load_package``
once opqn_ext is imported (the import registers the ops the package calls); a C++ program with
``torch::inductor::AOTIModelPackageLoader``, linked with the opqn_ext_ops library (CMakeLists.txt),
whose loading registers them."""
from __future__ import annotations

from pathlib import Path

import torch

from .onnx_export import ExportCheck, RetrievalEncoder, example_inputs
from .train import OPQNModel


def export_aoti(model: OPQNModel, input_shape: tuple[int, ...], path: str | Path) -> None:
    """Compiles the model's :class:`RetrievalEncoder` for the CPU and writes the package to ``path``."""
    encoder = RetrievalEncoder(model.eval().cpu())
    with torch.no_grad():
        program = torch.export.export(encoder, (example_inputs(input_shape, 2),),
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))


def check_aoti(model: OPQNModel, input_shape: tuple[int, ...], path: str | Path, rows: int = 7) -> ExportCheck:
    """Runs the package at ``path`` on a batch of random inputs and compares it with the model."""
    inputs = example_inputs(input_shape, rows, seed=1)
    with torch.no_grad():
        codes, tables = torch._inductor.aoti_load_package(str(path))(inputs)
        want_codes, want_tables = RetrievalEncoder(model.eval().cpu())(inputs)
    return ExportCheck(rows, int((codes != want_codes).sum()), float((tables - want_tables).abs().max()))
