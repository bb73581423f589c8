"""opqn_ext's CUDA kernels run on the host by the tests' CUDA emulator (python_tests/cuda_emulation):
the kernels' own source, launched with the grids, shared memory and variants the host code uses, one
block at a time with every thread a fiber; and the CUDA adc top-k's host code (adc_scan_topk.h:
chunks, candidates, merge) over those emulated kernels. Checked against opqn_ext.reference, the CPU
ops and numpy, on every machine, GPU or not; test_adc_cuda.py and the CUDA cases elsewhere check the
real thing on a GPU."""
import ctypes

import numpy as np
import pytest
import torch

import opqn_ext
from opqn_ext import reference

DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TOLERANCE = {torch.float32: 2e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BLOCK_CODES = 4096  # codes per select block (kBlockCodes)
i64 = ctypes.c_int64


@pytest.fixture(autouse=True, params=["ascending", "descending", "shuffled"])
def thread_order(request, cuda_emulator):
    """Every test under each order of the threads between synchronization points: a kernel with a
    data race between them gives order-dependent results (cuda_emulator.h)."""
    cuda_emulator.emu_set_schedule(request.param_index)
    yield request.param
    cuda_emulator.emu_set_schedule(0)


def pointer(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def check(lib, rc):
    if rc != 0:
        raise RuntimeError(lib.emu_last_error().decode())


def emulated_forward(lib, x, A, C, scale, normalize):
    B, M, d = x.shape
    K = A.shape[2]
    probs, quantized, entropy = x.new_empty(B, M, K), x.new_empty(B, M, d), x.new_empty(B, M)
    check(lib, lib.emu_soft_quantize_forward(DTYPES[x.dtype], pointer(x), pointer(A), pointer(C), pointer(probs),
                                             pointer(quantized), pointer(entropy), i64(B), i64(M), i64(d), i64(K),
                                             ctypes.c_double(scale), int(normalize)))
    return probs, quantized, entropy


def emulated_backward(lib, gp, gq, gh, x, A, C, probs, scale, normalize, need_x=True):
    B, M, d = x.shape
    K = A.shape[2]
    g = torch.empty(B, M, K, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    grad_x = x.new_empty(B, M, d) if need_x else None
    check(lib, lib.emu_soft_quantize_backward(DTYPES[x.dtype], pointer(gp), pointer(gq), pointer(gh), pointer(x),
                                              pointer(A), pointer(C), pointer(probs), pointer(g), pointer(grad_x),
                                              i64(B), i64(M), i64(d), i64(K), ctypes.c_double(scale),
                                              int(normalize)))
    return g, grad_x


def inputs(B, M, d, K, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M, d, generator=gen, dtype=torch.float64)
    A = torch.randn(M, d, K, generator=gen, dtype=torch.float64) / d ** 0.5
    C = opqn_ext.orthonormal_codebooks(M, d, K, dtype=torch.float64)
    return x.to(dtype), A.to(dtype), C.to(dtype)


# (B, M, d, K): tile products with 1, 2, 4 and 8 thread groups per sum, widths that are not whole
# vectors, and a partial last tile of samples
SHAPES = [(1, 1, 1, 1), (9, 2, 64, 64), (5, 3, 33, 17), (8, 1, 256, 256), (3, 2, 256, 7), (10, 2, 130, 129),
          (7, 1, 128, 100)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B,M,d,K", SHAPES)
@pytest.mark.parametrize("normalize,scale", [(False, 1.0), (True, 20.0)])
def test_soft_quantize_forward(cuda_emulator, dtype, B, M, d, K, normalize, scale):
    x, A, C = inputs(B, M, d, K, dtype, seed=B * 1000 + d)
    if normalize and B > 1:
        x[1] = 0  # norm below eps: the clamp
    got = emulated_forward(cuda_emulator, x, A, C, scale, normalize)
    expected = reference.soft_quantize(x.double(), A.double(), C.double(), scale=scale, normalize=normalize)
    tol = TOLERANCE[dtype]
    for name, g, e in zip(("probs", "quantized", "entropy"), got, expected):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()), msg=name)


def reference_grads(x, A, C, gp, gq, gh, scale, normalize):
    x, A = x.double().requires_grad_(), A.double().requires_grad_()
    probs, quantized, entropy = reference.soft_quantize(x, A, C.double(), scale=scale, normalize=normalize)
    loss = sum((out * grad.double()).sum() for out, grad in ((probs, gp), (quantized, gq), (entropy, gh))
               if grad is not None)
    grad_x, grad_a = torch.autograd.grad(loss, (x, A))
    return probs.detach(), grad_x, grad_a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("B,M,d,K", [(9, 2, 64, 64), (5, 3, 33, 17), (4, 1, 256, 256), (10, 2, 130, 129), (7, 1, 128, 100)])
@pytest.mark.parametrize("given", ["pqh", "p", "q", "h", "qh"])
@pytest.mark.parametrize("normalize", [False, True])
def test_soft_quantize_backward(cuda_emulator, dtype, B, M, d, K, given, normalize):
    x, A, C = inputs(B, M, d, K, dtype, seed=7 * B + K)
    gen = torch.Generator().manual_seed(K)
    gp = torch.randn(B, M, K, generator=gen).to(dtype) if "p" in given else None
    gq = torch.randn(B, M, d, generator=gen).to(dtype) if "q" in given else None
    gh = torch.randn(B, M, generator=gen).to(dtype) if "h" in given else None
    scale = 3.0
    probs, grad_x, grad_a = reference_grads(x, A, C, gp, gq, gh, scale, normalize)
    g, got_x = emulated_backward(cuda_emulator, gp, gq, gh, x, A, C, probs.to(dtype), scale, normalize)
    # grad_assign_weight is sum_b x^T g, one GEMM on the host (soft_quantize_common.cpp)
    got_a = torch.einsum("bmd,bmk->mdk", x.double(), g.double())
    tol = TOLERANCE[dtype] * 4
    torch.testing.assert_close(got_x.double(), grad_x, rtol=tol, atol=tol * max(1.0, grad_x.abs().max().item()))
    torch.testing.assert_close(got_a, grad_a, rtol=tol, atol=tol * max(1.0, grad_a.abs().max().item()))


def test_soft_quantize_backward_without_grad_x(cuda_emulator):
    x, A, C = inputs(6, 2, 16, 8, torch.float32, seed=3)
    gq = torch.randn(6, 2, 16)
    probs, _, grad_a = reference_grads(x, A, C, None, gq, None, 1.0, True)
    g, grad_x = emulated_backward(cuda_emulator, None, gq, None, x, A, C, probs.float(), 1.0, True, need_x=False)
    assert grad_x is None
    torch.testing.assert_close(torch.einsum("bmd,bmk->mdk", x.double(), g.double()), grad_a, rtol=1e-4, atol=1e-5)


def emulated_encode(lib, x, A, expect_finite=True):
    B, M, d = x.shape
    codes = torch.empty(B, M, dtype=torch.uint8)
    nonfinite = torch.zeros(1, dtype=torch.int32)
    check(lib, lib.emu_encode(DTYPES[x.dtype], pointer(x), pointer(A), pointer(codes), pointer(nonfinite), i64(B),
                              i64(M), i64(d), i64(A.shape[2])))
    assert bool(nonfinite.item() == 0) == expect_finite, "the kernel's verdict on the similarities' finiteness"
    return codes


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B,M,d,K", [(1, 1, 1, 1), (11, 3, 20, 16), (9, 2, 1024, 256), (4, 1, 300, 255), (10, 2, 130, 100)])
def test_encode_is_the_argmax(cuda_emulator, dtype, B, M, d, K):
    x, A, _ = inputs(B, M, d, min(K, d), dtype, seed=d + K)
    if A.shape[2] < K:
        A = torch.randn(M, d, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    codes = emulated_encode(cuda_emulator, x, A)
    logits = torch.einsum("bmd,mdk->bmk", x.float().double(), A.float().double())
    assert torch.equal(codes.long(), logits.argmax(-1)), "codes differ from the argmax"


def test_encode_ties_go_to_the_smaller_word(cuda_emulator):
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(2, 8, 6, generator=gen)
    A[:, :, 4] = A[:, :, 1]  # word 4 repeats word 1
    A[:, :, 5] = A[:, :, 4]
    x = torch.zeros(9, 2, 8)
    x[:, :, :] = A[:, :, 1].unsqueeze(0) * 5  # word 1 (and its copies) win
    codes = emulated_encode(cuda_emulator, x, A)
    assert torch.equal(codes.long(), torch.full((9, 2), 1))


@pytest.mark.parametrize("where", ["nan in x", "inf in x", "nan in assign_weight", "inf in assign_weight"])
def test_encode_flags_non_finite_inputs(cuda_emulator, where):
    x, A, _ = inputs(11, 3, 20, 16, torch.float32, seed=2)
    value = float("nan") if where.startswith("nan") else float("inf")
    if where.endswith("in x"):
        x[9, 2, 7] = value
    else:
        A[1, 19, 3] = value
    emulated_encode(cuda_emulator, x, A, expect_finite=False)
    emulated_encode(cuda_emulator, x[:9] if where.endswith("in x") else x[:, :1], A if where.endswith("in x") else A[:1])


# ADC: the layouts of the kernels' code readers (RowCodes<bytes>, RowCodes<words>, PackedCodes4)
LAYOUT_BYTES, LAYOUT_WORDS, LAYOUT_PACKED4 = 0, 1, 2
PLACEMENTS = {"as the host decides": 0, "shared": 1, "global": 2}


def adc_problem(nq, N, M, K, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    lut = torch.randint(0, 16, (nq, M, K), generator=gen).float()  # integer values: sums are exact
    codes = torch.randint(0, K, (N, M), generator=gen, dtype=torch.uint8)
    stride = 16 if layout == LAYOUT_PACKED4 else 256
    padded = torch.zeros(nq, M, stride)
    padded[:, :, :K] = lut
    if layout == LAYOUT_PACKED4:
        packed = opqn_ext.pack_codes4(codes).data
        device_codes, pairs = packed.contiguous(), packed.shape[1]
    else:
        device_codes, pairs = codes, 0
    exact = (lut.gather(2, codes.long().T.unsqueeze(0).expand(nq, M, N)).sum(1)).numpy()  # [nq, N]
    return padded, device_codes, pairs, exact


def emulated_dense(lib, layout, placement, padded, device_codes, pairs, first, count):
    nq, M, stride = padded.shape
    scores = torch.empty(nq, count)
    keys = torch.empty(nq, count, dtype=torch.int64)
    check(lib, lib.emu_adc_dense(layout, placement, pointer(padded), i64(nq), i64(M), i64(stride),
                                 pointer(device_codes), i64(device_codes.numel()), i64(pairs), i64(first),
                                 i64(count), pointer(scores), pointer(keys)))
    return scores.numpy(), keys.numpy()


def emulated_select(lib, layout, placement, padded, device_codes, pairs, first, count, k):
    nq, M, stride = padded.shape
    blocks = -(-count // BLOCK_CODES)
    candidates = torch.empty(nq, blocks, k, dtype=torch.int64)
    check(lib, lib.emu_adc_select(layout, placement, pointer(padded), i64(nq), i64(M), i64(stride),
                                  pointer(device_codes), i64(device_codes.numel()), i64(pairs), i64(first),
                                  i64(count), i64(k), pointer(candidates)))
    return candidates.numpy()


def decode_keys(signed):
    """Signed rank keys (block_select.cuh) -> (scores, positions), written independently of the kernels."""
    key = signed.view(np.uint64) ^ np.uint64(1 << 63)
    ordered = (key >> np.uint64(32)).astype(np.uint32)
    bits = np.where(ordered & np.uint32(0x80000000), ordered & np.uint32(0x7FFFFFFF), ~ordered)
    positions = np.uint32(0xFFFFFFFF) - (key & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return bits.astype(np.uint32).view(np.float32), positions.astype(np.int64)


ADC_CASES = [  # layout, M, K
    (LAYOUT_BYTES, 3, 256),
    (LAYOUT_WORDS, 8, 64),
    (LAYOUT_PACKED4, 5, 16),
    (LAYOUT_PACKED4, 16, 9),
]


@pytest.mark.parametrize("layout,M,K", ADC_CASES)
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_adc_dense_scores_and_keys(cuda_emulator, layout, M, K, placement):
    nq, N, first = 2, 1000, 37
    padded, device_codes, pairs, exact = adc_problem(nq, N, M, K, layout, seed=M * K)
    count = N - first - 5
    scores, keys = emulated_dense(cuda_emulator, layout, PLACEMENTS[placement], padded, device_codes, pairs, first,
                                  count)
    np.testing.assert_array_equal(scores, exact[:, first:first + count])
    key_scores, positions = decode_keys(keys)
    np.testing.assert_array_equal(key_scores, scores)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(count), (nq, count)))


def expected_block_top(exact_row, k):
    """(score, position) pairs of the k best of one block's codes, ties by smaller position."""
    order = np.argsort(-exact_row, kind="stable")[:k]
    return sorted(zip(exact_row[order].tolist(), order.tolist()))


@pytest.mark.parametrize("layout,M,K", ADC_CASES)
@pytest.mark.parametrize("k", [1, 10, 1024])
def test_adc_select_keeps_each_blocks_k_best(cuda_emulator, layout, M, K, k):
    nq, first = 2, 100
    count = 2 * BLOCK_CODES + 77  # a partial last block
    padded, device_codes, pairs, exact = adc_problem(nq, first + count, M, K, layout, seed=k + M)
    candidates = emulated_select(cuda_emulator, layout, 0, padded, device_codes, pairs, first, count, k)
    for q in range(nq):
        for block in range(candidates.shape[1]):
            begin = block * BLOCK_CODES
            row = exact[q, first + begin:first + min(count, begin + BLOCK_CODES)]
            valid = candidates[q, block] != np.iinfo(np.int64).min
            assert valid.sum() == min(k, row.size), "slots without a key where a code was left"
            scores, positions = decode_keys(candidates[q, block][valid])
            got = sorted(zip(scores.tolist(), (positions - begin).tolist()))
            assert got == expected_block_top(row, k), f"query {q}, block {block}"


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_adc_select_with_fewer_codes_than_k_and_ties(cuda_emulator, placement):
    padded, device_codes, pairs, exact = adc_problem(1, 700, 4, 2, LAYOUT_WORDS, seed=11)  # K = 2: ties
    candidates = emulated_select(cuda_emulator, LAYOUT_WORDS, PLACEMENTS[placement], padded, device_codes, pairs,
                                 0, 700, 1000)
    valid = candidates[0, 0] != np.iinfo(np.int64).min
    assert valid.sum() == 700
    scores, positions = decode_keys(candidates[0, 0][valid])
    assert sorted(positions.tolist()) == list(range(700))
    np.testing.assert_array_equal(scores, exact[0, positions])
    few = emulated_select(cuda_emulator, LAYOUT_WORDS, PLACEMENTS[placement], padded, device_codes, pairs, 0, 700, 3)
    scores, positions = decode_keys(few[0, 0])
    assert sorted(zip(scores.tolist(), positions.tolist())) == expected_block_top(exact[0], 3)


def test_adc_tables_over_48_kib_of_shared_memory(cuda_emulator):
    """48 books of bytes: a 48 KiB table, which with the select state needs the opt-in launch."""
    padded, device_codes, pairs, exact = adc_problem(1, 300, 48, 256, LAYOUT_WORDS, seed=2)
    candidates = emulated_select(cuda_emulator, LAYOUT_WORDS, 0, padded, device_codes, pairs, 0, 300, 5)
    scores, positions = decode_keys(candidates[0, 0])
    assert sorted(zip(scores.tolist(), positions.tolist())) == expected_block_top(exact[0], 5)
    padded, device_codes, pairs, exact = adc_problem(1, 300, 49, 256, LAYOUT_BYTES, seed=2)  # global table
    scores, _ = emulated_dense(cuda_emulator, LAYOUT_BYTES, 0, padded, device_codes, pairs, 0, 300)
    np.testing.assert_array_equal(scores, exact)


def test_decode_keys_kernel(cuda_emulator):
    padded, device_codes, pairs, _ = adc_problem(1, 600, 4, 16, LAYOUT_WORDS, seed=4)
    _, keys = emulated_dense(cuda_emulator, LAYOUT_WORDS, 0, padded, device_codes, pairs, 0, 600)
    top = np.ascontiguousarray(keys[0, ::-3])
    scores = torch.empty(top.size)
    indices = torch.empty(top.size, dtype=torch.int64)
    first = 1 << 33
    check(cuda_emulator, cuda_emulator.emu_decode_keys(top.ctypes.data_as(ctypes.c_void_p), i64(top.size), i64(first),
                                                       pointer(scores), pointer(indices)))
    expected_scores, positions = decode_keys(top)
    np.testing.assert_array_equal(scores.numpy(), expected_scores)
    np.testing.assert_array_equal(indices.numpy(), positions + first)


def test_a_kernel_reading_past_its_codes_is_reported(cuda_emulator):
    padded, device_codes, pairs, _ = adc_problem(1, 200, 8, 16, LAYOUT_WORDS, seed=9)
    short = device_codes[:150].contiguous()  # the kernel is told there are 200 codes
    with pytest.raises(RuntimeError, match="past the end of codes"):
        emulated_dense(cuda_emulator, LAYOUT_WORDS, 0, padded, short, pairs, 0, 200)


def emulated_topk(lib, layout, lut, device_codes, pairs, N, k, chunk_elements, max_queries=65535):
    nq, M, K = lut.shape
    scores = torch.empty(nq, k)
    indices = torch.empty(nq, k, dtype=torch.int64)
    check(lib, lib.emu_adc_topk(layout, pointer(lut), i64(nq), i64(M), i64(K), pointer(device_codes), i64(pairs),
                                i64(N), i64(k), i64(chunk_elements), i64(max_queries), pointer(scores),
                                pointer(indices)))
    return scores, indices


def topk_problem(nq, N, M, K, layout, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        lut = torch.randint(0, 3, (nq, M, K), generator=gen).float()
    else:
        lut = torch.randn(nq, M, K, generator=gen).softmax(-1)
    codes = torch.randint(0, K, (N, M), generator=gen, dtype=torch.uint8)
    if layout == LAYOUT_PACKED4:
        packed = opqn_ext.pack_codes4(codes).data.contiguous()
        return lut, codes, packed, packed.shape[1]
    return lut, codes, codes, 0


@pytest.mark.parametrize("layout,M,K", ADC_CASES)
@pytest.mark.parametrize("k,chunk_elements", [
    (10, 1 << 24),     # select path, one chunk
    (100, 1),          # select path, a chunk per 4096-code block: merges
    (1024, 1),
    (1500, 1 << 24),   # dense path (k > 1024), one chunk
    (1500, 1),         # dense path, chunks of k codes
])
@pytest.mark.parametrize("ties", [False, True])
def test_adc_topk_pipeline_equals_the_cpu_scan(cuda_emulator, layout, M, K, k, chunk_elements, ties):
    """The whole CUDA adc_topk / adc_topk4 host code (adc_scan_topk.h) with emulated kernels gives the
    CPU's exact results, bit for bit: the same scores and the same indices, ties by smaller index."""
    nq, N = 3, 3 * 4096 + 1234
    lut, codes, device_codes, pairs = topk_problem(nq, N, M, K, layout, seed=k + M, ties=ties)
    scores, indices = emulated_topk(cuda_emulator, layout, lut, device_codes, pairs, N, k, chunk_elements)
    expected_scores, expected_indices = opqn_ext.adc_topk(lut, codes, k)
    assert torch.equal(scores, expected_scores)
    assert torch.equal(indices, expected_indices)


@pytest.mark.parametrize("nq,max_queries", [(7, 3), (6, 3), (5, 1), (4, 4)])
def test_adc_topk_pipeline_takes_queries_in_groups_a_grid_holds(cuda_emulator, nq, max_queries):
    """More queries than one grid holds (65535 on a GPU, max_queries here) go in groups: the last one
    partial or full, each group over several chunks; the results are the CPU's, row for row."""
    N, k = 2 * 4096 + 77, 50
    for layout, M, K in ((LAYOUT_WORDS, 8, 256), (LAYOUT_PACKED4, 6, 16)):
        lut, codes, device_codes, pairs = topk_problem(nq, N, M, K, layout, seed=nq + max_queries, ties=True)
        scores, indices = emulated_topk(cuda_emulator, layout, lut, device_codes, pairs, N, k, 1, max_queries)
        expected_scores, expected_indices = opqn_ext.adc_topk(lut, codes, k)
        assert torch.equal(scores, expected_scores) and torch.equal(indices, expected_indices), layout


def test_adc_topk_pipeline_reports_the_host_codes_errors(cuda_emulator):
    lut, _, device_codes, pairs = topk_problem(1, 10, 4, 16, LAYOUT_BYTES, seed=0, ties=False)
    with pytest.raises(RuntimeError, match="unknown code layout 7"):
        emulated_topk(cuda_emulator, 7, lut, device_codes, pairs, 10, 3, 1)


def test_adc_topk_pipeline_with_k_equal_to_n_and_one_code(cuda_emulator):
    for N, k in ((1, 1), (777, 777), (5000, 5000)):
        lut, codes, device_codes, pairs = topk_problem(2, N, 8, 16, LAYOUT_WORDS, seed=N, ties=True)
        scores, indices = emulated_topk(cuda_emulator, LAYOUT_WORDS, lut, device_codes, pairs, N, k, 1)
        expected_scores, expected_indices = opqn_ext.adc_topk(lut, codes, k)
        assert torch.equal(scores, expected_scores) and torch.equal(indices, expected_indices), (N, k)


@pytest.mark.parametrize("layout,M", [(LAYOUT_BYTES, 3), (LAYOUT_WORDS, 8), (LAYOUT_PACKED4, 5)])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_every_code_value_stays_inside_the_padded_table(cuda_emulator, layout, M, placement):
    """K = 3 words, codes of every value the layout can hold: each reads inside the table padded to
    256 (or 16) entries per book, the padding adds 0. The table ends at a guard page in global and in
    shared memory, so a read past it would be reported."""
    nq, N, K = 2, 700, 3
    gen = torch.Generator().manual_seed(M)
    lut = torch.randint(1, 9, (nq, M, K), generator=gen).float()
    stride = 16 if layout == LAYOUT_PACKED4 else 256
    codes = torch.randint(0, stride, (N, M), generator=gen, dtype=torch.uint8)
    codes[0] = stride - 1
    padded = torch.zeros(nq, M, stride)
    padded[:, :, :K] = lut
    device_codes, pairs = codes, 0
    if layout == LAYOUT_PACKED4:
        packed = opqn_ext.pack_codes4(codes).data.contiguous()
        device_codes, pairs = packed, packed.shape[1]
    scores, _ = emulated_dense(cuda_emulator, layout, PLACEMENTS[placement], padded, device_codes, pairs, 0, N)
    expected = padded.gather(2, codes.long().T.unsqueeze(0).expand(nq, M, N)).sum(1).numpy()
    np.testing.assert_array_equal(scores, expected)


def test_a_nan_sub_vector_spoils_only_its_own_outputs(cuda_emulator):
    x, A, C = inputs(9, 3, 16, 8, torch.float32, seed=12)
    x[4, 1, 5] = float("nan")
    probs, quantized, entropy = emulated_forward(cuda_emulator, x, A, C, 2.0, True)
    assert probs[4, 1].isnan().all() and quantized[4, 1].isnan().all() and entropy[4, 1].isnan()
    clean = torch.ones(9, 3, dtype=torch.bool)
    clean[4, 1] = False
    expected = reference.soft_quantize(x.double(), A.double(), C.double(), scale=2.0, normalize=True)
    for got, want in zip((probs, quantized, entropy), expected):
        torch.testing.assert_close(got[clean].double(), want[clean], rtol=2e-5, atol=2e-5)
