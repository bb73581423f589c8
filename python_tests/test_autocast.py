"""The ops inside torch.autocast regions: floating-point inputs are computed in float32 (float64
left as it is), so a backbone's bfloat16/float16 features work with float32 weights; results and
gradients equal those of the same inputs cast to float32 by hand."""
import pytest
import torch

import opqn_ext
from conftest import make_problem

LOW = [torch.bfloat16, torch.float16]


def features_from_a_layer(device, dtype, B=24, M=4, d=16, K=8, seed=0):
    """A Linear layer's output under autocast (low precision), float32 weights and codebook."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(32, M * d).to(device)
    inputs = torch.randn(B, 32, device=device)
    weight = (torch.randn(M, d, K, device=device) * 0.3).requires_grad_()
    codebook = opqn_ext.orthonormal_codebooks(M, d, K, device=device)
    with torch.autocast(device.type, dtype=dtype):
        x = layer(inputs)
    assert x.dtype == dtype
    return layer, inputs, weight, codebook, x


@pytest.mark.parametrize("dtype", LOW)
def test_soft_quantize_runs_in_float32_with_its_gradients(device, dtype):
    layer, inputs, weight, codebook, _ = features_from_a_layer(device, dtype)
    with torch.autocast(device.type, dtype=dtype):
        x = layer(inputs)
        probs, quantized, entropy = opqn_ext.soft_quantize(x, weight, codebook, 2.0, True)
    assert probs.dtype == quantized.dtype == entropy.dtype == torch.float32
    loss = quantized.square().sum() + entropy.sum()
    got = torch.autograd.grad(loss, [layer.weight, weight])

    with torch.autocast(device.type, dtype=dtype):
        x = layer(inputs)
    want_out = opqn_ext.soft_quantize(x.float(), weight, codebook, 2.0, True)
    want = torch.autograd.grad(want_out.quantized.square().sum() + want_out.entropy.sum(), [layer.weight, weight])
    for a, b in zip((probs, quantized, entropy), want_out):
        assert torch.equal(a, b)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype", LOW)
def test_encode_runs_in_float32(device, dtype):
    _, _, weight, _, x = features_from_a_layer(device, dtype)
    with torch.autocast(device.type, dtype=dtype):
        codes = opqn_ext.encode(x, weight)
    assert torch.equal(codes, opqn_ext.encode(x.float(), weight))


@pytest.mark.parametrize("dtype", LOW)
def test_scans_take_low_precision_tables_in_float32(device, dtype):
    g = torch.Generator().manual_seed(0)
    lut = torch.rand(3, 4, 16, generator=g).to(device=device, dtype=dtype)
    codes = torch.randint(0, 16, (500, 4), generator=g, dtype=torch.uint8).to(device)
    packed = opqn_ext.pack_codes4(codes)
    with torch.autocast(device.type, dtype=dtype):
        got = (opqn_ext.adc_topk(lut, codes, 10), opqn_ext.adc_scores(lut, codes), opqn_ext.adc_topk4(lut, packed, 10))
    want = (opqn_ext.adc_topk(lut.float(), codes, 10), opqn_ext.adc_scores(lut.float(), codes),
            opqn_ext.adc_topk4(lut.float(), packed, 10))
    assert torch.equal(got[1], want[1])
    for (s, i), (ws, wi) in (got[0], want[0]), (got[2], want[2]):
        assert torch.equal(s, ws) and torch.equal(i, wi)


@pytest.mark.parametrize("dtype", LOW)
def test_rank_stats_takes_low_precision_scores(dtype):
    scores = torch.randn(4, 60, generator=torch.Generator().manual_seed(0)).to(dtype)
    query_labels, db_labels = torch.arange(4) % 3, torch.arange(60) % 3
    with torch.autocast("cpu", dtype=dtype):
        got = opqn_ext.rank_stats(scores, query_labels, db_labels, [5, 10])
    want = opqn_ext.rank_stats(scores.float(), query_labels, db_labels, [5, 10])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_float64_inputs_stay_float64(device):
    x, a, c = make_problem(8, 2, 8, 4, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        probs, quantized, entropy = opqn_ext.soft_quantize(x, a, c)
    assert probs.dtype == quantized.dtype == entropy.dtype == torch.float64
    assert torch.equal(probs, opqn_ext.soft_quantize(x, a, c).probs)


def test_compiled_model_under_autocast_matches_eager(device):
    dtype = torch.bfloat16
    layer, inputs, weight, codebook, _ = features_from_a_layer(device, dtype)

    def loss_fn(inputs, weight):
        with torch.autocast(device.type, dtype=dtype):
            _, quantized, entropy = opqn_ext.soft_quantize(layer(inputs), weight, codebook, 2.0, True)
            return quantized.square().sum() + entropy.sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    eager, got = loss_fn(inputs, weight), compiled(inputs, weight)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    for e, g in zip(torch.autograd.grad(eager, [layer.weight, weight]), torch.autograd.grad(got, [layer.weight, weight])):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
