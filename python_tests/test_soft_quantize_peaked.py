"""soft_quantize on peaked assignments: batches above the row loops' size whose rows keep few words
(p >= 2^-24 / K in float32, 2^-53 / K in float64) take the CPU's peaked-row products
(csrc/cpu/peaked_products.h), which leave the other words out."""
import pytest
import torch

import opqn_ext
from opqn_ext import reference
from conftest import make_problem
from test_soft_quantize import grads_of

ROW_LOOP_MACS = {torch.float32: 1 << 21, torch.float64: 1 << 15}  # kRowProductsMaxMacs
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}


def kept_share(probs):
    return (probs >= UNIT_ROUNDOFF[probs.dtype] / probs.shape[-1]).double().mean().item()


def assert_takes_peaked_products(x, a, c, scale, normalize):
    """The conditions of use_peaked_products: above the row loops' size, few words kept."""
    B, (M, d, K) = x.shape[0], a.shape
    assert B * M * d * K > ROW_LOOP_MACS[x.dtype]
    with torch.no_grad():
        probs = reference.soft_quantize(x, a, c, scale, normalize)[0]
    assert kept_share(probs) <= (0.25 if d * K <= 128 * 64 else 0.1)


def assert_close_to_float64_reference(x, a, c, scale, normalize, weights, rel):
    """Each output within rel of its largest magnitude of the float64 reference's."""
    got_out, got_grad = grads_of(opqn_ext.soft_quantize, x, a, c, scale, normalize, weights)
    exact = [t.double() for t in (x, a, c)]
    want_out, want_grad = grads_of(reference.soft_quantize, *exact, scale, normalize,
                                   [w.double() if w is not None else None for w in weights])
    names = ("probs", "quantized", "entropy", "grad_x", "grad_assign_weight", "grad_codebook")
    for name, got, want in zip(names, got_out + got_grad, want_out + want_grad):
        size = max(1.0, want.abs().max().item())
        torch.testing.assert_close(got.double(), want, rtol=0, atol=rel * size, msg=lambda m: f"{name}: {m}")


def random_weights(B, M, d, K, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in ((B, M, K), (B, M, d), (B, M))]


@pytest.mark.parametrize("dtype,B,M,d,K,scales", [  # scales: without, with normalize
    (torch.float64, 64, 4, 32, 16, (80.0, 320.0)),
    (torch.float64, 40, 3, 37, 13, (80.0, 320.0)),  # d and K not multiples of the vector width
    (torch.float32, 256, 8, 64, 64, (20.0, 160.0)),
    (torch.float32, 300, 3, 100, 37, (20.0, 160.0)),
    (torch.float32, 64, 2, 256, 256, (20.0, 320.0)),
])
@pytest.mark.parametrize("normalize", [False, True])
def test_peaked_batches_match_the_reference(dtype, B, M, d, K, scales, normalize, cpu_isa):
    x, a, c = make_problem(B, M, d, K, dtype=dtype, seed=7)
    scale = scales[normalize]  # a unit sub-vector's logits are smaller
    assert_takes_peaked_products(x, a, c, scale, normalize)
    rel = 1e-11 if dtype == torch.float64 else 2e-5
    assert_close_to_float64_reference(x, a, c, scale, normalize, random_weights(B, M, d, K, dtype), rel)


@pytest.mark.parametrize("given", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True)])
@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, False), (True, True, True)])
def test_peaked_batches_give_any_requested_gradients(given, wanted):
    B, M, d, K = 64, 4, 32, 16
    x, a, c = make_problem(B, M, d, K, seed=8)
    assert_takes_peaked_products(x, a, c, 80.0, False)
    weights = [w if g else None for w, g in zip(random_weights(B, M, d, K, torch.float64), given)]
    inputs = [t.detach().clone().requires_grad_(w) for t, w in zip((x, a, c), wanted)]
    got = torch.autograd.grad([(o * w).sum() for o, w in zip(opqn_ext.soft_quantize(*inputs, 80.0), weights)
                               if w is not None], [t for t in inputs if t.requires_grad])
    want = torch.autograd.grad([(o * w).sum() for o, w in zip(reference.soft_quantize(*inputs, 80.0), weights)
                                if w is not None], [t for t in inputs if t.requires_grad], allow_unused=True,
                               materialize_grads=True)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-11 * max(1.0, v.abs().max().item()))


def test_a_word_no_row_keeps_gets_exactly_zero_gradient():
    # Word 1's logit is scale * sum(x) / sqrt(d) with x > 0, word 0's its negative: every row keeps
    # word 1 and leaves word 0 out (p ~ e^-200). The peaked products leave word 0 out of every
    # product, so its column of grad_assign_weight is exactly 0; the dense products (the reference,
    # and soft_quantize itself at the row loops' size) give it a tiny nonzero value.
    B, M, d, K = 64, 4, 32, 16
    x, a, c = make_problem(B, M, d, K, seed=9)
    x = x.abs()
    a[:, :, 0], a[:, :, 1] = -d ** -0.5, d ** -0.5
    assert_takes_peaked_products(x, a, c, 20.0, False)

    def word0_grads(fn, x):
        weights = [None, *random_weights(x.shape[0], M, d, K, torch.float64)[1:]]
        grad_a = grads_of(fn, x, a, c, 20.0, False, weights)[1][1]
        return grad_a[:, :, 0]

    assert (word0_grads(opqn_ext.soft_quantize, x) == 0).all()
    assert (word0_grads(reference.soft_quantize, x) != 0).any()
    small = x[:2]  # 2 * 4 * 32 * 16 = 2^12 multiply-adds: the dense products
    assert (word0_grads(opqn_ext.soft_quantize, small) != 0).any()


def test_nan_stays_in_its_row_in_peaked_batches():
    B, M, d, K = 256, 8, 64, 64
    x, a, c = make_problem(B, M, d, K, dtype=torch.float32, seed=10)
    assert_takes_peaked_products(x, a, c, 20.0, False)
    weights = random_weights(B, M, d, K, torch.float32)
    clean_out, clean_grad = grads_of(opqn_ext.soft_quantize, x, a, c, 20.0, False, weights)
    x[5, 70] = float("nan")  # book 1 of sample 5
    out, grad = grads_of(opqn_ext.soft_quantize, x, a, c, 20.0, False, weights)
    others = torch.ones(B, dtype=torch.bool)
    others[5] = False
    for name, u, v in zip(("probs", "quantized", "entropy"), out, clean_out):
        assert u[5, 1].isnan().all(), name
        torch.testing.assert_close(u[others], v[others], rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert grad[0][5, 64:128].isnan().all()
    torch.testing.assert_close(grad[0][others], clean_grad[0][others], rtol=0, atol=0)
    assert grad[1][1].isnan().any() and not grad[1][0].isnan().any()


def test_peaked_results_do_not_depend_on_thread_count():
    B, M, d, K = 256, 8, 64, 64
    x, a, c = make_problem(B, M, d, K, dtype=torch.float32, seed=11)
    assert_takes_peaked_products(x, a, c, 160.0, True)
    weights = random_weights(B, M, d, K, torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grad = grads_of(opqn_ext.soft_quantize, x, a, c, 160.0, True, weights)
            results.append(out + grad)
    finally:
        torch.set_num_threads(before)
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
