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
