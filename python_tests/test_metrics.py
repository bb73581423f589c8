"""Retrieval metrics against hand-computed rankings and a per-query Python computation."""
import math

import numpy as np
import pytest
import torch

import opqn_ext
from opqn_ext import metrics
from test_adc_topk import problem


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


DB = torch.tensor([unit(10), unit(50), unit(30), unit(80), unit(30)])  # items 2 and 4 tie exactly
DB_LABELS = torch.tensor([0, 1, 0, 0, 1])


def test_hand_computed_ranking_with_a_tie():
    # query 0 (label 0) ranks 0, 2, 4, 1, 3 -> relevant at ranks 1, 2, 5
    # query 1 (label 1) ranks the same -> relevant at ranks 3, 4
    r = metrics.evaluate_features(torch.tensor([unit(0), unit(0)]), DB, torch.tensor([0, 1]), DB_LABELS,
                                  ks=(1, 3, 5))
    ap0, ap1 = (1 + 1 + 3 / 5) / 3, (1 / 3 + 2 / 4) / 2
    assert r.map == pytest.approx((ap0 + ap1) / 2)
    assert r.average_precision.tolist() == pytest.approx([ap0, ap1])
    assert r.precision_at == pytest.approx({1: 0.5, 3: (2 / 3 + 1 / 3) / 2, 5: (3 / 5 + 2 / 5) / 2})
    assert r.recall_at == pytest.approx({1: (1 / 3 + 0) / 2, 3: (2 / 3 + 1 / 2) / 2, 5: 1.0})
    # AP@k: precision at the hits within the first k, over those hits (0 without any)
    assert r.map_at == pytest.approx({1: 0.5, 3: (1.0 + 1 / 3) / 2, 5: (ap0 + ap1) / 2})
    assert r.pr_cutoffs.tolist() == [1, 2, 3, 4, 5]
    assert r.pr_recall[-1] == pytest.approx(1.0) and np.all(np.diff(r.pr_recall) >= 0)
    assert r.pr_precision[0] == pytest.approx(0.5)


def test_ks_beyond_the_database_are_clipped():
    r = metrics.evaluate_features(torch.tensor([unit(0)]), DB, torch.tensor([0]), DB_LABELS, ks=(10,))
    assert r.precision_at[10] == pytest.approx(3 / 5)


def python_map(lut, codes, ql, dbl):
    """mAP one query at a time from adc_topk's full ranking."""
    aps = []
    _, ranked = opqn_ext.adc_topk(lut, codes, codes.shape[0])
    for q in range(lut.shape[0]):
        hits, total = 0, 0.0
        for r, i in enumerate(ranked[q].tolist(), 1):
            if dbl[i] == ql[q]:
                hits += 1
                total += hits / r
        aps.append(total / hits if hits else 0.0)
    return sum(aps) / len(aps)


def test_code_metrics_equal_a_per_query_computation_over_adc_rankings():
    lut, codes = problem(20, 4, 16, 3000, seed=3, high=5)  # integer tables: many exact ties
    g = torch.Generator().manual_seed(0)
    ql, dbl = torch.randint(0, 4, (20,), generator=g), torch.randint(0, 4, (3000,), generator=g)
    r = metrics.evaluate_codes(lut, codes, ql, dbl, batch_size=7)
    assert r.map == pytest.approx(python_map(lut, codes, ql, dbl), rel=1e-12)
    _, top = opqn_ext.adc_topk(lut, codes, 10)
    assert r.precision_at[10] == pytest.approx(float((dbl[top] == ql[:, None]).double().mean()))


def test_float_metrics_match_their_code_free_definition():
    g = torch.Generator().manual_seed(1)
    q, db = torch.randn(15, 8, generator=g), torch.randn(400, 8, generator=g)
    ql, dbl = torch.randint(0, 3, (15,), generator=g), torch.randint(0, 3, (400,), generator=g)
    r = metrics.evaluate_features(q, db, ql, dbl)
    sims = torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(db, dim=1).T
    order = torch.sort(sims, dim=1, descending=True, stable=True).indices
    rel = (dbl[order] == ql[:, None]).double()
    ap = ((rel.cumsum(1) / torch.arange(1, 401)) * rel).sum(1) / rel.sum(1)
    assert r.map == pytest.approx(float(ap.mean()), rel=1e-6)
    assert r.precision_at[50] == pytest.approx(float(rel[:, :50].mean()))


def test_numpy_arrays_give_the_metrics_of_tensors():
    lut, codes = problem(6, 4, 16, 500, seed=4, high=5)
    g = torch.Generator().manual_seed(2)
    ql, dbl = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (500,), generator=g)
    q, db = torch.randn(6, 8, generator=g), torch.randn(500, 8, generator=g)
    for got, want in ((metrics.evaluate_codes(lut.double().numpy(), codes.numpy(), ql.numpy(), dbl.numpy()),
                       metrics.evaluate_codes(lut, codes, ql, dbl)),
                      (metrics.evaluate_features(q.numpy(), db.numpy(), ql.numpy(), dbl.numpy()),
                       metrics.evaluate_features(q, db, ql, dbl))):
        timed = {"seconds"}  # all else equal
        assert {k: v for k, v in got.summary().items() if k not in timed} == \
            {k: v for k, v in want.summary().items() if k not in timed}
        assert np.array_equal(got.average_precision, want.average_precision)
    with pytest.raises(TypeError, match="^db_codes must be a tensor or an array, got object"):
        metrics.evaluate_codes(lut, object(), ql, dbl)
    with pytest.raises(TypeError, match="^query_features must be a tensor or an array, got str"):
        metrics.evaluate_features("features", db, ql, dbl)


def test_summary_is_flat():
    r = metrics.evaluate_features(torch.tensor([unit(0)]), DB, torch.tensor([0]), DB_LABELS)
    s = r.summary()
    assert {"mAP", "mAP@5", "P@10", "R@50", "queries", "database"} <= set(s)


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)), "database is empty"),
        ((torch.zeros(0, 2), DB, torch.zeros(0, dtype=torch.long), DB_LABELS), "no queries"),
        ((torch.zeros(1, 2), DB, torch.zeros(1), DB_LABELS), "query_labels must be a 1-D integer tensor"),
        ((torch.zeros(1, 3), DB, torch.zeros(1, dtype=torch.long), DB_LABELS), "must share D"),
    ],
)
def test_metric_errors(args, match):
    with pytest.raises(ValueError, match=match):
        metrics.evaluate_features(*args)


def test_pr_cutoffs():
    assert metrics.pr_cutoffs(3, 64) == [1, 2, 3]
    c = metrics.pr_cutoffs(60000, 64)
    assert c[0] == 1 and c[-1] == 60000 and 32 < len(c) <= 64 and c == sorted(set(c))
    assert {1, 2, 3} <= set(c) and len([x for x in c if x <= 100]) >= 10  # dense among the first ranks
