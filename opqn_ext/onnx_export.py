"""A trained model as one ONNX graph for deployment (``opqn export``): inputs as training read them
(uint8 images [B, C, H, W], or float32 feature vectors [B, D_in] for the MLP backbone), outputs the
database codes [B, M] uint8 and the query tables [B, M, K] float32 of every row. soft_quantize and
encode are written as standard operators there (opqn_ext/op_fallbacks.py), so ONNX Runtime or
TensorRT runs it without opqn_ext."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .train import OPQNModel


class RetrievalEncoder(nn.Module):
    """``inputs -> (codes [B, M] uint8, tables [B, M, K] float32)`` of a trained OPQN model."""

    def __init__(self, model: OPQNModel):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(inputs).float()
        return self.model.head.encode(features), self.model.head.query_lut(features)


@dataclass
class ExportCheck:
    """How the exported graph, run by ONNX Runtime, compared with the model on one batch."""

    rows: int
    codes_differing: int  # of rows * M codes
    table_error: float  # the largest absolute difference of a table entry


def example_inputs(input_shape: tuple[int, ...], rows: int, seed: int = 0) -> torch.Tensor:
    """A batch of ``rows`` inputs of one item's shape: uint8 images ([C, H, W]) or float features."""
    g = torch.Generator().manual_seed(seed)
    if len(input_shape) == 3:
        return torch.randint(0, 256, (rows, *input_shape), generator=g, dtype=torch.uint8)
    return torch.randn(rows, *input_shape, generator=g)


def dynamo_exporter_works() -> bool:
    """torch.onnx's dynamo exporter is used from torch 2.9 on, where it became the default; before,
    it failed on the backbones' BatchNorm and in-place input scaling (seen on torch 2.6), and the
    TorchScript exporter writes the graph instead."""
    return tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 9)


def export_onnx(model: OPQNModel, input_shape: tuple[int, ...], path: str | Path) -> None:
    """Writes the model's :class:`RetrievalEncoder` to ``path``, for any batch size. Needs the onnx
    and onnxscript packages."""
    for package in ("onnx", "onnxscript"):
        try:
            __import__(package)
        except ImportError:
            raise ImportError(f"exporting to ONNX needs the {package} package: pip install 'opqn-ext[export]'") from None
    encoder = RetrievalEncoder(model.eval().cpu())
    inputs, outputs = ["images" if len(input_shape) == 3 else "features"], ["codes", "tables"]
    example = (example_inputs(input_shape, 2),)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes on their own internals
        if not dynamo_exporter_works():
            torch.onnx.export(encoder, example, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in inputs + outputs})
            return
        program = torch.onnx.export(encoder, example, dynamo=True, verbose=False, input_names=inputs,
                                    output_names=outputs, dynamic_shapes=({0: torch.export.Dim("batch")},))
    if program is None:  # the dynamo exporter returns its program; only the TorchScript one writes files itself
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    program.save(str(path))


def check_onnx(model: OPQNModel, input_shape: tuple[int, ...], path: str | Path, rows: int = 7) -> ExportCheck | None:
    """Runs the graph at ``path`` with ONNX Runtime on a batch of random inputs and compares it with
    the model; None where onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    inputs = example_inputs(input_shape, rows, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    codes, tables = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    with torch.no_grad():
        want_codes, want_tables = RetrievalEncoder(model.eval().cpu())(inputs)
    return ExportCheck(rows, int((torch.from_numpy(codes) != want_codes).sum()),
                       float((torch.from_numpy(tables) - want_tables).abs().max()))
