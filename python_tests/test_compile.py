"""soft_quantize under torch.compile(fullgraph=True): traced through its fake kernels, trained
through its registered autograd formula."""
import torch

import opqn_ext
from conftest import make_problem


def loss_fn(x, a, c):
    p, q, h = opqn_ext.soft_quantize(x, a, c, 2.0, True)
    return (q * q).sum() + 0.1 * h.sum() + p[:, 0].sum()


def test_compile_fullgraph_matches_eager_forward_and_backward(device):
    x, a, c = make_problem(16, 4, 32, 16, dtype=torch.float32, device=device)
    compiled = torch.compile(loss_fn, fullgraph=True)
    eager_in = [t.clone().requires_grad_() for t in (x, a, c)]
    comp_in = [t.clone().requires_grad_() for t in (x, a, c)]
    eager = loss_fn(*eager_in)
    got = compiled(*comp_in)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    eager.backward()
    got.backward()
    for e, g in zip(eager_in, comp_in):
        torch.testing.assert_close(g.grad, e.grad, rtol=1e-5, atol=1e-5)


class Retrieval(torch.nn.Module):
    """A model that ends in the ops: soft assignments, codes, and a top-k scan and every score of a
    fixed database (also compiled ahead of time in test_cpp_library.py)."""

    OPS = {"opqn_ext.soft_quantize.default", "opqn_ext.adc_topk.default", "opqn_ext.encode.default",
           "opqn_ext.adc_scores.default"}

    def __init__(self, M=4, d=16, K=16, N=300):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = torch.nn.Linear(32, M * d)
        self.assign_weight = torch.nn.Parameter(torch.randn(M, d, K, generator=g))
        self.register_buffer("codebook", opqn_ext.orthonormal_codebooks(M, d, K))
        self.register_buffer("db_codes", torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8))

    def forward(self, inputs):
        x = self.features(inputs)
        probs, quantized, entropy = opqn_ext.soft_quantize(x, self.assign_weight, self.codebook, 2.0, True)
        scores, ids = opqn_ext.adc_topk(probs, self.db_codes, 7)
        return (opqn_ext.encode(x, self.assign_weight), quantized, entropy, scores, ids,
                opqn_ext.adc_scores(probs, self.db_codes))


def test_export_with_a_dynamic_batch_matches_eager():
    model = Retrieval().eval()
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(model, (torch.randn(8, 32),), dynamic_shapes={"inputs": {0: batch}})
    calls = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert Retrieval.OPS <= calls
    inputs = torch.randn(13, 32)
    for got, want in zip(exported.module()(inputs), model(inputs)):
        assert torch.equal(got, want)


def test_the_opqn_head_compiles_whole_and_matches_eager():
    from opqn_ext.nn import OrthoPQHead

    head = OrthoPQHead(64, 5, 4, 8, seed=0)
    compiled = torch.compile(lambda f, y: head(f, y).loss, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    features, labels = torch.randn(8, 64, generator=g), torch.randint(0, 5, (8,), generator=g)
    grads = []
    for fn in (compiled, lambda f, y: head(f, y).loss):
        head.zero_grad(set_to_none=True)
        loss = fn(features, labels)
        loss.backward()
        grads.append((loss.detach(), head.assign_weight.grad.clone(), head.class_weight.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
