"""ONNX export of models that end in the ops (torch.onnx.export, both exporters): the graphs hold
standard operators only and, run by ONNX Runtime, give the codes and query tables of the model, and
the scans' scores and top-k (ties in the ops' order)."""
import warnings

import numpy as np
import pytest
import torch

import opqn_ext
from opqn_ext import op_fallbacks
from opqn_ext.nn import EmbeddingMLP, OrthoPQHead
from opqn_ext.onnx_export import dynamo_exporter_works

onnx = pytest.importorskip("onnx")  # the dev extra installs onnx, onnxscript and onnxruntime
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class Encoder(torch.nn.Module):
    """What a deployment runs: an embedding network, then the database codes and query tables."""

    def __init__(self, query_scale=None):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = EmbeddingMLP(24, 64, hidden=48)
        self.head = OrthoPQHead(64, 10, 4, 16, query_scale=query_scale, seed=0)
        self.head.feature_norm.fill_(3.0)  # the running norm that training leaves

    def forward(self, inputs):
        features = self.backbone(inputs)
        return self.head.encode(features), self.head.query_lut(features)


def run_exported(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs.numpy()})


DYNAMO_EXPORTER = pytest.param(True, marks=pytest.mark.skipif(
    not dynamo_exporter_works(),
    reason="before torch 2.9 (where it became the default), torch.onnx's dynamo exporter fails on the "
           "backbone's BatchNorm with current onnxscript (seen on torch 2.6), not on these ops"))


@pytest.mark.parametrize("query_scale", [None, 7.0])
@pytest.mark.parametrize("dynamo", [DYNAMO_EXPORTER, False])
def test_exported_model_gives_the_codes_and_tables_of_the_model(tmp_path, dynamo, query_scale):
    model = Encoder(query_scale).eval()
    path = tmp_path / "encoder.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        if dynamo:
            program = torch.onnx.export(model, (torch.randn(5, 24),), dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("batch")},))
            program.save(str(path))
        else:
            torch.onnx.export(model, (torch.randn(5, 24),), str(path), dynamo=False, input_names=["inputs"],
                              dynamic_axes={"inputs": {0: "batch"}})
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no custom operator left
    operators = {node.op_type for node in graph.node}
    assert "ArgMax" in operators and operators & {"Softmax", "LogSoftmax"}
    inputs = torch.randn(37, 24, generator=torch.Generator().manual_seed(1))  # another batch size
    codes, tables = run_exported(path, inputs)
    want_codes, want_tables = model(inputs)
    assert codes.dtype == np.uint8 and np.array_equal(codes, want_codes.numpy())
    np.testing.assert_allclose(tables, want_tables.numpy(), rtol=1e-5, atol=1e-6)


class Gallery(torch.nn.Module):
    """A search graph: query tables in, the top-k of a gallery of codes held as a buffer out."""

    def __init__(self, scan, codes, k=6):
        super().__init__()
        self.scan, self.k = scan, k
        self.register_buffer("codes", codes)
        self.register_buffer("packed", opqn_ext.pack_codes4(codes).data)

    def forward(self, luts):
        if self.scan == "adc_scores":
            return opqn_ext.adc_scores(luts, self.codes)
        if self.scan == "adc_topk4":
            packed = opqn_ext.PackedCodes4(self.packed, self.codes.shape[0], self.codes.shape[1])
            return opqn_ext.adc_topk4(luts, packed, self.k)
        return opqn_ext.adc_topk(luts, self.codes, self.k)


@pytest.mark.parametrize("scan", ["adc_topk", "adc_topk4", "adc_scores"])
@pytest.mark.parametrize("dynamo", [DYNAMO_EXPORTER, False])
def test_exported_scans_give_the_ops_results_and_tie_order(tmp_path, dynamo, scan):
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (300, 5), generator=g, dtype=torch.uint8)
    codes[:, 4] = 15  # K = 12 tables below: codes >= K add 0
    model = Gallery(scan, codes).eval()
    path = tmp_path / "gallery.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(model, (torch.rand(3, 5, 12),), dynamo=True, verbose=False,
                                        dynamic_shapes=({0: torch.export.Dim("queries")},))
            program.save(str(path))
        else:
            torch.onnx.export(model, (torch.rand(3, 5, 12),), str(path), dynamo=False, input_names=["luts"],
                              dynamic_axes={"luts": {0: "queries"}})
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no custom operator left
    assert scan == "adc_scores" or "TopK" in {node.op_type for node in graph.node}
    # small integers: every score exact and many equal, so the results must be the op's, order included
    luts = torch.randint(0, 4, (7, 5, 12), generator=g).float()
    got = run_exported(path, luts)
    if scan == "adc_scores":
        assert np.array_equal(got[0], opqn_ext.adc_scores(luts, codes).numpy())
        return
    scores, ids = opqn_ext.adc_topk(luts, codes, 6)  # exact ADC, which adc_topk4 exports as
    assert np.array_equal(got[0], scores.numpy()) and np.array_equal(got[1], ids.numpy())
    assert len(set(scores.flatten().tolist())) < scores.numel()  # ties were there to order


def test_export_keeps_the_ops_precision_and_tie_order():
    """encode's export formulation: float32 for float16 inputs, the first of equal similarities."""
    x = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float16)
    a = torch.tensor([[[1.0, 1.0, 0.5], [0.0, 0.0, 0.0]], [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], dtype=torch.float16)
    codes = op_fallbacks.encode_for_export(x, a)
    assert codes.dtype == torch.uint8 and torch.equal(codes, opqn_ext.encode(x, a)) and codes.tolist() == [[0, 1]]


def test_outside_export_the_fused_ops_run(monkeypatch):
    def refuse(*args):
        raise AssertionError("the export formulation ran")

    monkeypatch.setattr(op_fallbacks, "encode_for_export", refuse)
    monkeypatch.setattr(opqn_ext.reference, "soft_quantize", refuse)
    Encoder().eval()(torch.randn(3, 24))  # the scale read from the head's buffer
    torch._dynamo.reset()
    torch.compile(Encoder(7.0).eval(), fullgraph=True)(torch.randn(3, 24))


def test_compiled_tables_with_the_buffer_as_scale_match_eager():
    """The head's default scale is its running feature norm, a buffer: traced, it stays a tensor."""
    model = Encoder().eval()
    inputs = torch.randn(6, 24)
    torch._dynamo.reset()
    for got, want in zip(torch.compile(model, fullgraph=True)(inputs), model(inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opqn_export_writes_a_graph_that_gives_the_codes_of_opqn_encode(tmp_path, capsys):
    """A trained ORL run exported: ONNX Runtime on the data set's uint8 images gives the codes that
    `opqn encode` stores and the tables the model's head computes."""
    from safetensors.torch import load_file

    from opqn_ext.onnx_export import RetrievalEncoder
    from test_cli import export_an_orl_run

    model, data, path, out = export_an_orl_run(tmp_path, capsys, "encoder.onnx")
    assert "checked with ONNX Runtime on 7 random inputs: 56 of 56 codes equal the model's" in out
    images = data.inputs  # uint8 [400, 1, 32, 32], as training read them
    codes, tables = run_exported(path, images)
    stored = load_file(str(tmp_path / "codes.safetensors"))
    assert np.array_equal(codes[stored["items"].numpy()], stored["codes"].numpy())
    with torch.no_grad():
        np.testing.assert_allclose(tables, RetrievalEncoder(model)(images)[1].numpy(), rtol=1e-4, atol=1e-6)


def test_opqn_export_without_onnxscript_says_what_to_install(tmp_path, capsys, monkeypatch):
    import sys

    from opqn_ext.cli import main

    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--width", "4", "--out-dir", str(run), "--no-progress", "--device", "cpu"]) == 0
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # an import of it fails
    assert main(["export", str(run), "-o", str(tmp_path / "e.onnx")]) == 2
    assert ("opqn: error: exporting to ONNX needs the onnxscript package: pip install 'opqn-ext[export]'"
            in capsys.readouterr().err)


def test_opqn_export_of_an_mlp_run_takes_feature_vectors(tmp_path, capsys):
    from opqn_ext.cli import main
    from opqn_ext.onnx_export import RetrievalEncoder
    from opqn_ext.train import load_checkpoint, model_from_checkpoint
    from test_cli import train_on_a_feature_file

    features = train_on_a_feature_file(tmp_path, 10, 8)
    run, path = tmp_path / "run", tmp_path / "mlp.onnx"
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(path)]) == 0
    assert capsys.readouterr().out.startswith("exported features [B, 32] float32 -> codes [B, 8] uint8")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]
    assert [o.name for o in session.get_outputs()] == ["codes", "tables"]
    codes, tables = session.run(None, {"features": features.numpy()})
    model, _ = model_from_checkpoint(load_checkpoint(str(run)))
    with torch.no_grad():
        want_codes, want_tables = RetrievalEncoder(model)(features)
    assert np.array_equal(codes, want_codes.numpy())
    np.testing.assert_allclose(tables, want_tables.numpy(), rtol=1e-4, atol=1e-6)
