"""OPQNIndex.range_search (every item above a score: open-set identification) against computing
every score (what it did before its growing top-k scans) and FAISS IndexPQ.range_search on the
same codes and tables.

The index holds N random 32-bit codes (8 books x 16 words, d = 64) under a random OPQN head;
queries are random 512-d features. Thresholds are set so that a query finds about 10, 100 or 1000
items (the median over the queries of their 10th, 100th, 1000th best score). Results are checked
first: the brute-force path returns exactly the same, FAISS the same items except any within 1e-5
of the threshold (it computes its tables with its own rounding and keeps scores above the radius).
FAISS's IndexPQ range search decodes every code (no tables), so it is timed for nq = 1 only. With
``--cpp PREFIX`` (an opqn_ext C++ library installed there with its index files), also
opqn_ext::Index::range_search from a C++ program (benchmarks/cpp) on the index saved to a file, the
first query's ids checked against Python's.

    python benchmarks/bench_range_search.py [--sizes 1000000 10000000] [--cpp PREFIX] [--json PATH]
"""
import argparse
import platform

import faiss
import numpy as np
import torch

import cpp_programs
from bench_adc import cell, faiss_pq, median_seconds, ratio, write_results
from bench_search_latency import cpp_search_us
from opqn_ext import index as index_module
from opqn_ext import soft_quantize
from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead

D, M, K = 512, 8, 16
TARGETS = (10, 100, 1000)


def every_score(fn):
    """fn() with range_search computing every score (no top-k scans), restoring the setting."""
    before = index_module.RANGE_FIRST_K
    index_module.RANGE_FIRST_K = 0
    try:
        return fn()
    finally:
        index_module.RANGE_FIRST_K = before


def faiss_ranges(index, vectors, threshold):
    lims, scores, ids = index.range_search(vectors.numpy(), threshold)
    return torch.from_numpy(lims.astype(np.int64)), torch.from_numpy(scores), torch.from_numpy(ids)


def check(ours, brute, theirs, threshold):
    assert all(torch.equal(a, b) for a, b in zip(ours, brute)), "range_search differs from every score"
    lims, scores, ids = ours
    f_lims, f_scores, f_ids = theirs
    for q in range(len(lims) - 1):
        mine = dict(zip(ids[lims[q]:lims[q + 1]].tolist(), scores[lims[q]:lims[q + 1]].tolist()))
        peer = dict(zip(f_ids[f_lims[q]:f_lims[q + 1]].tolist(), f_scores[f_lims[q]:f_lims[q + 1]].tolist()))
        for item in set(mine) ^ set(peer):
            score = mine.get(item, peer.get(item))
            assert abs(score - threshold) <= 1e-5, f"FAISS and opqn_ext disagree on item {item} ({score})"


def measure(head, n: int, rows: list, program) -> None:
    """Times the three range searches (and the C++ one where ``program`` is the C++ timing program)
    on ``n`` random codes, appending a row per (nq, target)."""
    index = OPQNIndex.from_head(head)
    g = torch.Generator().manual_seed(n)
    index.add_codes(torch.randint(0, K, (n, M), dtype=torch.uint8, generator=g), ids=torch.arange(n))
    peer = faiss_pq(index.codebook, index.codes, 8)
    for nq in (1, 100):
        queries = torch.randn(nq, D, generator=g)
        vectors = soft_quantize(queries, index.assign_weight, index.codebook, index.query_scale,
                                True).quantized.reshape(nq, D).contiguous()
        for target in TARGETS:
            threshold = float(index.search(queries, target)[0][:, -1].median())
            ours = index.range_search(queries, threshold)
            with_faiss = nq == 1  # FAISS decodes every code: 100 queries x 10M codes take many minutes
            check(ours, every_score(lambda: index.range_search(queries, threshold)),
                  faiss_ranges(peer, vectors, threshold) if with_faiss else ours, threshold)
            repeats = 5 if nq == 1 else 2
            t_ours = median_seconds(lambda: index.range_search(queries, threshold), repeats)
            t_all = median_seconds(lambda: every_score(lambda: index.range_search(queries, threshold)), repeats)
            t_faiss = median_seconds(lambda: peer.range_search(vectors.numpy(), threshold), 2) if with_faiss else None
            found = float(ours[0][-1]) / nq
            row = {"N": n, "nq": nq, "found_per_query": found, "ours_ms": t_ours * 1e3,
                   "every_score_ms": t_all * 1e3, "faiss_ms": t_faiss * 1e3 if t_faiss else None,
                   "x_every_score": t_all / t_ours, "x_faiss": ratio(t_faiss, t_ours)}
            cpp = ""
            if program:
                row["cpp_ms"] = cpp_search_us(program, index, queries, 1, repeats, ours[2][:int(ours[0][1])],
                                              f"range={threshold!r}") / 1e3
                cpp = f" {row['cpp_ms']:>8.2f}"
            rows.append(row)
            print(f"{n:>9} {nq:>4} {found:>8.0f} | {row['ours_ms']:>8.2f} {row['every_score_ms']:>9.2f} "
                  f"{cell(row['faiss_ms'], 9, 1)}{cpp} | {row['x_every_score']:>8.2f} {cell(row['x_faiss'], 8, 1)}",
                  flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--cpp", metavar="PREFIX", help="an installed opqn_ext C++ library: time its range_search too")
    parser.add_argument("--json")
    args = parser.parse_args()
    program = cpp_programs.build(args.cpp) / "time_index_search" if args.cpp else None
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(threads)
    head = OrthoPQHead(D, 5, M, K, seed=0)
    rows: list = []
    print(f"{'N':>9} {'nq':>4} {'found/q':>8} | {'ours ms':>8} {'scores ms':>9} {'faiss ms':>9}"
          f"{'   C++ ms' if program else ''} | "
          f"{'x scores':>8} {'x faiss':>8}")
    for n in args.sizes:
        measure(head, n, rows, program)
    write_results(args.json, "range_search.json", {
        "machine": f"{platform.machine()} CPU, {threads} threads, FAISS {faiss.__version__}", "rows": rows})


if __name__ == "__main__":
    main()
