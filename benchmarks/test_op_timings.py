"""Per-op timings with pytest-benchmark (`make bench`; never part of `make test`).

Each benchmark checks its result against the reference before it is timed.
"""
import pytest
import torch

import opqn_ext
from opqn_ext import reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(256, 4, 128, 64), (256, 8, 64, 64), (256, 8, 256, 256)]


def _inputs(B, M, d, K, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M * d, generator=g).to(device)
    a = (torch.randn(M, d, K, generator=g) * (2.0 / (d + K)) ** 0.5).to(device)
    c = opqn_ext.orthonormal_codebooks(M, d, K, device=device)
    return x, a, c


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_M{}_d{}_K{}".format(*s))
@pytest.mark.parametrize("fn", [opqn_ext.soft_quantize, reference.soft_quantize], ids=["fused", "eager"])
def test_soft_quantize_forward(benchmark, fn, shape, device):
    x, a, c = _inputs(*shape, device)
    torch.testing.assert_close(fn(x, a, c)[1], reference.soft_quantize(x, a, c)[1], rtol=1e-4, atol=1e-5)

    def run():
        out = fn(x, a, c)
        _sync(device)
        return out

    benchmark(run)


def _forward_backward(fn, x, a, c, scale, grad_q, device):
    x.grad = a.grad = None
    _, q, h = fn(x, a, c, scale)
    torch.autograd.backward([q, h], [grad_q, torch.ones_like(h)])
    _sync(device)
    return x.grad, a.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_M{}_d{}_K{}".format(*s))
@pytest.mark.parametrize("scale", [1.0, 20.0], ids=["dense", "peaked"])  # the assignments' entropy
@pytest.mark.parametrize("fn", [opqn_ext.soft_quantize, reference.soft_quantize], ids=["fused", "eager"])
def test_soft_quantize_forward_backward(benchmark, fn, scale, shape, device):
    x, a, c = _inputs(*shape, device)
    x.requires_grad_()
    a.requires_grad_()
    grad_q = torch.randn(shape[0], shape[1], shape[2], device=device)
    got = [t.clone() for t in _forward_backward(fn, x, a, c, scale, grad_q, device)]
    want = _forward_backward(reference.soft_quantize, x, a, c, scale, grad_q, device)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4 * max(1.0, v.abs().max().item()))
    benchmark(_forward_backward, fn, x, a, c, scale, grad_q, device)
