"""The AVX2 and AVX-512 8-bit scans filter codes on byte tables and score only the codes that pass
in float (csrc/cpu/adc_filter.h). Their results must equal a full float scan's bit for bit, whatever
the tables: these cases aim at the filter's bound (wide and narrow books, huge and tiny magnitudes,
scores a rounding apart, overflow to inf, constant tables) and its layouts (every M up to 17, table
widths around 64 and 128 words, group and block tails). Every path runs them, with 1 and 2 threads,
with the case's few queries (the AVX-512 transposed scan, AVX2's interleaved tables) and with 40
variants of them (AVX-512's interleaved tables too), and must agree with numpy."""
import numpy as np
import pytest
import torch

import opqn_ext
from conftest import results_on_every_path
from test_adc_topk import numpy_topk


def variants(lut, nq=40):
    """nq queries from lut's: its queries with the words of each copy permuted (the same values, so
    the same edge cases, in different lanes of the interleaved tables)."""
    K = lut.shape[2]
    copies = [lut] + [lut[:, :, torch.randperm(K, generator=gen(100 + j))] for j in range(nq // lut.shape[0])]
    return torch.cat(copies)[:nq].contiguous()


def agree_everywhere(lut, codes, k):
    for tables in (lut, variants(lut)):
        runs = results_on_every_path(lambda: opqn_ext.adc_topk(tables, codes, k))
        want_s, want_i = numpy_topk(tables, codes, k)
        for s, i in runs:
            assert np.array_equal(i.numpy(), want_i)
            assert np.array_equal(s.numpy(), want_s, equal_nan=False)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_codes(N, M, high=256, seed=0):
    return torch.randint(0, high, (N, M), generator=gen(seed), dtype=torch.uint8)


@pytest.mark.parametrize("M", list(range(1, 18)))
def test_every_book_count(M):
    lut = torch.softmax(3 * torch.randn(3, M, 256, generator=gen(M)), dim=-1)
    agree_everywhere(lut, random_codes(3001, M, seed=M), 20)


@pytest.mark.parametrize("K", [2, 63, 64, 65, 127, 128, 129, 200, 255, 256])
def test_table_widths_with_codes_past_k(K):
    # codes take every byte value: words >= K read the padding (0), wherever the table's bytes sit
    lut = torch.randn(2, 8, K, generator=gen(K))
    agree_everywhere(lut, random_codes(4000, 8, seed=K), 15)


@pytest.mark.parametrize("K", [64, 65, 128, 129])
def test_the_last_word_of_a_table_width_counts(K):
    # word K - 1 is each book's best by far: the codes that use it lead, so a filter that reads it
    # as padding would drop them
    lut = torch.rand(2, 4, K, generator=gen(K)) * 0.01
    lut[:, :, K - 1] = 1.0
    codes = random_codes(3000, 4, high=K, seed=K)
    codes[::97] = K - 1
    agree_everywhere(lut, codes, 40)


@pytest.mark.parametrize("N", [1, 2, 63, 64, 65, 127, 1023, 1024, 1025, 1089, 20000])
def test_group_and_block_tails(N):
    lut = torch.rand(1, 4, 64, generator=gen(N))
    agree_everywhere(lut, random_codes(N, 4, high=64, seed=N), min(N, 10))


def test_one_wide_book_squeezes_the_others():
    # the step follows the widest book; the other books' scores differ far below it
    lut = torch.rand(4, 8, 256, generator=gen(1)) * 1e-6
    lut[:, 3] *= 1e9
    agree_everywhere(lut, random_codes(30000, 8, seed=1), 50)


def test_huge_offsets_and_scores_a_rounding_apart():
    # entries of 1e30 with differences of one ulp: float sums round, ties and near-ties everywhere
    base = torch.full((2, 8, 256), 1e30)
    ulp = torch.randint(0, 4, (2, 8, 256), generator=gen(2)).float()
    lut = base + ulp * (torch.nextafter(torch.tensor(1e30), torch.tensor(2e30)) - 1e30)
    agree_everywhere(lut, random_codes(20000, 8, seed=2), 100)


def test_mixed_signs_and_magnitudes():
    mag = 10.0 ** torch.randint(-30, 30, (3, 6, 256), generator=gen(3)).float()
    lut = torch.randn(3, 6, 256, generator=gen(4)) * mag
    agree_everywhere(lut, random_codes(20000, 6, seed=3), 64)


def test_sums_that_overflow_to_infinity():
    lut = torch.rand(2, 4, 256, generator=gen(5)) * 3e38
    with np.errstate(over="ignore"):  # numpy's float32 sums overflow as the scan's do
        agree_everywhere(lut, random_codes(5000, 4, seed=5), 30)


@pytest.mark.parametrize("value", [0.0, -2.5, 7.0])
def test_constant_tables(value):
    lut = torch.full((2, 8, 256), value)
    agree_everywhere(lut, random_codes(3000, 8, seed=6), 100)


def test_small_integer_tables_tie_at_the_threshold():
    lut = torch.randint(0, 3, (5, 16, 16), generator=gen(7)).float()
    agree_everywhere(lut, random_codes(50000, 16, high=16, seed=7), 500)


def test_more_queries_than_one_chunk_of_byte_tables():
    # 600 queries: the interleaved scans quantize the tables of 128 (AVX2) or 256 (AVX-512) queries
    # at a time, on each thread
    lut = torch.softmax(torch.randn(600, 8, 256, generator=gen(8)), dim=-1)
    agree_everywhere(lut, random_codes(5000, 8, seed=8), 10)


def test_most_of_the_top_k_score_the_minimum():
    # only word 0 scores: most codes, and most of the top 1000, have the smallest byte sum (0), which
    # must pass the first threshold of a scan
    lut = torch.zeros(3, 8, 256)
    lut[:, :, 0] = 1.0
    agree_everywhere(lut, random_codes(3000, 8, seed=9), 1000)


@pytest.mark.parametrize("M", [127, 128, 129])
def test_the_largest_byte_sums(M):
    # every seventh code takes each book's best word: byte sums of M * 255, the most an int16 lane
    # holds at M = 128 (M = 129 is scanned in float)
    lut = torch.rand(2, M, 256, generator=gen(M)) * 0.01
    lut[:, :, 255] = 1.0
    codes = random_codes(3000, M, seed=M)
    codes[::7] = 255
    agree_everywhere(lut, codes, 50)
