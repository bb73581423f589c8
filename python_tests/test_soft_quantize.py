"""soft_quantize against the pure-PyTorch reference: values, gradients, properties."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import opqn_ext
from opqn_ext import reference
from conftest import make_problem

SHAPES = [  # (B, M, d, K)
    (0, 2, 8, 4), (1, 1, 1, 1), (3, 1, 5, 5), (7, 2, 8, 1), (16, 16, 4, 3), (33, 3, 17, 9),
    (64, 4, 128, 64), (100, 8, 64, 64), (257, 2, 256, 256), (1000, 4, 32, 16), (5, 16, 256, 7),
    (129, 5, 100, 100),
]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


def grads_of(fn, x, a, c, scale, normalize, weights):
    x, a, c = (t.detach().clone().requires_grad_() for t in (x, a, c))
    outs = fn(x, a, c, scale, normalize)
    loss = sum((o * w).sum() for o, w in zip(outs, weights) if w is not None)
    gx, ga, gc = torch.autograd.grad(loss, (x, a, c), allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs], [gx, ga, gc]


def assert_matches_reference(x, a, c, scale, normalize, weights=None, tol=None):
    tol = tol or TOL[x.dtype]
    if weights is None:
        g = torch.Generator().manual_seed(1)
        B, M, K = x.shape[0], a.shape[0], a.shape[2]
        weights = [torch.randn(s, generator=g, dtype=torch.float64).to(x) for s in ((B, M, K), (B, M, a.shape[1]), (B, M))]
    got_out, got_grad = grads_of(opqn_ext.soft_quantize, x, a, c, scale, normalize, weights)
    want_out, want_grad = grads_of(reference.soft_quantize, x, a, c, scale, normalize, weights)
    for name, got, want in zip(("probs", "quantized", "entropy", "grad_x", "grad_assign_weight", "grad_codebook"),
                               got_out + got_grad, want_out + want_grad):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("B,M,d,K", SHAPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_matches_reference_float64(B, M, d, K, normalize, device, cpu_isa):
    x, a, c = make_problem(B, M, d, K, device=device)
    assert_matches_reference(x, a, c, 1.7, normalize)


@pytest.mark.parametrize("B,M,d,K", SHAPES)
@pytest.mark.parametrize("scale", [0.5, 1.0, 20.0])
def test_matches_reference_float32(B, M, d, K, scale, device, cpu_isa):
    x, a, c = make_problem(B, M, d, K, dtype=torch.float32, device=device, seed=2)
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, scale)) if scale > 1 else TOL[torch.float32]
    assert_matches_reference(x, a, c, scale, normalize=scale == 1.0, tol=tol)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(0, 300), M=st.integers(1, 16), d=st.integers(1, 256), data=st.data(),
       normalize=st.booleans(), scale=st.floats(-5.0, 30.0))
def test_matches_reference_random_shapes(B, M, d, data, normalize, scale):
    K = data.draw(st.integers(1, min(d, 256)), label="K")
    x, a, c = make_problem(B, M, d, K, seed=B + M + d + K)
    assert_matches_reference(x, a, c, scale, normalize, tol=dict(rtol=1e-9, atol=1e-10))


def test_three_dimensional_and_non_contiguous_inputs(device):
    x, a, c = make_problem(20, 3, 16, 8, device=device)
    x3 = x.view(20, 3, 16)
    out2 = opqn_ext.soft_quantize(x, a, c, 2.0, True)
    out3 = opqn_ext.soft_quantize(x3, a, c, 2.0, True)
    for u, v in zip(out2, out3):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    # non-contiguous: a transposed x, weights sliced out of larger tensors
    xt = x.t().contiguous().t()
    wide = torch.zeros(3, 16, 20, dtype=a.dtype, device=device)
    wide[:, :, :8] = a
    cwide = torch.zeros(3, 32, 8, dtype=c.dtype, device=device)
    cwide[:, ::2] = c
    assert not xt.is_contiguous() and not wide[:, :, :8].is_contiguous() and not cwide[:, ::2].is_contiguous()
    assert_matches_reference(xt, wide[:, :, :8], cwide[:, ::2], 2.0, True)
    assert_matches_reference(x3.transpose(0, 1).contiguous().transpose(0, 1), a, c, 2.0, False)


@pytest.mark.parametrize("which", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, True, True)])
def test_any_output_gradient_may_be_absent(which, device):
    x, a, c = make_problem(9, 2, 8, 8, device=device)
    g = torch.Generator().manual_seed(5)
    shapes = ((9, 2, 8), (9, 2, 8), (9, 2))
    weights = [torch.randn(s, generator=g, dtype=x.dtype).to(device) if on else None for s, on in zip(shapes, which)]
    assert_matches_reference(x, a, c, 1.3, True, weights=weights)


def test_only_requested_gradients_are_computed(device):
    x, a, c = make_problem(6, 2, 8, 4, device=device)
    a = a.requires_grad_()
    _, q, h = opqn_ext.soft_quantize(x, a, c)
    (q.sum() + h.sum()).backward()
    assert a.grad is not None and a.grad.shape == a.shape
    assert x.grad is None and c.grad is None


def test_gradcheck_float64(device):
    for normalize in (False, True):
        x, a, c = make_problem(5, 2, 6, 4, device=device, seed=int(normalize))
        inputs = tuple(t.clone().requires_grad_() for t in (x, a, c))
        assert torch.autograd.gradcheck(lambda *t: opqn_ext.soft_quantize(*t, 1.5, normalize), inputs)


@pytest.mark.parametrize("normalize", [False, True])
def test_second_derivatives_float64(device, normalize):
    """create_graph=True gives gradients that can be differentiated again (through the reference)."""
    x, a, c = make_problem(4, 2, 6, 4, device=device, seed=int(normalize))
    inputs = tuple(t.clone().requires_grad_() for t in (x, a, c))
    assert torch.autograd.gradgradcheck(lambda *t: opqn_ext.soft_quantize(*t, 1.5, normalize), inputs)


@pytest.mark.parametrize("wanted", [(True, True, False), (False, True, True), (True, False, False)])
def test_create_graph_gradients_equal_the_fused_ones(device, wanted):
    """A gradient penalty: the first gradients are the fused backward's; the outputs without a
    gradient (here probs) and the inputs not asked for are left out as in the fused backward."""
    x, a, c = make_problem(9, 3, 8, 5, device=device, dtype=torch.float32)
    inputs = [t.clone().requires_grad_(w) for t, w in zip((x, a, c), wanted)]
    asked = [t for t in inputs if t.requires_grad]

    def loss():
        _, q, h = opqn_ext.soft_quantize(*inputs, 2.0, True)
        return q.square().sum() + h.sum()

    fused = torch.autograd.grad(loss(), asked)
    graphed = torch.autograd.grad(loss(), asked, create_graph=True)
    for f, g in zip(fused, graphed):
        assert g.requires_grad and g.shape == f.shape
        torch.testing.assert_close(g, f, rtol=1e-4, atol=1e-6)
    penalty = sum(g.square().sum() for g in graphed)
    penalty.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in asked)


def test_opcheck(device):
    x, a, c = make_problem(7, 3, 8, 5, device=device)
    for normalize in (False, True):
        args = (x.clone().requires_grad_(), a.clone().requires_grad_(), c.clone().requires_grad_(), 1.2, normalize)
        torch.library.opcheck(torch.ops.opqn_ext.soft_quantize.default, args)
    p, _, _ = opqn_ext.soft_quantize(x, a, c)
    grads = (torch.randn_like(p), None, torch.randn(7, 3, dtype=x.dtype, device=device))
    torch.library.opcheck(torch.ops.opqn_ext.soft_quantize_backward.default,
                          (*grads, x, a, c, p, 1.0, False, [True, True, True]))


def test_probs_rows_sum_to_one_and_entropy_bounds(device):
    x, a, c = make_problem(50, 4, 32, 16, dtype=torch.float32, device=device)
    p, q, h = opqn_ext.soft_quantize(x, a, c, 3.0, True)
    torch.testing.assert_close(p.sum(-1), torch.ones(50, 4, device=device), rtol=0, atol=1e-6)
    assert (h >= -1e-6).all() and (h <= math.log(16) + 1e-5).all()


def test_entropy_is_log_k_for_uniform_rows(device):
    x, _, c = make_problem(10, 2, 8, 6, device=device)
    p, q, h = opqn_ext.soft_quantize(x, torch.zeros_like(c), c)  # zero weights: uniform rows
    torch.testing.assert_close(p, torch.full_like(p, 1 / 6))
    torch.testing.assert_close(h, torch.full_like(h, math.log(6)))
    torch.testing.assert_close(q, (c.sum(-1) / 6).expand(10, 2, 8))


def test_entropy_is_zero_for_one_hot_rows(device):
    # x equal to a codeword and assign_weight = codebook: a huge scale makes the row one-hot.
    _, _, c = make_problem(1, 2, 8, 8, device=device)
    x = c[:, :, 3].reshape(1, 16).repeat(4, 1)
    for dtype in (torch.float32, torch.float64):
        p, q, h = opqn_ext.soft_quantize(x.to(dtype), c.to(dtype), c.to(dtype), 1e4, False)
        assert torch.equal(p.argmax(-1), torch.full((4, 2), 3, device=device))
        torch.testing.assert_close(h, torch.zeros_like(h), rtol=0, atol=1e-6)
        torch.testing.assert_close(p.amax(-1), torch.ones_like(h), rtol=0, atol=1e-6)
        torch.testing.assert_close(q, x.to(dtype).view(4, 2, 8), rtol=0, atol=1e-6)


def test_ortho_probs_equal_inner_products_with_codewords(device):
    # The ADC identity of DESIGN.md: <quantized_m, c_mk> = p_mk when the codebook is orthonormal.
    x, a, c = make_problem(12, 3, 16, 10, device=device)
    p, q, _ = opqn_ext.soft_quantize(x, a, c, 2.0, True)
    torch.testing.assert_close(torch.einsum("bmd,mdk->bmk", q, c), p)


def test_zero_sub_vectors_with_normalize_stay_finite(device):
    x, a, c = make_problem(4, 2, 8, 4, device=device)
    x[1, :8] = 0
    assert_matches_reference(x, a, c, 1.0, True)
    x = x.clone().requires_grad_()
    p, q, h = opqn_ext.soft_quantize(x, a, c, 1.0, True)
    (q.sum() + h.sum()).backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(p[1, 0], torch.full((4,), 0.25, dtype=x.dtype, device=device))


def test_nan_in_x_stays_in_its_row(device):
    # Documented behaviour: NaN is not checked; it poisons exactly the (sample, book) rows it is in.
    x, a, c = make_problem(4, 3, 8, 4, dtype=torch.float32, device=device)
    x[2, 8 + 3] = float("nan")
    p, q, h = opqn_ext.soft_quantize(x, a, c, 1.0, False)
    bad = torch.zeros(4, 3, dtype=torch.bool, device=device)
    bad[2, 1] = True
    assert torch.isnan(p[bad]).all() and torch.isnan(q[bad]).all() and torch.isnan(h[bad]).all()
    assert torch.isfinite(p[~bad]).all() and torch.isfinite(q[~bad]).all() and torch.isfinite(h[~bad]).all()


@pytest.mark.parametrize("spread", [1e7, 1e20])
def test_logits_far_apart_give_the_references_one_hot_rows(spread, cpu_isa):
    # exp of logit differences far below log(FLT_MIN) is 0, computed without integer overflow in the
    # vector exp's exponent arithmetic (signed overflow, which make sanitize's UBSan reports)
    M, d, K = 2, 8, 4
    a = torch.eye(d, K).expand(M, d, K).contiguous()
    x = torch.zeros(3, M * d)
    x[0, 0], x[1, 1], x[2, d + 2] = spread, -spread, spread
    got = opqn_ext.soft_quantize(x, a, a, 1.0, False)
    want = reference.soft_quantize(x, a, a, 1.0, False)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)
    assert got.probs[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0] and got.probs[1, 0, 1] == 0.0


def test_cpu_isa_paths_agree(cpu_isa):
    x, a, c = make_problem(300, 5, 40, 33, dtype=torch.float32, seed=9)
    got = opqn_ext.soft_quantize(x, a, c, 4.0, True)
    opqn_ext._C.set_cpu_isa("scalar")
    want = opqn_ext.soft_quantize(x, a, c, 4.0, True)
    opqn_ext._C.set_cpu_isa(cpu_isa)
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("M,d,K", [(8, 64, 16), (3, 37, 13)])
def test_a_sample_alone_gets_its_values_in_a_batch(M, d, K, dtype, cpu_isa):
    # a sample alone runs the forward's row loops (up to 2^21 multiply-adds a product,
    # csrc/cpu/row_kernels.h), a batch above that the BLAS products: the same values to rounding, at K
    # a multiple of the vector width or not
    B = (1 << 21) // (M * d * K) + 1
    x, a, c = make_problem(B, M, d, K, dtype=dtype, seed=5)
    batch = opqn_ext.soft_quantize(x, a, c, 3.0, True)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)
    for i in (0, 17, B - 1):
        alone = opqn_ext.soft_quantize(x[i:i + 1], a, c, 3.0, True)
        for name, u, v in zip(("probs", "quantized", "entropy"), alone, batch):
            torch.testing.assert_close(u[0], v[i], **tol, msg=lambda m: f"sample {i} {name}: {m}")


@pytest.mark.parametrize("B,M,d,K", [
    (700, 4, 32, 16),  # the row loops
    (700, 4, 64, 32),  # above them: the BLAS products, one book per thread where there is a book per thread
])
def test_results_do_not_depend_on_thread_count(B, M, d, K):
    x, a, c = make_problem(B, M, d, K, dtype=torch.float32, seed=4)
    before = torch.get_num_threads()
    weights = [None, torch.ones(B, M, d), torch.ones(B, M)]
    try:
        torch.set_num_threads(1)
        one = grads_of(opqn_ext.soft_quantize, x, a, c, 2.0, True, weights)
        torch.set_num_threads(2)
        two = grads_of(opqn_ext.soft_quantize, x, a, c, 2.0, True, weights)
    finally:
        torch.set_num_threads(before)
    for u, v in zip(one[0] + one[1][:2], two[0] + two[1][:2]):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(device, dtype):
    x, a, c = make_problem(64, 4, 64, 32, dtype=torch.float32, device=device)
    xs, as_, cs = x.to(dtype), a.to(dtype), c.to(dtype)
    got = grads_of(opqn_ext.soft_quantize, xs, as_, cs, 2.0, True, [None, torch.ones(64, 4, 64, device=device, dtype=dtype), None])
    want = grads_of(reference.soft_quantize, xs, as_, cs, 2.0, True, [None, torch.ones(64, 4, 64, device=device, dtype=dtype), None])
    for u, v in zip(got[0] + got[1][:2], want[0] + want[1][:2]):
        assert u.dtype == dtype
        torch.testing.assert_close(u.float(), v.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("given", [(True, True, True), (False, True, False), (True, False, True)])
def test_cpu_half_inputs_are_the_float32_results_rounded(dtype, given):
    """On the CPU, float16/bfloat16 inputs run the float32 kernels: forward and backward give the
    float32 results of the same (rounded) inputs, rounded to the input dtype. The backward gets
    probs as the forward returned them, rounded, as on CUDA."""
    x, a, c = (t.to(dtype) for t in make_problem(33, 3, 16, 8, dtype=torch.float32, seed=2))
    outputs = opqn_ext.soft_quantize(x, a, c, 1.5, True)
    for u, v in zip(outputs, opqn_ext.soft_quantize(x.float(), a.float(), c.float(), 1.5, True)):
        assert u.dtype == dtype and torch.equal(u, v.to(dtype))
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(o.shape, generator=g).to(dtype) if w else None for o, w in zip(outputs, given)]
    backward = torch.ops.opqn_ext.soft_quantize_backward
    got = backward(*grads, x, a, c, outputs.probs, 1.5, True, [True, True, True])
    want = backward(*[t.float() if t is not None else None for t in grads], x.float(), a.float(), c.float(),
                    outputs.probs.float(), 1.5, True, [True, True, True])
    for u, v in zip(got, want):
        assert u.dtype == dtype and torch.equal(u, v.to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_on_the_current_stream():
    x, a, c = make_problem(256, 8, 64, 64, dtype=torch.float32, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        p, q, h = opqn_ext.soft_quantize(x, a, c)
    stream.synchronize()
    want = reference.soft_quantize(x, a, c)
    torch.testing.assert_close(q, want[1], rtol=1e-5, atol=1e-5)
