"""The public ops skip the Python layer of their registered autograd formulas when no gradient can
flow (no input requires grad, or grad mode is off): the same results as the registered ops, no
graph; with inputs that require grad the formula runs and gradients flow; traced calls keep it."""
import pytest
import torch

import opqn_ext
from conftest import make_problem


@pytest.fixture
def bypasses(monkeypatch):
    """How many op calls went below autograd through the public functions."""
    count = []
    real = opqn_ext.ops._below_autograd
    monkeypatch.setattr(opqn_ext.ops, "_below_autograd", lambda: count.append(1) or real())
    return count


def calls(device):
    """(public call, the same registered op) of each op with a Python autograd formula; the first
    argument is the one that may require grad."""
    x, a, c = make_problem(6, 4, 16, 16, dtype=torch.float32, device=device)
    lut = torch.rand(3, 4, 16, generator=torch.Generator().manual_seed(1)).to(device)
    codes = torch.randint(0, 16, (50, 4), generator=torch.Generator().manual_seed(2), dtype=torch.uint8).to(device)
    packed = opqn_ext.pack_codes4(codes)
    return [
        (x, lambda t: opqn_ext.soft_quantize(t, a, c, 2.0, True), lambda t: torch.ops.opqn_ext.soft_quantize(t, a, c, 2.0, True)),
        (lut, lambda t: opqn_ext.adc_topk(t, codes, 5), lambda t: torch.ops.opqn_ext.adc_topk(t, codes, 5)),
        (lut, lambda t: opqn_ext.adc_scores(t, codes), lambda t: torch.ops.opqn_ext.adc_scores(t, codes)),
        (lut, lambda t: opqn_ext.adc_topk4(t, packed, 5, 3),
         lambda t: torch.ops.opqn_ext.adc_topk4(t, packed.data, 50, 5, 3)),
    ]


def test_calls_that_need_no_gradient_go_below_autograd_with_the_ops_results(device, bypasses):
    for i, (arg, public, registered) in enumerate(calls(device)):
        got = public(arg)
        assert len(bypasses) == i + 1
        for mine, want in zip(got, registered(arg)):
            assert torch.equal(mine, want) and not mine.requires_grad


def test_inputs_that_require_grad_keep_the_formula_unless_grad_mode_is_off(device, bypasses):
    for arg, public, _ in calls(device):
        arg = arg.clone().requires_grad_()
        with torch.no_grad():
            assert not public(arg)[0].requires_grad
        assert len(bypasses) == 1
        bypasses.clear()
        out = public(arg)[0]
        assert not bypasses and out.requires_grad
        (grad,) = torch.autograd.grad(out.sum(), arg)
        assert grad.shape == arg.shape and bool(grad.abs().sum() > 0)


def test_a_compiled_call_keeps_the_op_in_its_graph(bypasses):
    arg, public, registered = calls("cpu")[1]
    compiled = torch.compile(public, fullgraph=True)
    for mine, want in zip(compiled(arg), registered(arg)):
        assert torch.equal(mine, want)
    assert not bypasses
