"""Whole-database evaluation at Fashion-MNIST scale: 10k queries x 60k database items (issue 4).

Times ``metrics.evaluate_codes`` (adc_scores in batches, then the rank_stats op: one radix sort
per query in C++, parallel over queries) and ``metrics.evaluate_features`` (cosine, 512-d),
against the per-query loop formulation of research code: for each query, score the database
(a torch gather per book), sort it stably, and accumulate AP from the ranked relevance. Checks
that both give the same mAP on the queries the loop ran before reporting the times.

    python benchmarks/bench_metrics.py [--queries 10000] [--database 60000] [--loop-queries 10000]
"""
import argparse
import json
import os
import time

import torch

from opqn_ext import metrics, reference


def loop_map(luts, codes, ql, dbl):
    """The per-query loop: score, stable sort, AP; returns (mAP, seconds)."""
    start = time.perf_counter()
    ranks = torch.arange(1, codes.shape[0] + 1, dtype=torch.float64)
    total = 0.0
    for q in range(luts.shape[0]):
        scores = reference.adc_scores(luts[q:q + 1], codes)[0]
        order = torch.sort(scores, descending=True, stable=True).indices
        rel = (dbl[order] == ql[q]).double()
        n = rel.sum()
        total += float((rel.cumsum(0) / ranks * rel).sum() / n) if n > 0 else 0.0
    return total / luts.shape[0], time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--database", type=int, default=60000)
    parser.add_argument("--books", type=int, default=4)
    parser.add_argument("--words", type=int, default=256)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--loop-queries", type=int, default=10000, help="queries timed in the per-query loop")
    parser.add_argument("--json", default="benchmarks/results/metrics.json")
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    nq, N, M, K = args.queries, args.database, args.books, args.words
    luts = torch.softmax(4 * torch.randn(nq, M, K, generator=g), -1)
    codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
    ql = torch.randint(0, args.classes, (nq,), generator=g)
    dbl = torch.randint(0, args.classes, (N,), generator=g)
    qf, dbf = torch.randn(nq, 512, generator=g), torch.randn(N, 512, generator=g)

    fast = metrics.evaluate_codes(luts, codes, ql, dbl)
    start = time.perf_counter()
    fast = metrics.evaluate_codes(luts, codes, ql, dbl)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    floats = metrics.evaluate_features(qf, dbf, ql, dbl)
    float_s = time.perf_counter() - start

    nl = min(args.loop_queries, nq)
    loop_value, loop_s = loop_map(luts[:nl], codes, ql[:nl], dbl)
    fast_value = float(fast.average_precision[:nl].mean())
    assert abs(loop_value - fast_value) < 1e-9, (loop_value, fast_value)
    loop_full_s = loop_s * nq / nl

    threads = torch.get_num_threads()
    print(f"{nq} queries x {N} database items, M={M}, K={K}, {args.classes} classes, {threads} threads")
    print(f"{'method':46s} {'seconds':>9s} {'vs loop':>8s}")
    rows = [("evaluate_codes (adc_scores + rank_stats)", fast_s),
            ("evaluate_features (cosine, 512-d)", float_s),
            (f"per-query loop ({nl} queries{'' if nl == nq else ', scaled to all'})", loop_full_s)]
    for name, s in rows:
        print(f"{name:46s} {s:9.2f} {loop_full_s / s:7.1f}x")
    print(f"mAP (codes) {fast.map:.6f}, equal to the loop's on its {nl} queries; float mAP {floats.map:.6f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"queries": nq, "database": N, "books": M, "words": K, "threads": threads,
                   "evaluate_codes_s": fast_s, "evaluate_features_s": float_s, "loop_s": loop_s,
                   "loop_queries": nl, "loop_scaled_s": loop_full_s, "speedup": loop_full_s / fast_s}, f, indent=2)


if __name__ == "__main__":
    main()
