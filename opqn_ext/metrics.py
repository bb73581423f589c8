"""Retrieval metrics over whole rankings: mAP, mAP@k, precision@k, recall@k and precision-recall
curves, relevant = same label, ties ranked by database index (the order of ``adc_topk``).

Queries go in batches: each batch's score matrix ``[b, N]`` is computed (ADC scores from code
tables, or cosine similarities of float features) and ranked by the ``rank_stats`` op, one radix
sort per query in C++; no Python loop ever runs over the database or over single queries.
Definitions (per query, averaged over queries):
- AP: mean over the relevant items of the precision at their rank (0 without relevant items).
- AP@k: mean over the relevant items within the first k of the precision at their rank (0 when
  none is), the convention of the deep-hashing literature.
- precision@k = hits@k / k; recall@k = hits@k / relevant items.
- PR curve: (mean precision@n, mean recall@n) at cutoffs n spread over 1..N.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .arrays import Array, as_tensor
from .ops import adc_scores, rank_stats

DEFAULT_KS = (5, 10, 50)
_BATCH_BYTES = 64 << 20  # score matrix of one batch


@dataclass
class RetrievalMetrics:
    """Averages over queries; ``pr_curve`` holds the cutoffs and the mean precision and recall there."""

    map: float
    map_at: dict[int, float]
    precision_at: dict[int, float]
    recall_at: dict[int, float]
    pr_cutoffs: np.ndarray
    pr_precision: np.ndarray
    pr_recall: np.ndarray
    num_queries: int
    num_database: int
    seconds: float = 0.0
    average_precision: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def summary(self) -> dict:
        """The scalar metrics as a flat JSON-friendly dict."""
        out = {"mAP": self.map}
        out.update({f"mAP@{k}": v for k, v in self.map_at.items()})
        out.update({f"P@{k}": v for k, v in self.precision_at.items()})
        out.update({f"R@{k}": v for k, v in self.recall_at.items()})
        out.update({"queries": self.num_queries, "database": self.num_database, "seconds": self.seconds})
        return out

    def pr_curve(self) -> dict:
        """The precision-recall curve as JSON-friendly lists: rank cutoffs, mean precision and mean
        recall at each."""
        return {"cutoffs": self.pr_cutoffs.tolist(), "precision": self.pr_precision.tolist(),
                "recall": self.pr_recall.tolist()}


def pr_cutoffs(num_database: int, points: int = 64) -> list[int]:
    """Rank cutoffs for a PR curve: at most ``points`` values over 1..N (both included), half spread
    geometrically (dense among the first ranks, where precision changes fastest), half evenly."""
    if num_database < 1:
        raise ValueError(f"num_database must be >= 1, got {num_database}")
    half = max(2, points // 2)
    spread = np.concatenate([np.geomspace(1, num_database, half), np.linspace(1, num_database, half)])
    return sorted({int(c) for c in spread.round()})


def evaluate_ranking(score_batch: Callable[[int, int], torch.Tensor], query_labels, db_labels,
                     ks: Sequence[int] = DEFAULT_KS, pr_points: int = 64,
                     batch_size: int | None = None) -> RetrievalMetrics:
    """Metrics of the rankings given by ``score_batch(q0, q1) -> scores [q1 - q0, N]``.

    The general entry point: :func:`evaluate_codes` and :func:`evaluate_features` call it with ADC
    and cosine scores. ``ks`` larger than N are clipped to N.
    """
    query_labels = _labels(query_labels, "query_labels")
    db_labels = _labels(db_labels, "db_labels")
    nq, N = len(query_labels), len(db_labels)
    if N == 0:
        raise ValueError("the database is empty: there is nothing to rank")
    if nq == 0:
        raise ValueError("there are no queries to evaluate")
    ks = [int(k) for k in ks]
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {ks}")
    curve = pr_cutoffs(N, pr_points)
    k_cut = [min(k, N) for k in ks]
    cutoffs = k_cut + curve
    batch = batch_size or max(1, _BATCH_BYTES // (4 * N))
    start = time.perf_counter()
    parts = []
    for q0 in range(0, nq, batch):
        q1 = min(nq, q0 + batch)
        scores = score_batch(q0, q1).to(device="cpu", dtype=torch.float32)
        if scores.shape != (q1 - q0, N):
            raise ValueError(f"score_batch({q0}, {q1}) returned shape {list(scores.shape)}, expected {[q1 - q0, N]}")
        parts.append(rank_stats(scores, query_labels[q0:q1], db_labels, cutoffs))
    seconds = time.perf_counter() - start
    ap = torch.cat([p.average_precision for p in parts])
    hits = torch.cat([p.hits for p in parts]).double()
    psums = torch.cat([p.precision_sums for p in parts])
    relevant = torch.cat([p.num_relevant for p in parts]).double().clamp(min=1)
    nk = len(ks)
    map_at = (psums[:, :nk] / hits[:, :nk].clamp(min=1)).mean(0)
    cut = torch.tensor(cutoffs, dtype=torch.float64)
    precision = (hits / cut).mean(0)
    recall = (hits / relevant[:, None]).mean(0)
    return RetrievalMetrics(
        map=float(ap.mean()),
        map_at={k: float(v) for k, v in zip(ks, map_at)},
        precision_at={k: float(v) for k, v in zip(ks, precision[:nk])},
        recall_at={k: float(v) for k, v in zip(ks, recall[:nk])},
        pr_cutoffs=np.asarray(curve),
        pr_precision=precision[nk:].numpy(),
        pr_recall=recall[nk:].numpy(),
        num_queries=nq,
        num_database=N,
        seconds=seconds,
        average_precision=ap.numpy(),
    )


def evaluate_codes(query_luts: Array, db_codes: Array, query_labels, db_labels,
                   ks: Sequence[int] = DEFAULT_KS, pr_points: int = 64,
                   batch_size: int | None = None) -> RetrievalMetrics:
    """Metrics of ADC retrieval: query tables ``[nq, M, K]`` against database codes ``[N, M]``.

    Scores are ``adc_scores`` (on the device of the tables), so the rankings are exactly those of
    ``adc_topk``. Tables, codes and labels may be tensors or NumPy arrays.
    """
    query_luts, db_codes = as_tensor(query_luts, "query_luts").float(), as_tensor(db_codes, "db_codes")
    if db_codes.device != query_luts.device:
        db_codes = db_codes.to(query_luts.device)
    return evaluate_ranking(lambda q0, q1: adc_scores(query_luts[q0:q1], db_codes), query_labels, db_labels,
                            ks, pr_points, batch_size)


def evaluate_features(query_features: Array, db_features: Array, query_labels, db_labels,
                      ks: Sequence[int] = DEFAULT_KS, pr_points: int = 64,
                      batch_size: int | None = None) -> RetrievalMetrics:
    """Metrics of float-feature retrieval by cosine similarity (the upper bound for any code);
    features and labels may be tensors or NumPy arrays."""
    query_features, db_features = as_tensor(query_features, "query_features"), as_tensor(db_features, "db_features")
    if query_features.dim() != 2 or db_features.dim() != 2 or query_features.shape[1] != db_features.shape[1]:
        raise ValueError(f"query_features [nq, D] and db_features [N, D] must share D, got "
                         f"{list(query_features.shape)} and {list(db_features.shape)}")
    q = F.normalize(query_features.float(), dim=1)
    db = F.normalize(db_features.float().to(q.device), dim=1)
    return evaluate_ranking(lambda q0, q1: q[q0:q1] @ db.T, query_labels, db_labels, ks, pr_points, batch_size)


def _labels(labels, name: str) -> torch.Tensor:
    t = torch.as_tensor(labels).cpu()
    if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor, got dtype {t.dtype} and shape {list(t.shape)}")
    return t.long().contiguous()
