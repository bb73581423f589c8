"""Every path of the CUDA adc_topk against the CPU op (itself checked against the reference and
numpy in test_adc_topk.py): block select (k <= 1024) and dense keys (k > 1024), tables in shared
memory (M <= 48, opt-in size above 47 books) and in global memory, codes read as words or bytes,
one chunk and several. Both add table entries in book order, so results are identical."""
import pytest
import torch

import opqn_ext
from test_adc_topk import problem
from test_index import features, make_index

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def same_as_cpu(lut, codes, k):
    got_s, got_i = opqn_ext.adc_topk(lut.cuda(), codes.cuda(), k)
    want_s, want_i = opqn_ext.adc_topk(lut, codes, k)
    assert torch.equal(got_i.cpu(), want_i)
    assert torch.equal(got_s.cpu(), want_s)
    return got_s, got_i


@pytest.mark.parametrize("nq,M,K,N,k", [
    (1, 8, 256, 4096 * 3 + 1, 10),   # select: blocks of 4096 codes, a last block of one
    (3, 47, 64, 9000, 1024),         # 47 books: shared table over 47 KiB plus the select state
    (2, 48, 16, 5000, 777),          # 48 books, word reads
    (2, 50, 256, 7000, 100),         # global table, byte reads
    (2, 64, 256, 7000, 1),           # global table, word reads
    (5, 3, 8, 100, 100),             # fewer codes than a block: empty slots
    (1, 16, 16, 2_000_000, 100),     # many blocks for one query
])
def test_select_path_equals_cpu(nq, M, K, N, k):
    lut, codes = problem(nq, M, K, N, seed=M + N)
    lut = lut + torch.rand(lut.shape, generator=torch.Generator().manual_seed(N))  # non-integer sums
    same_as_cpu(lut, codes, k)


@pytest.mark.parametrize("nq,N,k", [(2, 5000, 1025), (3, 3000, 3000), (4096, 10_000, 2000)])
def test_dense_path_equals_cpu(nq, N, k):
    # k > 1024: all keys of a chunk, then at::topk; 4096 queries: chunks of 4096 codes (16M keys)
    lut, codes = problem(nq, 4, 16, N, seed=k, high=3)
    same_as_cpu(lut, codes, k)


def test_several_select_chunks_keep_ties_by_index():
    # 2048 queries x k = 1024: 8 blocks (32768 codes) per chunk, so two chunks; few distinct sums
    lut, codes = problem(2048, 4, 16, 40_000, seed=4, high=2)
    scores, idx = same_as_cpu(lut, codes, 1024)
    same = scores[:, 1:] == scores[:, :-1]
    assert (idx[:, 1:][same] > idx[:, :-1][same]).all()


def test_all_scores_equal_rank_by_index_across_blocks():
    lut = torch.ones(2, 8, 256)
    codes = torch.randint(0, 256, (50_000, 8), dtype=torch.uint8)
    for k in (1, 100, 1024, 5000):
        scores, idx = same_as_cpu(lut, codes, k)
        assert torch.equal(idx.cpu(), torch.arange(k).expand(2, k))


def test_negative_and_zero_scores():
    g = torch.Generator().manual_seed(2)
    lut = torch.randn(4, 8, 16, generator=g)
    lut[:, :, :4] = 0.0
    lut[:, :, 4:6] = -0.0
    codes = torch.randint(0, 16, (20_000, 8), generator=g, dtype=torch.uint8)
    same_as_cpu(lut, codes, 300)


def test_unaligned_codes_are_read_as_bytes():
    # a contiguous view whose data starts at an odd address: M = 8 would otherwise take word reads
    lut, codes = problem(3, 8, 256, 6000, seed=9)
    storage = torch.zeros(6000 * 8 + 1, dtype=torch.uint8, device="cuda")
    storage[1:] = codes.cuda().flatten()
    view = storage[1:].view(6000, 8)
    assert view.data_ptr() % 4 != 0
    got_s, got_i = opqn_ext.adc_topk(lut.cuda(), view, 50)
    want_s, want_i = opqn_ext.adc_topk(lut, codes, 50)
    assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_s.cpu(), want_s)
    assert torch.equal(opqn_ext.adc_scores(lut.cuda(), view).cpu(), opqn_ext.adc_scores(lut, codes))


@pytest.mark.parametrize("nq,M,N,k", [
    (3, 8, 10_000, 10), (2, 1, 33, 33), (4, 7, 4097, 1024), (2, 33, 5000, 100), (1, 255, 3000, 7), (2, 16, 6000, 2000),
])
def test_adc_topk4_is_the_exact_scan(nq, M, N, k):
    # 4-bit codes on CUDA are scored exactly: the result is adc_topk's on the unpacked codes (with
    # 16 entries per book in shared memory, up to 255 books; k > 1024: the dense path)
    lut, codes = problem(nq, M, 16, N, seed=N + M)
    lut = lut + torch.rand(lut.shape, generator=torch.Generator().manual_seed(M))
    packed = opqn_ext.pack_codes4(codes.cuda())
    got_s, got_i = opqn_ext.adc_topk4(lut.cuda(), packed, k, rerank=1)
    want_s, want_i = opqn_ext.adc_topk(lut, codes, k)
    assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_s.cpu(), want_s)


def test_more_queries_than_a_grid_holds():
    # 65535 queries per launch (the grid's y limit): 70000 go in two groups, for both scans
    lut, codes = problem(70_000, 4, 16, 300, seed=7, high=5)
    same_as_cpu(lut, codes, 5)
    got_s, got_i = opqn_ext.adc_topk4(lut.cuda(), opqn_ext.pack_codes4(codes.cuda()), 5)
    want_s, want_i = opqn_ext.adc_topk(lut, codes, 5)
    assert torch.equal(got_i.cpu(), want_i) and torch.equal(got_s.cpu(), want_s)


def test_adc_topk4_rejects_packed_codes_on_another_device():
    lut, codes = problem(1, 4, 16, 100)
    with pytest.raises(RuntimeError, match="packed"):
        opqn_ext.adc_topk4(lut.cuda(), opqn_ext.pack_codes4(codes), 5)


def test_index_fast_scan_on_cuda_equals_exact_search():
    index, _ = make_index()
    index.to("cuda")
    index.add(features(5000, 1), ids=torch.arange(5000) * 3)
    queries = features(7, 2)
    fast_s, fast_i = index.search(queries, 50, fast_scan=True)
    exact_s, exact_i = index.search(queries, 50)
    assert torch.equal(fast_i, exact_i) and torch.equal(fast_s, exact_s)
