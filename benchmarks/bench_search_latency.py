"""The latency of one query (nq = 1), what an online face search pays per probe: OPQNIndex.search
(features -> tables -> scan -> ids; and with fast_scan, the 4-bit scan), OPQNIndex.search_luts
(precomputed tables), the adc_topk op
alone, a query's tables alone (OPQNIndex.query_lut), the encode op of one feature vector (what
adding one face to a gallery computes), and FAISS IndexPQ (inner product, 8 x 8-bit codes whose centroids are the OPQN codewords,
codes ours) searched with the soft-quantized query on the same codes. The top-k ids are checked
against adc_topk's before timing (FAISS's up to swaps of scores equal within rounding); the best of
7 rounds of repeated calls. With ``--cpp PREFIX`` (an opqn_ext C++ library installed there by
``cmake --install``, with its index files), also opqn_ext::Index::search from a C++ program
(benchmarks/cpp, built under build/bench-cpp) on the index saved to a file, exact and 4-bit, its
ids checked against Python's too.

    python benchmarks/bench_search_latency.py [--sizes 1000 10000 100000 1000000] [--cpp PREFIX] [--json PATH]
"""
import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import faiss
import torch

import opqn_ext
from opqn_ext import reference
import cpp_programs
from bench_adc import check_same_ranking, faiss_pq
from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead

D, M, K = 512, 8, 16


def best_us(fn, n):
    """The best of 7 rounds of n calls, microseconds per call."""
    for _ in range(min(n, 100)):
        fn()
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return min(rounds)


def cpp_search_us(program: Path, index: OPQNIndex, queries: torch.Tensor, k: int, calls: int,
                  want_ids: torch.Tensor, mode: str = "") -> float:
    """Microseconds per search of ``queries`` from C++ (``mode``: "" for Index::search, "fast" for its
    4-bit scan, "range=S" for range_search), after checking the first query's ids equal ``want_ids``."""
    with tempfile.TemporaryDirectory() as folder:
        index.save(Path(folder) / "index.opqn")
        torch.save(queries, Path(folder) / "queries.pt")
        done = subprocess.run([str(program), str(Path(folder) / "index.opqn"), str(Path(folder) / "queries.pt"),
                               str(k), str(calls), *([mode] if mode else [])], capture_output=True, text=True,
                              check=True)
    ids, micros = done.stdout.split("\n")[:2]
    assert [int(i) for i in ids.split()] == want_ids.tolist(), f"C++ search ({mode or 'exact'}) gave other ids"
    return float(micros)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--cpp", metavar="PREFIX", help="an installed opqn_ext C++ library: time its Index::search too")
    parser.add_argument("--json")
    args = parser.parse_args()
    program = cpp_programs.build(args.cpp) / "time_index_search" if args.cpp else None
    head = OrthoPQHead(D, 10, M, K, seed=0)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"nq = 1, top-{args.k}, {M} x {K}-word codes, {torch.get_num_threads()} threads "
          f"({platform.processor() or platform.machine()}, torch {torch.__version__}, faiss {faiss.__version__})")
    print(f"{'N':>9} | {'search us':>9} {'fast us':>7} {'luts us':>8} {'adc_topk us':>11} {'tables us':>9} "
          f"{'encode us':>9} "
          f"{'faiss us':>9}{' C++ us C++ fast us' if program else ''} | {'faiss/search':>12}")
    for n in args.sizes:
        index = OPQNIndex.from_head(head)
        index.add(torch.randn(n, D, generator=g))
        query = torch.randn(1, D, generator=g)
        lut = index.query_lut(query)
        quantized = opqn_ext.soft_quantize(query, index.assign_weight, index.codebook, index.query_scale,
                                           True).quantized.reshape(1, -1).numpy()
        pq = faiss_pq(index.codebook, index.codes, 8)
        exact = opqn_ext.adc_topk(lut, index.codes, args.k)
        assert torch.equal(index.search(query, args.k)[1], exact[1]) and torch.equal(index.search_luts(lut, args.k)[1], exact[1])
        check_same_ranking(exact, pq.search(quantized, args.k), args.k)
        assert torch.equal(opqn_ext.encode(query, index.assign_weight), reference.encode(query, index.assign_weight))
        calls = max(20, min(3000, 30_000_000 // max(n, 1)))
        fast = index.search(query, args.k, fast_scan=True)
        row = {"N": n, "search_us": best_us(lambda: index.search(query, args.k), calls),
               "fast_search_us": best_us(lambda: index.search(query, args.k, fast_scan=True), calls),
               "search_luts_us": best_us(lambda: index.search_luts(lut, args.k), calls),
               "adc_topk_us": best_us(lambda: opqn_ext.adc_topk(lut, index.codes, args.k), calls),
               "tables_us": best_us(lambda: index.query_lut(query), calls),
               "encode_us": best_us(lambda: opqn_ext.encode(query, index.assign_weight), calls),
               "faiss_us": best_us(lambda: pq.search(quantized, args.k), calls)}
        if program:
            row["cpp_search_us"] = cpp_search_us(program, index, query, args.k, calls, exact[1][0])
            row["cpp_fast_search_us"] = cpp_search_us(program, index, query, args.k, calls, fast[1][0], "fast")
        row["faiss_over_search"] = row["faiss_us"] / row["search_us"]
        rows.append(row)
        cpp = f" {row['cpp_search_us']:6.1f} {row['cpp_fast_search_us']:11.1f}" if program else ""
        print(f"{n:>9} | {row['search_us']:9.1f} {row['fast_search_us']:7.1f} {row['search_luts_us']:8.1f} "
              f"{row['adc_topk_us']:11.1f} "
              f"{row['tables_us']:9.1f} {row['encode_us']:9.1f} {row['faiss_us']:9.1f}{cpp} | "
              f"{row['faiss_over_search']:12.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
