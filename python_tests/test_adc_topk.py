"""adc_topk against the reference and a brute-force numpy scan. Integer-valued tables make every
sum exact, so results must be identical, ties included."""
import numpy as np
import pytest
import torch

import opqn_ext
from opqn_ext import reference
from conftest import results_on_every_path


def problem(nq, M, K, N, seed=0, high=20, code_high=None):
    g = torch.Generator().manual_seed(seed)
    lut = torch.randint(0, high, (nq, M, K), generator=g).float()
    codes = torch.randint(0, code_high or K, (N, M), generator=g, dtype=torch.uint8)
    return lut, codes


def numpy_topk(lut, codes, k):
    lut, codes = lut.cpu().numpy(), codes.cpu().numpy().astype(np.int64)
    padded = np.zeros((lut.shape[0], lut.shape[1], 256), dtype=np.float32)
    padded[:, :, : lut.shape[2]] = lut
    scores = np.zeros((lut.shape[0], codes.shape[0]), dtype=np.float32)
    for m in range(lut.shape[1]):
        scores += padded[:, m, codes[:, m]]
    order = np.lexsort((np.broadcast_to(np.arange(codes.shape[0]), scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), order


def check(lut, codes, k):
    scores, idx = opqn_ext.adc_topk(lut, codes, k)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64 and scores.shape == (lut.shape[0], k)
    want_s, want_i = reference.adc_topk(lut, codes, k)
    assert torch.equal(idx, want_i)
    assert torch.equal(scores, want_s)
    np_s, np_i = numpy_topk(lut, codes, k)
    assert np.array_equal(idx.cpu().numpy(), np_i) and np.array_equal(scores.cpu().numpy(), np_s)
    return scores, idx


CASES = [  # nq, M, K, N, k
    (1, 8, 256, 1000, 10), (1, 1, 2, 1, 1), (3, 3, 5, 10, 10), (2, 32, 16, 999, 1), (17, 4, 64, 4097, 100),
    (100, 8, 256, 20000, 50), (1, 16, 16, 50000, 1000), (5, 2, 2, 300, 300), (1, 7, 64, 40003, 7),
]


@pytest.mark.parametrize("nq,M,K,N,k", CASES)
def test_matches_reference_and_numpy(nq, M, K, N, k, cpu_isa, device):
    lut, codes = problem(nq, M, K, N, seed=N)
    check(lut.to(device), codes.to(device), k)


@pytest.mark.parametrize("M", [1, 2, 5, 8, 13, 16, 31, 32, 128, 129])
@pytest.mark.parametrize("K", [2, 16, 64, 256])
@pytest.mark.parametrize("nq", [3, 40])
def test_every_book_count_and_word_count(nq, M, K, cpu_isa):
    # 40 queries: groups of interleaved tables (32 + 8 on AVX-512, 16 + 16 + 8 on AVX2); M = 128 is
    # the most books whose byte sums fit their int16 lanes, 129 goes to the scalar scanner
    lut, codes = problem(nq, M, K, 2051, seed=M * K)
    check(lut, codes, 25)


def test_ties_are_broken_by_smaller_index(cpu_isa, device):
    lut, codes = problem(4, 4, 16, 5000, high=2)  # few distinct sums: many ties
    scores, idx = check(lut.to(device), codes.to(device), 400)
    for q in range(4):
        s, i = scores[q].cpu(), idx[q].cpu()
        same = s[1:] == s[:-1]
        assert (i[1:][same] > i[:-1][same]).all()


def test_paths_and_thread_counts_give_identical_results():
    lut, codes = problem(9, 8, 64, 300001, seed=5, high=4)
    lut = lut + torch.rand(lut.shape, generator=torch.Generator().manual_seed(1))  # non-integer sums
    # 1 query: the database is split; more: the queries are; the interleaved tables take groups of 16
    # (AVX2) or 32 (AVX-512), on AVX-512 a last group under 8 queries goes to the transposed scan
    lut = torch.cat([lut, torch.rand(36, 8, 64, generator=torch.Generator().manual_seed(2))])
    runs = results_on_every_path(lambda: [opqn_ext.adc_topk(lut[:nq], codes, 64) for nq in (1, 3, 9, 36, 45)])
    for run in runs[1:]:
        for (s, i), (s0, i0) in zip(run, runs[0]):
            assert torch.equal(s, s0) and torch.equal(i, i0)


@pytest.mark.parametrize("threads", [3, 5, 16])
def test_thread_counts_past_this_machine_split_work_the_same(threads):
    # Queries split in groups of the scanner's width (1, 16 or 32), and the database into a part per
    # thread where the groups do not split evenly: thread counts other than this machine's 2 reach
    # the other splits (16: the GPU machine's cores). Results must equal one thread's, both scans.
    g = torch.Generator().manual_seed(11)
    lut = torch.rand(70, 8, 64, generator=g)
    codes = torch.randint(0, 64, (300000, 8), generator=g, dtype=torch.uint8)
    lut4 = torch.rand(70, 16, 16, generator=g)
    packed = opqn_ext.pack_codes4(torch.randint(0, 16, (300000, 16), generator=g, dtype=torch.uint8))
    threads_before, isa_before = torch.get_num_threads(), opqn_ext._C.active_cpu_isa()

    def run():
        return [(opqn_ext.adc_topk(lut[:nq], codes, 20), opqn_ext.adc_topk4(lut4[:nq], packed, 20))
                for nq in (1, 3, 7, 40, 70)]

    try:
        for isa in opqn_ext._C.available_cpu_isas():
            opqn_ext._C.set_cpu_isa(isa)
            torch.set_num_threads(1)
            want = run()
            torch.set_num_threads(threads)
            for got_pair, want_pair in zip(run(), want):
                for (s, i), (s0, i0) in zip(got_pair, want_pair):
                    assert torch.equal(i, i0) and torch.equal(s, s0), (isa, threads)
    finally:
        torch.set_num_threads(threads_before)
        opqn_ext._C.set_cpu_isa(isa_before)


@pytest.mark.parametrize("nq", [1, 9, 40])
def test_codes_at_or_above_k_never_read_outside_the_table(nq, cpu_isa, device):
    # K = 5 but codes take every byte value: entries past K count as 0, nothing reads past the table
    # (9 and 40 queries: the interleaved tables of AVX2 and AVX-512)
    lut, codes = problem(nq, 6, 5, 3000, code_high=256, seed=3)
    check(lut.to(device), codes.to(device), 30)
    assert (codes >= 5).any()


def test_large_query_batch(cpu_isa):
    lut, codes = problem(300, 4, 16, 3000, seed=7)
    check(lut, codes, 5)


def test_k_equal_n_returns_everything_sorted(cpu_isa):
    lut, codes = problem(2, 3, 8, 257, seed=2)
    scores, idx = check(lut, codes, 257)
    assert sorted(idx[0].tolist()) == list(range(257))


@pytest.mark.parametrize("nq,N,k", [(1, 50000, 50000), (1, 50000, 20000), (3, 40000, 5000), (4, 30000, 30000)])
def test_long_result_lists_sort_by_radix_exactly(nq, N, k, cpu_isa):
    # long lists (>= 4096 pairs) are radix-sorted: from scan order (k = N, one part), after
    # reservoir compaction, and merged from database parts (nq = 1); ties everywhere (high=3)
    lut, codes = problem(nq, 8, 16, N, seed=k, high=3)
    check(lut, codes, k)


def test_no_queries():
    lut, codes = problem(0, 4, 16, 10)
    scores, idx = opqn_ext.adc_topk(lut, codes, 3)
    assert scores.shape == (0, 3) and idx.shape == (0, 3)


@pytest.mark.parametrize(
    "lut,codes,k,match",
    [
        (torch.zeros(1, 4, 16), torch.zeros(10, 4, dtype=torch.uint8), 11, "k \\(11\\) must be <= the number of codes N \\(10\\)"),
        (torch.zeros(1, 4, 16), torch.zeros(10, 4, dtype=torch.uint8), 0, "k must be >= 1"),
        (torch.zeros(1, 4, 16), torch.zeros(0, 4, dtype=torch.uint8), 0, "k must be >= 1"),
        (torch.zeros(1, 4, 16), torch.zeros(0, 4, dtype=torch.uint8), 1, "must be <= the number of codes N \\(0\\)"),
        (torch.zeros(1, 4, 16).double(), torch.zeros(10, 4, dtype=torch.uint8), 1, "lut must be float32"),
        (torch.zeros(1, 4, 16), torch.zeros(10, 4, dtype=torch.int32), 1, "codes must be uint8"),
        (torch.zeros(4, 16), torch.zeros(10, 4, dtype=torch.uint8), 1, "lut must have shape \\[nq, M, K\\]"),
        (torch.zeros(1, 4, 16), torch.zeros(10, dtype=torch.uint8), 1, "codes must have shape \\[N, M\\]"),
        (torch.zeros(1, 4, 16), torch.zeros(10, 5, dtype=torch.uint8), 1, "codes must have M=4 columns"),
        (torch.zeros(1, 4, 257), torch.zeros(10, 4, dtype=torch.uint8), 1, "K <= 256"),
        (torch.zeros(1, 257, 2), torch.zeros(10, 257, dtype=torch.uint8), 1, "M <= 256"),
        (torch.full((1, 4, 16), float("nan")), torch.zeros(10, 4, dtype=torch.uint8), 1, "lut must be finite"),
        (torch.full((1, 4, 16), float("inf")), torch.zeros(10, 4, dtype=torch.uint8), 1, "lut must be finite"),
    ],
)
def test_bad_arguments_raise_clear_errors(lut, codes, k, match):
    with pytest.raises(RuntimeError, match=match):
        opqn_ext.adc_topk(lut, codes, k)


@pytest.mark.parametrize("k", [5.5, 5.0, True, "5", torch.tensor(5.0)])
def test_k_that_is_not_an_integer_is_refused_not_truncated(k):
    lut, codes = problem(2, 4, 16, 10)
    with pytest.raises(ValueError, match="k must be an integer, got"):
        opqn_ext.adc_topk(lut, codes, k)


def test_k_takes_numpy_and_tensor_integers():
    lut, codes = problem(2, 4, 16, 10)
    want = opqn_ext.adc_topk(lut, codes, 5)
    for k in (np.int64(5), np.uint8(5), torch.tensor(5)):
        assert all(torch.equal(u, v) for u, v in zip(opqn_ext.adc_topk(lut, codes, k), want))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("position", [0, 201, -1])
def test_one_non_finite_entry_anywhere_is_rejected(value, position, device):
    # one bad entry among 3 x 8 x 16 finite ones, at the start, inside and at the end; also read
    # through a transposed (non-contiguous) view of the same values
    lut = torch.rand(3, 8, 16)
    lut.view(-1)[position] = value
    codes = torch.randint(0, 16, (100, 8), dtype=torch.uint8).to(device)
    for table in (lut, lut.transpose(1, 2).contiguous().transpose(1, 2)):
        table = table.to(device)
        with pytest.raises(RuntimeError, match="lut must be finite"):
            opqn_ext.adc_topk(table, codes, 5)
        with pytest.raises(RuntimeError, match="lut must be finite"):
            opqn_ext.adc_scores(table, codes)
        with pytest.raises(RuntimeError, match="lut must be finite"):
            opqn_ext.adc_topk4(table, opqn_ext.pack_codes4(codes), 5)


def test_long_scan_releases_the_gil():
    import threading
    import time

    lut, codes = problem(64, 8, 256, 1_000_000, seed=1)
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker)
    t.start()
    time.sleep(0.01)
    try:
        # twice the queries until one scan lasts 0.1 s (at most 16384 queries, a 134 MB table): the
        # AVX-512 scanner on many cores does 64 queries over 1M codes in a few milliseconds
        for _ in range(9):
            start = time.perf_counter()
            opqn_ext.adc_topk(lut, codes, 10)
            end = time.perf_counter()
            if end - start > 0.1:
                break
            lut = torch.cat([lut, lut])
    finally:
        stop.set()
        t.join()
    during = [x for x in ticks if start < x < end]
    assert end - start > 0.1 and len(during) >= 10, (end - start, len(during))


def test_concurrent_calls_from_python_threads_each_get_their_own_results():
    # the scans release the GIL, so calls from several threads run at once in native code: any
    # state they shared (buffers, thresholds, tables) would mix their results
    import threading

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (60_000, 8), generator=g, dtype=torch.uint8)
    codes4 = torch.randint(0, 16, (60_000, 16), generator=g, dtype=torch.uint8)
    packed = opqn_ext.pack_codes4(codes4)
    luts = [torch.rand(nq, 8, 256, generator=g) for nq in (1, 3, 40)]
    luts4 = [torch.rand(nq, 16, 16, generator=g) for nq in (1, 3, 40)]
    want = [(opqn_ext.adc_topk(a, codes, 25), opqn_ext.adc_topk4(b, packed, 25)) for a, b in zip(luts, luts4)]
    mismatches = []

    def search(worker):
        for r in range(6):
            i = (worker + r) % len(luts)
            got = opqn_ext.adc_topk(luts[i], codes, 25), opqn_ext.adc_topk4(luts4[i], packed, 25)
            if not all(torch.equal(x, y) for pair in zip(got, want[i]) for x, y in zip(*pair)):
                mismatches.append((worker, r))

    threads = [threading.Thread(target=search, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not mismatches


def test_adc_topk_under_compile():
    lut, codes = problem(3, 4, 16, 100)
    compiled = torch.compile(lambda l, c: opqn_ext.adc_topk(l, c, 7), fullgraph=True)
    got, want = compiled(lut, codes), opqn_ext.adc_topk(lut, codes, 7)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_full_ranking_of_many_queries_goes_in_bounded_batches():
    # k = N: candidate lists of 45 queries exceed one batch's memory bound, so queries go in
    # several batches; results must not notice
    lut, codes = problem(45, 2, 4, 200_000, seed=11, high=3)
    scores, idx = opqn_ext.adc_topk(lut, codes, 200_000)
    want_s, want_i = reference.adc_topk(lut, codes, 200_000)
    assert torch.equal(idx, want_i) and torch.equal(scores, want_s)
