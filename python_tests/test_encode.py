"""encode: argmax of the similarities, uint8 codes, ties to the smaller word."""
import pytest
import torch

import opqn_ext
from opqn_ext import reference
from conftest import make_problem


@pytest.mark.parametrize("B,M,d,K", [(0, 2, 8, 4), (1, 1, 1, 1), (37, 3, 16, 16), (500, 8, 64, 64),
                                     (5000, 4, 32, 256), (64, 16, 4, 3), (9000, 2, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_encode_is_the_argmax_of_the_reference_logits(B, M, d, K, dtype, device):
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, M * d, generator=g, dtype=dtype).to(device)
    a = torch.randn(M, d, K, generator=g, dtype=dtype).to(device)  # K may exceed d here
    codes = opqn_ext.encode(x, a)
    assert codes.dtype == torch.uint8 and codes.shape == (B, M)
    logits = torch.einsum("bmd,mdk->bmk", x.view(B, M, d).double(), a.double())
    chosen = logits.gather(2, codes.long().unsqueeze(-1)).squeeze(-1)
    # the chosen word attains the maximum (up to rounding of the GEMM)
    torch.testing.assert_close(chosen, logits.amax(-1), rtol=1e-5, atol=1e-5)
    if dtype == torch.float64:
        assert torch.equal(codes.cpu(), reference.encode(x, a).cpu())


def test_encode_breaks_ties_to_the_smaller_word(device):
    # integer weights with duplicated columns: exact ties between words 1 and 3 (and 0 and 2)
    a = torch.tensor([[[1.0, 2.0, 1.0, 2.0], [0.0, 1.0, 0.0, 1.0]]], device=device)  # [1, 2, 4]
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [0.0, 0.0]], device=device)
    assert opqn_ext.encode(x, a).view(-1).tolist() == [1, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sample_alone_gets_its_codes_in_a_batch(dtype, cpu_isa):
    # a sample alone runs the row loops (csrc/cpu/row_kernels.h), a batch of 2000 (above their 2^21
    # multiply-adds) one BLAS product per book; small integers make every similarity exact, with
    # many ties, so the codes must be equal
    g = torch.Generator().manual_seed(3)
    x = torch.randint(-3, 4, (2000, 8 * 13), generator=g).to(dtype)
    a = torch.randint(-2, 3, (8, 13, 11), generator=g).to(dtype)
    batch = opqn_ext.encode(x, a, normalize=False)
    alone = torch.cat([opqn_ext.encode(x[i:i + 1], a, normalize=False) for i in range(2000)])
    assert torch.equal(alone, batch)
    assert torch.equal(batch, reference.encode(x, a, normalize=False))


def test_normalize_does_not_change_codes(device):
    x, a, _ = make_problem(300, 4, 16, 16, dtype=torch.float32, device=device)
    assert torch.equal(opqn_ext.encode(x, a, normalize=True), opqn_ext.encode(x * 7.5, a, normalize=False))


def test_encode_codes_match_soft_quantize_argmax(device):
    x, a, c = make_problem(200, 4, 16, 8, device=device)
    probs = opqn_ext.soft_quantize(x, a, c, 3.0, True).probs
    assert torch.equal(opqn_ext.encode(x, a), probs.argmax(-1).to(torch.uint8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_rejected(bad, device):
    x, a, _ = make_problem(300, 2, 8, 4, dtype=torch.float32, device=device)
    one = torch.zeros_like(x, dtype=torch.bool)
    one[217, 11] = True
    with pytest.raises(RuntimeError, match="x must be finite to encode, and so must assign_weight"):
        opqn_ext.encode(torch.where(one, bad, x), a)
    with pytest.raises(RuntimeError, match="x must be finite to encode, and so must assign_weight"):
        opqn_ext.encode(x, torch.where(torch.arange(4, device=device) == 1, bad, a))
    assert torch.equal(opqn_ext.encode(x, a).cpu(), reference.encode(x.cpu(), a.cpu()))  # the check is per call


def test_encode_errors():
    x, a, _ = make_problem(4, 2, 8, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="codes are uint8, so K must be <= 256"):
        opqn_ext.encode(torch.zeros(2, 300), torch.zeros(1, 300, 257))
    with pytest.raises(RuntimeError, match="x must have M\\*d = 2\\*8 = 16 columns"):
        opqn_ext.encode(x[:, :15], a)
    with pytest.raises(RuntimeError, match="assign_weight must have the dtype of x"):
        opqn_ext.encode(x, a.double())
    with pytest.raises(RuntimeError, match="encode on CPU supports x of dtype float32, float64, float16 or bfloat16, got Float8"):
        opqn_ext.encode(x.to(torch.float8_e4m3fn), a.to(torch.float8_e4m3fn))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_encode_half_inputs_in_float32(device, dtype):
    x, a, _ = make_problem(300, 4, 16, 16, dtype=torch.float32, device=device, seed=4)
    x, a = x.to(dtype), a.to(dtype)
    assert torch.equal(opqn_ext.encode(x, a), reference.encode(x, a))


def test_encode_under_compile():
    x, a, _ = make_problem(32, 4, 8, 8, dtype=torch.float32)
    compiled = torch.compile(lambda x, a: opqn_ext.encode(x, a), fullgraph=True)
    assert torch.equal(compiled(x, a), opqn_ext.encode(x, a))
