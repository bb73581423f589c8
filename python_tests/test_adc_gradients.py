"""Gradients of the ADC scores with respect to the tables (adc_scores, adc_topk, adc_topk4) against
autograd through the reference's gather, and the non-differentiable ops (encode, rank_stats) taking
inputs that require grad. Integer-valued tables and upstream gradients keep every sum exact."""
import pytest
import torch

import opqn_ext
from opqn_ext import reference


def problem(nq, M, K, N, device, code_high=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lut = torch.randint(-8, 8, (nq, M, K), generator=g).float().to(device).requires_grad_()
    codes = torch.randint(0, code_high or K, (N, M), generator=g, dtype=torch.uint8).to(device)
    return lut, codes


def upstream(shape, device, seed=1):
    return torch.randint(-4, 5, shape, generator=torch.Generator().manual_seed(seed)).float().to(device)


def reference_table_grad(lut, codes, k, grad_scores):
    """d(sum(grad_scores * reference top-k scores)) / d lut, and the reference's indices."""
    scores, indices = reference.adc_topk(lut, codes, k)
    (grad,) = torch.autograd.grad(scores, lut, grad_scores)
    return grad, indices


# codes >= K (code_high 256) add 0 to a score, so they must pass no gradient on
@pytest.mark.parametrize("nq,M,K,N,code_high", [(1, 1, 2, 5, None), (3, 4, 16, 300, None), (2, 8, 64, 1000, 256),
                                                (5, 3, 256, 700, None)])
def test_adc_scores_gradient_equals_the_references(device, nq, M, K, N, code_high):
    lut, codes = problem(nq, M, K, N, device, code_high)
    grad_scores = upstream((nq, N), device)
    (grad,) = torch.autograd.grad(opqn_ext.adc_scores(lut, codes), lut, grad_scores)
    (want,) = torch.autograd.grad(reference.adc_scores(lut, codes), lut, grad_scores)
    assert grad.shape == lut.shape and grad.dtype == torch.float32
    assert torch.equal(grad, want)


@pytest.mark.parametrize("nq,M,K,N,k,code_high", [(1, 1, 2, 5, 5, None), (3, 4, 16, 300, 10, None),
                                                  (2, 8, 64, 1000, 100, 256), (4, 2, 8, 40, 1, None)])
def test_adc_topk_gradient_equals_the_references(device, nq, M, K, N, k, code_high):
    lut, codes = problem(nq, M, K, N, device, code_high)
    scores, indices = opqn_ext.adc_topk(lut, codes, k)
    assert scores.requires_grad and not indices.requires_grad
    grad_scores = upstream((nq, k), device)
    (grad,) = torch.autograd.grad(scores, lut, grad_scores)
    want, want_indices = reference_table_grad(lut, codes, k, grad_scores)
    assert torch.equal(indices, want_indices)
    assert torch.equal(grad, want)


# K < 16 leaves code values K..15 outside the table: they add 0 and pass no gradient on
@pytest.mark.parametrize("nq,M,K,N,k", [(1, 1, 16, 33, 5), (3, 5, 12, 100, 9), (2, 16, 16, 2000, 50)])
def test_adc_topk4_gradient_equals_the_references(device, nq, M, K, N, k):
    lut, codes = problem(nq, M, K, N, device, code_high=16)
    packed = opqn_ext.pack_codes4(codes)
    scores, indices = opqn_ext.adc_topk4(lut, packed, k, rerank=N)  # every code re-scored: exact top-k
    grad_scores = upstream((nq, k), device)
    (grad,) = torch.autograd.grad(scores, lut, grad_scores)
    want, want_indices = reference_table_grad(lut, codes, k, grad_scores)
    assert torch.equal(indices, want_indices)
    assert torch.equal(grad, want)


def test_a_loss_over_adc_scores_trains_the_query_tables(device):
    """End to end: tables (softmax of learned logits, like a query's soft assignments) learn,
    through adc_scores, to rank one target code first."""
    M, K, N, target = 4, 16, 200, 123
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8).to(device)
    logits = torch.zeros(1, M, K, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(opqn_ext.adc_scores(logits.softmax(-1), codes) * 10,
                                                 torch.tensor([target], device=device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    assert int(opqn_ext.adc_topk(logits.detach().softmax(-1), codes, 1)[1]) == target


@pytest.mark.parametrize("which", ["x", "assign_weight", "both"])
def test_encode_takes_inputs_that_require_grad(device, which):
    x = torch.randn(40, 4 * 16, device=device, requires_grad=which in ("x", "both"))
    weight = torch.randn(4, 16, 32, device=device, requires_grad=which in ("assign_weight", "both"))
    codes = opqn_ext.encode(x, weight)
    assert not codes.requires_grad
    assert torch.equal(codes, reference.encode(x.detach(), weight.detach()))


def test_rank_stats_outputs_have_no_gradient():
    scores = torch.randn(3, 50, requires_grad=True)
    stats = opqn_ext.rank_stats(scores, torch.tensor([0, 1, 2]), torch.arange(50) % 3, cutoffs=[5])
    want = reference.rank_stats(scores.detach(), torch.tensor([0, 1, 2]), torch.arange(50) % 3, cutoffs=[5])
    assert not any(t.requires_grad for t in stats)
    assert torch.allclose(stats.average_precision, want[0]) and torch.allclose(stats.precision_sums, want[2])
    assert torch.equal(stats.hits, want[1]) and torch.equal(stats.num_relevant, want[3])


def opcheck_cases(device):
    lut, codes = problem(2, 5, 16, 70, device)
    x = torch.randn(9, 5 * 16, device=device, requires_grad=True)
    weight = torch.randn(5, 16, 16, device=device, requires_grad=True)
    ops = torch.ops.opqn_ext
    return {
        "adc_scores": (ops.adc_scores.default, (lut, codes)),
        "adc_topk": (ops.adc_topk.default, (lut, codes, 7)),
        "adc_topk4": (ops.adc_topk4.default, (lut, opqn_ext.pack_codes4(codes).data, 70, 7, 3)),
        "encode": (ops.encode.default, (x, weight, True)),
    }


@pytest.mark.parametrize("name", ["adc_scores", "adc_topk", "adc_topk4", "encode"])
def test_opcheck_with_inputs_that_require_grad(device, name):
    """Schema, fake kernel, autograd registration and AOT dispatch (which traces the backward)."""
    op, args = opcheck_cases(device)[name]
    torch.library.opcheck(op, args)
