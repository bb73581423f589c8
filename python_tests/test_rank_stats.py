"""adc_scores and rank_stats: the dense ADC scores and whole-ranking statistics used by evaluation,
checked against the reference, a numpy lexsort and hand-computed rankings."""
import numpy as np
import pytest
import torch

import opqn_ext
from opqn_ext import reference
from conftest import results_on_every_path
from test_adc_topk import problem


@pytest.mark.parametrize("nq,M,K,N", [(3, 4, 256, 5000), (1, 1, 2, 1), (7, 13, 16, 2049), (2, 32, 64, 100)])
def test_adc_scores_equal_reference_and_adc_topk(nq, M, K, N, device):
    lut, codes = problem(nq, M, K, N, seed=N)
    lut = lut + torch.rand(lut.shape, generator=torch.Generator().manual_seed(1))  # inexact sums
    lut, codes = lut.to(device), codes.to(device)
    scores = opqn_ext.adc_scores(lut, codes)
    assert scores.shape == (nq, N) and scores.dtype == torch.float32
    assert torch.equal(scores, reference.adc_scores(lut, codes))
    top_scores, top_ids = opqn_ext.adc_topk(lut, codes, min(N, 10))
    assert torch.equal(top_scores, scores.gather(1, top_ids))


def test_adc_scores_treat_codes_past_k_as_zero(device):
    lut, _ = problem(2, 3, 5, 1)
    codes = torch.tensor([[255, 5, 0], [4, 200, 1]], dtype=torch.uint8)
    scores = opqn_ext.adc_scores(lut.to(device), codes.to(device)).cpu()
    assert scores[0, 0] == lut[0, 2, 0] and scores[1, 1] == lut[1, 0, 4] + lut[1, 2, 1]


def test_adc_scores_with_no_queries_or_codes():
    lut, codes = problem(0, 4, 16, 10)
    assert opqn_ext.adc_scores(lut, codes).shape == (0, 10)
    lut, codes = problem(3, 4, 16, 0)
    assert opqn_ext.adc_scores(lut, codes).shape == (3, 0)


@pytest.mark.parametrize(
    "lut,codes,match",
    [
        (torch.rand(2, 4, 16).double(), torch.zeros(5, 4, dtype=torch.uint8), "lut must be float32"),
        (torch.rand(2, 4, 16), torch.zeros(5, 4, dtype=torch.int32), "codes must be uint8"),
        (torch.rand(2, 4, 16), torch.zeros(5, 3, dtype=torch.uint8), "codes must have M=4"),
        (torch.full((2, 4, 16), float("nan")), torch.zeros(5, 4, dtype=torch.uint8), "lut must be finite"),
    ],
)
def test_adc_scores_bad_arguments(lut, codes, match):
    with pytest.raises(RuntimeError, match=match):
        opqn_ext.adc_scores(lut, codes)


def numpy_rank_stats(scores, qlabels, dblabels, cutoffs):
    scores, qlabels, dblabels = scores.numpy(), qlabels.numpy(), dblabels.numpy()
    N = scores.shape[1]
    out = []
    for q in range(scores.shape[0]):
        order = np.lexsort((np.arange(N), -scores[q]))
        rel = dblabels[order] == qlabels[q]
        found = np.cumsum(rel)
        prec = np.where(rel, found / np.arange(1, N + 1), 0.0)
        R = rel.sum()
        out.append((prec.sum() / R if R else 0.0, [found[c - 1] for c in cutoffs],
                    [prec[:c].sum() for c in cutoffs], R))
    return out


@pytest.mark.parametrize("nq,N,labels,levels", [(5, 10, 3, 0), (9, 5000, 7, 0), (6, 4097, 4, 3), (3, 1, 2, 0),
                                                (4, 70000, 10, 50)])
def test_rank_stats_matches_numpy_and_reference(nq, N, labels, levels):
    g = torch.Generator().manual_seed(N)
    # levels > 0: integer scores with many ties, which rank by smaller index
    scores = torch.randint(0, levels, (nq, N), generator=g).float() if levels else torch.randn(nq, N, generator=g)
    ql = torch.randint(0, labels, (nq,), generator=g)
    dbl = torch.randint(0, labels, (N,), generator=g)
    cutoffs = sorted({1, min(5, N), N, max(1, N // 3)}, reverse=True)
    got = opqn_ext.rank_stats(scores, ql, dbl, cutoffs)
    want = numpy_rank_stats(scores, ql, dbl, cutoffs)
    for q, (ap, hits, psums, R) in enumerate(want):
        assert got.num_relevant[q] == R
        assert got.average_precision[q].item() == pytest.approx(ap, rel=1e-12, abs=1e-15)
        assert got.hits[q].tolist() == hits
        assert got.precision_sums[q].numpy() == pytest.approx(np.array(psums), rel=1e-12)
    ref = reference.rank_stats(scores, ql, dbl, cutoffs)
    assert torch.allclose(got.average_precision, ref[0]) and torch.equal(got.hits, ref[1])


def test_rank_stats_hand_computed():
    # ranking: item 2 (0.9), item 0 (0.5), item 3 (0.5, tie -> after item 0), item 1 (0.1)
    scores = torch.tensor([[0.5, 0.1, 0.9, 0.5]])
    dbl = torch.tensor([1, 1, 0, 1])
    got = opqn_ext.rank_stats(scores, torch.tensor([1]), dbl, [1, 2, 4])
    # relevant at ranks 2, 3, 4: precisions 1/2, 2/3, 3/4
    assert got.average_precision.item() == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)
    assert got.hits.tolist() == [[0, 1, 3]]
    assert got.precision_sums[0].tolist() == pytest.approx([0.0, 0.5, 0.5 + 2 / 3 + 0.75])
    none = opqn_ext.rank_stats(scores, torch.tensor([7]), dbl, [4])
    assert none.average_precision.item() == 0.0 and none.num_relevant.item() == 0


def test_rank_stats_negative_zero_ties_with_zero():
    scores = torch.tensor([[0.0, -0.0, 0.0, -1.0]])
    got = opqn_ext.rank_stats(scores, torch.tensor([1]), torch.tensor([0, 1, 0, 0]), [1, 2])
    assert got.hits.tolist() == [[0, 1]]  # item 1 ranks second: the zeros tie, by index


def test_rank_stats_same_on_every_thread_count():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 20, (13, 9000), generator=g).float()
    ql, dbl = torch.randint(0, 5, (13,), generator=g), torch.randint(0, 5, (9000,), generator=g)
    results = results_on_every_path(lambda: opqn_ext.rank_stats(scores, ql, dbl, [10, 100]))
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r, results[0]))


def test_adc_topk_full_ranking_agrees_with_rank_stats():
    lut, codes = problem(4, 8, 16, 20000, seed=5, high=4)  # heavy ties
    dbl = torch.randint(0, 6, (20000,), generator=torch.Generator().manual_seed(0))
    ql = torch.arange(4)
    _, ranked = opqn_ext.adc_topk(lut, codes, 20000)
    stats = opqn_ext.rank_stats(opqn_ext.adc_scores(lut, codes), ql, dbl, [100, 20000])
    rel = dbl[ranked] == ql[:, None]
    assert torch.equal(rel[:, :100].sum(1), stats.hits[:, 0])
    found = rel.cumsum(1)
    ap = (found / torch.arange(1, 20001)).mul(rel).sum(1) / rel.sum(1)
    assert torch.allclose(ap.double(), stats.average_precision)


@pytest.mark.parametrize(
    "scores,ql,dbl,cutoffs,match",
    [
        (torch.rand(2, 5).double(), torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.long), [], "scores must be float32"),
        (torch.rand(5), torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.long), [], "scores must have shape"),
        (torch.rand(2, 5), torch.zeros(2, dtype=torch.int32), torch.zeros(5, dtype=torch.long), [], "query_labels must be int64"),
        (torch.rand(2, 5), torch.zeros(3, dtype=torch.long), torch.zeros(5, dtype=torch.long), [], "query_labels must have shape"),
        (torch.rand(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(4, dtype=torch.long), [], "db_labels must have shape"),
        (torch.rand(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.long), [6], r"cutoffs must be in \[1, N=5\]"),
        (torch.rand(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.long), [0], "cutoffs must be in"),
        (torch.tensor([[0.0, float("nan")]]), torch.zeros(1, dtype=torch.long), torch.zeros(2, dtype=torch.long), [], "scores must be finite"),
    ],
)
def test_rank_stats_bad_arguments(scores, ql, dbl, cutoffs, match):
    with pytest.raises(RuntimeError, match=match):
        opqn_ext.rank_stats(scores, ql, dbl, cutoffs)


def test_rank_stats_refuses_cutoffs_that_are_not_integers():
    with pytest.raises(ValueError, match="cutoffs must be an integer, got 2.5"):
        opqn_ext.rank_stats(torch.rand(2, 5), torch.zeros(2, dtype=torch.long), torch.zeros(5, dtype=torch.long), [2.5])


def test_rank_stats_opcheck():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(3, 50, generator=g), torch.randint(0, 3, (3,), generator=g), torch.randint(0, 3, (50,), generator=g), [5, 50])
    torch.library.opcheck(torch.ops.opqn_ext.rank_stats.default, args)
    lut, codes = problem(3, 4, 16, 100)
    torch.library.opcheck(torch.ops.opqn_ext.adc_scores.default, (lut, codes))
