"""The 8-bit ADC scan over book counts (M x 256 words), against FAISS IndexPQ on the same codes and
tables (bench_adc.py's setting), on opqn_ext's AVX-512 and AVX2 paths and FAISS's AVX-512 and AVX2
kernels where the CPU has them. Same top-k checked first, then timed.

    python benchmarks/bench_adc_books.py [--books 4 8 16 32] [--N 1000000] [--nq 100] [--k 10]
"""
import argparse

import faiss
import torch

import opqn_ext
from bench_adc import (cell, check_same_ranking, faiss_pq, median_seconds, on_faiss_avx2, on_isa, opqn_queries,
                       ratio, write_results)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--books", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--N", type=int, default=1_000_000)
    parser.add_argument("--nq", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    isas = [isa for isa in ("avx512", "avx2") if isa in opqn_ext._C.available_cpu_isas()]
    N, nq, k = args.N, args.nq, args.k
    rows = []
    for M in args.books:
        codes = torch.randint(0, 256, (N, M), generator=torch.Generator().manual_seed(M), dtype=torch.uint8)
        codebook, queries, lut = opqn_queries(M, 256, 256, nq, seed=M)
        pq = faiss_pq(codebook, codes, 8)
        check_same_ranking(opqn_ext.adc_topk(lut, codes, k), pq.search(queries.numpy(), k), k)
        row = {"M": M, "N": N, "nq": nq, "k": k, "threads": args.threads}
        for isa in isas:
            seconds = on_isa(isa, lambda: median_seconds(lambda: opqn_ext.adc_topk(lut, codes, k), args.repeats))
            row[f"opqn_{isa}_gcodes_s"] = N * nq / seconds / 1e9
        row["faiss_pq_gcodes_s"] = N * nq / median_seconds(lambda: pq.search(queries.numpy(), k), 1) / 1e9
        avx2 = on_faiss_avx2(lambda: median_seconds(lambda: pq.search(queries.numpy(), k), 1))
        row["faiss_pq_avx2_gcodes_s"] = N * nq / avx2 / 1e9 if avx2 else None
        rows.append(row)
        print(row, flush=True)

    print(f"\n8-bit scan, Gcodes/s, N = {N}, nq = {nq}, k = {k}, {args.threads} thread(s); FAISS {faiss.__version__}")
    head = (f"{'M':>3} | {'avx512':>9} {'avx2':>9} | {'PQ':>9} {'PQ avx2':>9} | {'x PQ':>7} {'x avx2':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        ours, ours2 = r.get("opqn_avx512_gcodes_s"), r.get("opqn_avx2_gcodes_s")
        print(f"{r['M']:>3} | {cell(ours, 9, 3)} {cell(ours2, 9, 3)} | {cell(r['faiss_pq_gcodes_s'], 9, 3)} "
              f"{cell(r['faiss_pq_avx2_gcodes_s'], 9, 3)} | {cell(ratio(ours, r['faiss_pq_gcodes_s']), 7, 1)} "
              f"{cell(ratio(ours2, r['faiss_pq_avx2_gcodes_s']), 7, 1)}")
    write_results(args.json, "adc_books.json", {"rows": rows})


if __name__ == "__main__":
    main()
