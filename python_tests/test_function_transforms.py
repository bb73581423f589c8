"""The public ops under forward-mode AD and torch.func's transforms (grad, jvp, jacrev, jacfwd,
hessian, vmap), eagerly and under torch.compile: the derivatives of the references, never the zero
tangents or setup_context errors the registered ops alone would give."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import opqn_ext
from conftest import make_problem
from opqn_ext import reference


def quantized_of(sq):
    """x -> soft-quantized sub-vectors, with the op or its reference, at fixed weights."""
    return lambda x, a, c: sq(x, a, c, 1.5, True)[1]


def problem(device, B=5, M=3, d=8, K=4):
    x, a, c = make_problem(B, M, d, K, device=device)
    g = torch.Generator().manual_seed(1)
    tangents = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(device) for t in (x, a, c)]
    return (x, a, c), tangents


@pytest.mark.parametrize("argnum", [0, 1, 2])
def test_jvp_gives_the_references_tangents(device, argnum):
    inputs, tangents = problem(device)

    def along(sq):
        def f(t):
            args = list(inputs)
            args[argnum] = t
            return sq(*args, 1.5, True)
        return jvp(f, (inputs[argnum],), (tangents[argnum],))[1]

    got, want = along(opqn_ext.soft_quantize), along(reference.soft_quantize)
    for g, w, name in zip(got, want, ("probs", "quantized", "entropy")):
        if argnum < 2 or name == "quantized":  # what depends on the input: zeros would fail here
            assert w.abs().max() > 1e-3, name
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=name)


def test_forward_ad_dual_tensors_carry_tangents(device):
    (x, a, c), (tx, ta, _) = problem(device)
    with fwAD.dual_level():
        got = opqn_ext.soft_quantize(fwAD.make_dual(x, tx), fwAD.make_dual(a, ta), c, 1.5, True)
        got = [fwAD.unpack_dual(t).tangent for t in got]
    with fwAD.dual_level():
        want = reference.soft_quantize(fwAD.make_dual(x, tx), fwAD.make_dual(a, ta), c, 1.5, True)
        want = [fwAD.unpack_dual(t).tangent for t in want]
    for g, w in zip(got, want):
        assert g is not None
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobians_in_every_input_equal_the_references(device, transform):
    inputs, _ = problem(device, B=3, M=2, d=6, K=3)
    for argnum in range(3):
        got = transform(quantized_of(opqn_ext.soft_quantize), argnums=argnum)(*inputs)
        want = transform(quantized_of(reference.soft_quantize), argnums=argnum)(*inputs)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_grad_and_hessian_equal_the_references(device):
    (x, a, c), _ = problem(device, B=2, M=2, d=4, K=3)

    def loss(sq):
        return lambda x: (quantized_of(sq)(x, a, c) ** 3).sum() + sq(x, a, c, 1.5, True)[2].sum()

    torch.testing.assert_close(grad(loss(opqn_ext.soft_quantize))(x), grad(loss(reference.soft_quantize))(x))
    torch.testing.assert_close(hessian(loss(opqn_ext.soft_quantize))(x), hessian(loss(reference.soft_quantize))(x))


def test_per_sample_gradients_equal_one_backward_per_sample(device):
    (x, a, c), _ = problem(device, B=6)

    def loss(a, row):
        p, q, h = opqn_ext.soft_quantize(row.unsqueeze(0), a, c, 1.5, True)
        return (q * q.flip(-1)).sum() + h.sum() + p[0, 0, 0]

    got = vmap(grad(loss), in_dims=(None, 0))(a, x)  # [B, M, d, K]
    for b in range(x.shape[0]):
        a_b = a.clone().requires_grad_()
        loss(a_b, x[b]).backward()  # the fused op and its registered backward
        torch.testing.assert_close(got[b], a_b.grad, rtol=1e-10, atol=1e-12)


def test_vmap_over_a_batch_of_inputs_equals_the_op_per_input(device):
    (x, a, c), _ = problem(device, B=12)
    xs = x.view(3, 4, -1)
    got = vmap(lambda t: opqn_ext.soft_quantize(t, a, c, 1.5, True))(xs)
    for i in range(3):
        for g, w in zip(got, opqn_ext.soft_quantize(xs[i], a, c, 1.5, True)):
            torch.testing.assert_close(g[i], w, rtol=1e-12, atol=1e-12)


def test_inside_autocast_the_references_compute_in_float32_as_the_ops_do():
    (x, a, c), (tx, _, _) = problem("cpu")
    x, a, c, tx = (t.to(torch.bfloat16) for t in (x, a, c, tx))
    lut = torch.rand(2, 3, 4, dtype=torch.bfloat16)
    codes = torch.randint(0, 4, (9, 3), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = opqn_ext.soft_quantize(x, a, c, 1.5, True)  # the op: float32 arguments and outputs
        got, _ = jvp(lambda t: opqn_ext.soft_quantize(t, a, c, 1.5, True), (x,), (tx,))
        want_scores = opqn_ext.adc_topk(lut, codes, 4)[0]
        scores_in_transform = jvp(lambda t: opqn_ext.adc_topk(t, codes, 4)[0], (lut,), (lut,))[0]
        got_grad = grad(lambda t: opqn_ext.adc_topk(t, codes, 4)[0].sum())(lut)
        leaf = lut.clone().requires_grad_()
        opqn_ext.adc_topk(leaf, codes, 4)[0].sum().backward()
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert scores_in_transform.dtype == torch.float32 and torch.equal(scores_in_transform, want_scores)
    assert torch.equal(got_grad, leaf.grad)  # bfloat16, through the cast to float32


def test_without_a_transform_the_fused_op_runs(monkeypatch):
    def refuse(*args):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, "soft_quantize", refuse)
    monkeypatch.setattr(reference, "adc_topk", refuse)
    (x, a, c), _ = problem("cpu")
    x.requires_grad_()
    opqn_ext.soft_quantize(x, a, c).quantized.sum().backward()
    with fwAD.dual_level():  # a dual level with no dual tensor among the inputs
        opqn_ext.soft_quantize(x.detach(), a, c)
    opqn_ext.adc_topk(torch.rand(2, 3, 4), torch.zeros(5, 3, dtype=torch.uint8), 2)


def test_bad_arguments_are_named_under_a_transform():
    (x, a, c), _ = problem("cpu")
    with pytest.raises(RuntimeError, match="x must have M\\*d"):
        grad(lambda t: opqn_ext.soft_quantize(t, a, c).quantized.sum())(x[:, 1:])
    with pytest.raises(RuntimeError, match="codebook \\(it must match assign_weight\\)"):
        jvp(lambda t: opqn_ext.soft_quantize(t, a, c[:, :, :2]).quantized, (x,), (x,))
    lut, codes = torch.rand(2, 3, 4), torch.zeros(5, 3, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="k \\(6\\) must be <= the number of codes"):
        grad(lambda t: opqn_ext.adc_topk(t, codes, 6)[0].sum())(lut)
    with pytest.raises(RuntimeError, match="codes must be uint8"):
        grad(lambda t: opqn_ext.adc_scores(t, codes.long()).sum())(lut)
    packed = opqn_ext.pack_codes4(codes)
    with pytest.raises(RuntimeError, match="rerank must be >= 1"):
        grad(lambda t: opqn_ext.adc_topk4(t, packed, 2, rerank=0)[0].sum())(lut)
    with pytest.raises(RuntimeError, match="K <= 16"):
        grad(lambda t: opqn_ext.adc_topk4(t, packed, 2)[0].sum())(torch.rand(2, 3, 17))
    with pytest.raises(RuntimeError, match="lut must have 1 <= K <= 256 words per book"):
        grad(lambda t: opqn_ext.adc_scores(t, codes).sum())(torch.rand(2, 3, 257))  # not cut to 256 words
    with pytest.raises(RuntimeError, match="codes must have M=3 columns to match lut"):
        jvp(lambda t: opqn_ext.adc_topk(t, codes[:, :2], 2)[0], (lut,), (lut,))


@pytest.mark.parametrize("scan", ["adc_topk", "adc_topk4", "adc_scores"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_scan_tables_with_nan_raise_under_a_transform_as_the_op_does(scan, bad):
    g = torch.Generator().manual_seed(4)
    lut, codes = torch.rand(2, 3, 4, generator=g), torch.randint(0, 4, (5, 3), generator=g, dtype=torch.uint8)
    codes[0, 2] = 0  # a code that sums the bad entry
    run = {"adc_topk": lambda t: opqn_ext.adc_topk(t, codes, 2)[0],
           "adc_topk4": lambda t: opqn_ext.adc_topk4(t, opqn_ext.pack_codes4(codes), 2)[0],
           "adc_scores": lambda t: opqn_ext.adc_scores(t, codes)}[scan]
    lut[1, 2, 0] = bad
    for transformed in (lambda: run(lut), lambda: grad(lambda t: run(t).sum())(lut),
                        lambda: jvp(run, (lut,), (torch.ones_like(lut),)), lambda: jacrev(run)(lut)):
        with pytest.raises(RuntimeError, match="lut must be finite"):
            transformed()
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="lut must be finite"):
        run(fwAD.make_dual(lut, torch.ones_like(lut)))
    # under vmap a value cannot raise: the NaN reaches the scores of its own query only (documented)
    scores = vmap(lambda t: run(t[None])[0])(lut)
    assert torch.isfinite(scores[0]).all() and not torch.isfinite(scores[1]).all()


def scan_problem(device, nq=3, N=70, M=5, K=16):
    g = torch.Generator().manual_seed(2)
    lut = torch.rand(nq, M, K, generator=g).to(device)
    codes = torch.randint(0, K + 4, (N, M), generator=g, dtype=torch.uint8).to(device)  # some codes >= K
    return lut, codes, torch.randn(nq, M, K, generator=g).to(device)


@pytest.mark.parametrize("scan", ["adc_topk", "adc_topk4", "adc_scores"])
def test_scan_tangents_and_gradients_follow_the_scored_codes(device, scan):
    lut, codes, tangent = scan_problem(device)
    if scan == "adc_topk4":
        codes = codes % 16
        packed = opqn_ext.pack_codes4(codes)
        run = lambda t: opqn_ext.adc_topk4(t, packed, 7)  # noqa: E731
    elif scan == "adc_topk":
        run = lambda t: opqn_ext.adc_topk(t, codes, 7)  # noqa: E731
    else:
        run = lambda t: (opqn_ext.adc_scores(t, codes), torch.arange(codes.shape[0], device=device).expand(lut.shape[0], -1))  # noqa: E731
    scores, ids = run(lut)
    (scores_t, ids_t), (tangent_scores, _) = jvp(run, (lut,), (tangent,))
    assert torch.equal(ids_t, ids) and torch.equal(scores_t, scores)
    # a score's tangent is the sum of the table tangents its code picks (0 for a code >= K)
    torch.testing.assert_close(tangent_scores, reference.adc_scores(tangent, codes).gather(1, ids))
    weights = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3)).to(device)
    got = grad(lambda t: (run(t)[0] * weights).sum())(lut)
    leaf = lut.clone().requires_grad_()
    (run(leaf)[0] * weights).sum().backward()  # the registered backward of the op
    torch.testing.assert_close(got, leaf.grad)


def test_compiled_transforms_match_eager(device):
    (x, a, c), (tx, _, _) = problem(device)
    f = quantized_of(opqn_ext.soft_quantize)
    loss = lambda t: (f(t, a, c) ** 2).sum()  # noqa: E731
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(grad(loss), fullgraph=True)(x), grad(loss)(x))
    forward = lambda t, u: jvp(lambda s: f(s, a, c), (t,), (u,))[1]  # noqa: E731
    want = jvp(lambda s: quantized_of(reference.soft_quantize)(s, a, c), (x,), (tx,))[1]
    torch.testing.assert_close(torch.compile(forward, fullgraph=True)(x, tx), want)

    def dual_inside(t, u):
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(fwAD.make_dual(t, u), a, c)).tangent

    torch.testing.assert_close(torch.compile(dual_inside, fullgraph=True)(x, tx), want)


def test_compile_without_a_transform_keeps_the_op_in_its_graph():
    (x, a, c), _ = problem("cpu")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(lambda t: opqn_ext.soft_quantize(t, a, c).quantized.sum(), backend=backend, fullgraph=True)(x)
    (gm,) = graphs
    op = torch.ops.opqn_ext.soft_quantize
    assert any(n.target in (op, op.default) for n in gm.graph.nodes)
