"""pack_codes4 layout and adc_topk4: exact scores for what it returns, identical results on every
path, recall against exact ADC, and equality with adc_topk when every code is re-scored."""
import pytest
import torch

import opqn_ext
from opqn_ext import reference
from conftest import results_on_every_path


def assert_rerank_1_exact(lut, packed, k, want):
    """adc_topk4 with rerank=1 gives exactly `want` (exact ADC) on every path and thread count."""
    for got in results_on_every_path(lambda: opqn_ext.adc_topk4(lut, packed, k, rerank=1)):
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def problem(nq, M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    lut = torch.rand(nq, M, K, generator=g)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    return lut, codes


@pytest.mark.parametrize("N,M", [(0, 3), (1, 1), (31, 2), (32, 16), (70, 5), (1000, 16)])
def test_pack_codes4_layout(N, M, device):
    codes = torch.randint(0, 16, (N, M), dtype=torch.uint8, generator=torch.Generator().manual_seed(N)).to(device)
    packed = opqn_ext.pack_codes4(codes)
    assert packed.num_codes == N and packed.num_books == M
    data = packed.data.cpu()
    assert data.shape == ((N + 31) // 32, (M + 1) // 2, 32) and data.dtype == torch.uint8
    for i in range(N):
        for m in range(M):
            byte = int(data[i // 32, m // 2, (m % 2) * 16 + (i % 32) % 16])
            assert (byte & 15 if i % 32 < 16 else byte >> 4) == int(codes[i, m])
    # padding codes and books are zero
    if N % 32:
        last = data[-1].view(-1, 2, 16)
        j = torch.arange(16)
        low_pad = (j + (N // 32) * 32 >= N)
        assert (last[:, :, low_pad] & 15).eq(0).all()


@pytest.mark.parametrize("nq,M,K,N,k", [(1, 16, 16, 100000, 10), (7, 5, 7, 1001, 50), (2, 1, 16, 33, 33),
                                        (40, 16, 16, 20000, 100), (3, 8, 2, 5000, 1)])
def test_returned_scores_are_exact_and_ordered(nq, M, K, N, k, cpu_isa):
    lut, codes = problem(nq, M, K, N, seed=N)
    scores, idx = opqn_ext.adc_topk4(lut, opqn_ext.pack_codes4(codes), k)
    full = reference.adc_scores(lut, codes)
    assert torch.equal(scores, full.gather(1, idx))
    assert (scores[:, 1:] <= scores[:, :-1]).all()
    assert all(len(set(row.tolist())) == k for row in idx)


def test_recall_at_10_is_at_least_0_99_on_opqn_tables():
    # OPQN tables: soft assignments of queries over 16 orthonormal words per book
    g = torch.Generator().manual_seed(0)
    M, d, K, N, nq = 16, 16, 16, 200000, 50
    codebook = opqn_ext.orthonormal_codebooks(M, d, K)
    x = torch.randn(nq, M * d, generator=g)
    lut = opqn_ext.soft_quantize(x, torch.randn(M, d, K, generator=g) / 4, codebook, 8.0, True).probs
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    exact = opqn_ext.adc_topk(lut, codes, 10)[1]
    found = opqn_ext.adc_topk4(lut, opqn_ext.pack_codes4(codes), 10)[1]
    recall = sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)) / exact.numel()
    assert recall >= 0.99, recall


def test_rescoring_every_code_gives_exact_adc(cpu_isa):
    lut, codes = problem(5, 6, 16, 3000, seed=1)
    lut = torch.floor(lut * 4)  # integer tables: many exact ties
    packed = opqn_ext.pack_codes4(codes)
    for k in (1, 17, 100):
        got = opqn_ext.adc_topk4(lut, packed, k, rerank=3000)
        want = opqn_ext.adc_topk(lut, codes, k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("k", [1, 10, 100, 1024])
def test_rerank_1_is_exact_where_the_8_bit_tables_are_exact(k):
    # Integer tables 0..255 in every book with the full range: the scanner's 8-bit tables are the
    # float ones minus a constant, so the approximate ranking is the exact one and rerank=1 must
    # give exact ADC, ties included. The best codes sit at the start of each part, where the AVX2
    # scanner samples its first threshold: one a single step too high drops codes that belong.
    g = torch.Generator().manual_seed(k)
    M, K, N, nq = 16, 16, 40000, 3
    lut = torch.randint(1, 255, (nq, M, K), generator=g).float()
    lut[:, :, 0], lut[:, :, K - 1] = 0.0, 255.0
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    for start in (0, N // 2):  # the parts of a 2-thread scan start at 0 and N / 2
        codes[start:start + 4096] = torch.randint(K - 4, K, (4096, M), generator=g, dtype=torch.uint8)
    packed = opqn_ext.pack_codes4(codes)
    for queries in (lut[:1], lut):  # one query: two parts on two threads; three: split queries
        want = opqn_ext.adc_topk(queries, codes, k)
        assert_rerank_1_exact(queries, packed, k, want)


@pytest.mark.parametrize("M,entries", [
    (16, lambda v: v * 2.0 ** -140),          # subnormal entries: 255 / range overflows float
    (1, lambda v: (2 * v - 255) * 2.0 ** 120),  # entries near +-FLT_MAX: their range overflows float
], ids=["subnormal", "near_flt_max"])
def test_tables_of_extreme_magnitude_quantize_exactly(M, entries):
    # Integer levels 0..255 (both ends present) scaled by a power of two: the 8-bit tables are the
    # levels themselves, so rerank=1 must give exact ADC. With the range or the scale in float, the
    # tables came out all 255 (subnormal) or all 0 (wide), and the results were the first codes.
    g = torch.Generator().manual_seed(M)
    K, N, nq, k = 16, 5000, 3, 10
    levels = torch.randint(0, 256, (nq, M, K), generator=g).float()
    levels[:, :, 0], levels[:, :, K - 1] = 0.0, 255.0
    lut = entries(levels)
    assert torch.isfinite(lut).all() and lut.abs().max() > 0
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    want = opqn_ext.adc_topk(lut, codes, k)
    assert torch.equal(want[0], reference.adc_scores(lut, codes).topk(k, dim=1).values)  # sums exact here
    assert_rerank_1_exact(lut, opqn_ext.pack_codes4(codes), k, want)


@pytest.mark.parametrize("N", [1000, 5000, 32760, 32800, 70000, 140000])
def test_selection_and_reservoir_give_exact_adc_with_heavy_ties(N):
    # Tables of the levels 0, 85, 170, 255 (0 and 255 in every book): the 8-bit tables are exact, so
    # rerank=1 must give exact ADC, and the sums take few values, so nearly every result is a tie
    # decided by the smaller index. A part is searched by selection over its stored sums where it
    # has under 1024 blocks of 32 codes, or up to 4096 blocks and k >= 8, and by the reservoir scan
    # otherwise: N, k and the thread counts take both, the last block partial or full, k up to half
    # the codes.
    g = torch.Generator().manual_seed(N)
    M, K, nq = 16, 16, 5
    lut = (torch.randint(0, 4, (nq, M, K), generator=g) * 85).float()
    lut[:, :, 0], lut[:, :, K - 1] = 0.0, 255.0
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    packed = opqn_ext.pack_codes4(codes)
    for k in sorted({1, 10, 100, N // 2 + 1}):
        want = opqn_ext.adc_topk(lut, codes, k)
        for queries, expected in ((lut, want), (lut[:1], (want[0][:1], want[1][:1]))):
            assert_rerank_1_exact(queries, packed, k, expected)


@pytest.mark.parametrize("k", [10, 100])
def test_selection_recovers_from_a_sample_that_overstates_the_best(k):
    # Selection takes a floor from every 8th block of a part: the sum that 2k/n of that sample reach.
    # Here the only high codes (20 at the start of blocks 0, 8, 128 and 136: sampled blocks of both
    # the whole and the 2-thread halves) fill the sample's top, so for k = 100 fewer than k codes
    # reach the floor and the search must fall back to every sum; for k = 10 the floor holds.
    g = torch.Generator().manual_seed(k)
    M, K, N = 16, 16, 8192
    lut = torch.randint(1, 255, (1, M, K), generator=g).float()
    lut[:, :, 0], lut[:, :, K - 1] = 0.0, 255.0
    codes = torch.randint(0, K // 2, (N, M), generator=g, dtype=torch.uint8)
    for block in (0, 8, 128, 136):
        codes[block * 32:block * 32 + 20] = K - 1
    packed = opqn_ext.pack_codes4(codes)
    want = opqn_ext.adc_topk(lut, codes, k)
    assert_rerank_1_exact(lut, packed, k, want)


@pytest.mark.parametrize("M", [255, 256])
def test_largest_sums_at_the_most_books(M):
    # 256 books: tables quantized to 0..127 a book, so sums reach 256 * 127 = 32512 of int16's 32767.
    # Integer tables 0..127 with both ends in every book are quantized exactly, so rerank=1 must
    # give exact ADC; a quarter of the codes take the highest word everywhere (tied maximal sums).
    g = torch.Generator().manual_seed(M)
    K, N = 16, 3000
    lut = torch.randint(0, 128, (2, M, K), generator=g).float()
    lut[:, :, 0], lut[:, :, K - 2] = 0.0, 127.0
    lut[:, :, K - 1] = 127.0
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    codes[::4] = K - 1
    packed = opqn_ext.pack_codes4(codes)
    for k in (1, 100, 1000):
        want = opqn_ext.adc_topk(lut, codes, k)
        assert_rerank_1_exact(lut, packed, k, want)


@pytest.mark.parametrize("M,N", [(16, 600000), (3, 40000), (5, 40000), (8, 40000), (13, 40000), (32, 40000)])
def test_paths_and_thread_counts_agree(M, N):
    # M: every unrolled pair count and the generic loop, odd pair counts (a last pair alone in the
    # AVX-512 scanner); nq: one query, and groups of 4, 2 and 1 queries per pass; N: parts long
    # enough to start from a sampled threshold
    lut, codes = problem(7, M, 16, N, seed=M)
    packed = opqn_ext.pack_codes4(codes)
    runs = results_on_every_path(lambda: [opqn_ext.adc_topk4(lut[:nq], packed, 20) for nq in (1, 3, 7)])
    for run in runs[1:]:
        for (s, i), (s0, i0) in zip(run, runs[0]):
            assert torch.equal(s, s0) and torch.equal(i, i0)


def test_errors():
    lut, codes = problem(1, 4, 16, 100)
    packed = opqn_ext.pack_codes4(codes)
    with pytest.raises(RuntimeError, match="codes must all be < 16"):
        opqn_ext.pack_codes4(torch.full((3, 2), 16, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="codes must be uint8"):
        opqn_ext.pack_codes4(codes.int())
    with pytest.raises(RuntimeError, match="1 <= K <= 16"):
        opqn_ext.adc_topk4(torch.rand(1, 4, 17), packed, 5)
    with pytest.raises(RuntimeError, match="k \\(101\\) must be <= the number of codes N \\(100\\)"):
        opqn_ext.adc_topk4(lut, packed, 101)
    with pytest.raises(RuntimeError, match="rerank must be >= 1"):
        opqn_ext.adc_topk4(lut, packed, 5, rerank=0)
    with pytest.raises(RuntimeError, match="lut must be finite"):
        opqn_ext.adc_topk4(torch.full((1, 4, 16), float("nan")), packed, 5)
    with pytest.raises(ValueError, match="packed codes have 4 books but lut has M=6"):
        opqn_ext.adc_topk4(torch.rand(1, 6, 16), packed, 5)
    with pytest.raises(RuntimeError, match="lut must have shape \\[nq, M, K\\]"):
        opqn_ext.adc_topk4(torch.rand(16), packed, 5)
    with pytest.raises(ValueError, match="rerank must be an integer, got 1.5"):
        opqn_ext.adc_topk4(lut, packed, 5, rerank=1.5)
    with pytest.raises(ValueError, match="k must be an integer, got 2.5"):
        opqn_ext.adc_topk4(lut, packed, 2.5)
    with pytest.raises(RuntimeError, match="num_codes \\(200\\) does not match packed"):
        torch.ops.opqn_ext.adc_topk4(lut, packed.data, 200, 5, 2)
