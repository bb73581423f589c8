"""The ADC scans over book counts, on opqn_ext's AVX-512 and AVX2 paths and FAISS's AVX-512 and AVX2
kernels where the CPU has them (bench_adc.py's setting: the same codes and tables for both).
  --bits 8: adc_topk (M x 256 words) against FAISS IndexPQ; the same top-k checked first.
  --bits 4: adc_topk4 (M x 16 words, default rerank) against FAISS IndexPQFastScan; recall@k of
            both against exact ADC measured first.
Then timed.

    python benchmarks/bench_adc_books.py [--bits 8|4] [--books 4 8 16 32] [--N 1000000] [--nq 100] [--k 10]
"""
import argparse

import faiss
import torch

import opqn_ext
from bench_adc import (cell, check_same_ranking, faiss_pq, median_seconds, on_faiss_avx2, on_isa, opqn_queries,
                       ratio, recall, write_results)


def peers(bits, M, N, nq, k):
    """(ours(), faiss search(), extra row fields) for M books of 2^bits words."""
    words = 1 << bits
    codes = torch.randint(0, words, (N, M), generator=torch.Generator().manual_seed(M), dtype=torch.uint8)
    codebook, queries, lut = opqn_queries(M, words, words, nq, seed=M)
    index = faiss_pq(codebook, codes, bits)
    if bits == 8:
        check_same_ranking(opqn_ext.adc_topk(lut, codes, k), index.search(queries.numpy(), k), k)
        return (lambda: opqn_ext.adc_topk(lut, codes, k)), (lambda: index.search(queries.numpy(), k)), {}
    fast = faiss.IndexPQFastScan(index)
    packed = opqn_ext.pack_codes4(codes)
    exact = opqn_ext.adc_topk(lut, codes, k)[1]
    extra = {"recall_opqn": recall(opqn_ext.adc_topk4(lut, packed, k)[1], exact),
             "recall_faiss": recall(torch.from_numpy(fast.search(queries.numpy(), k)[1]), exact)}
    return (lambda: opqn_ext.adc_topk4(lut, packed, k)), (lambda: fast.search(queries.numpy(), k)), extra


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=[8, 4], default=8)
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
        ours, theirs, extra = peers(args.bits, M, N, nq, k)
        row = {"bits": args.bits, "M": M, "N": N, "nq": nq, "k": k, "threads": args.threads, **extra}
        for isa in isas:
            row[f"opqn_{isa}_gcodes_s"] = N * nq / on_isa(isa, lambda: median_seconds(ours, args.repeats)) / 1e9
        row["faiss_gcodes_s"] = N * nq / median_seconds(theirs, args.repeats) / 1e9
        avx2 = on_faiss_avx2(lambda: median_seconds(theirs, args.repeats))
        row["faiss_avx2_gcodes_s"] = N * nq / avx2 / 1e9 if avx2 else None
        rows.append(row)
        print(row, flush=True)

    peer = "PQ" if args.bits == 8 else "fast4"
    print(f"\n{args.bits}-bit scan, Gcodes/s, N = {N}, nq = {nq}, k = {k}, {args.threads} thread(s); "
          f"FAISS {faiss.__version__} ({'IndexPQ' if args.bits == 8 else 'IndexPQFastScan'})")
    head = (f"{'M':>3} | {'avx512':>9} {'avx2':>9} | {peer:>9} {peer + ' avx2':>10} | {'x ' + peer:>8} {'x avx2':>7}"
            + (f" | {'recall':>6} {'f.recall':>8}" if args.bits == 4 else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        ours, ours2 = r.get("opqn_avx512_gcodes_s"), r.get("opqn_avx2_gcodes_s")
        line = (f"{r['M']:>3} | {cell(ours, 9, 3)} {cell(ours2, 9, 3)} | {cell(r['faiss_gcodes_s'], 9, 3)} "
                f"{cell(r['faiss_avx2_gcodes_s'], 10, 3)} | {cell(ratio(ours, r['faiss_gcodes_s']), 8, 2)} "
                f"{cell(ratio(ours2, r['faiss_avx2_gcodes_s']), 7, 2)}")
        if args.bits == 4:
            line += f" | {r['recall_opqn']:>6.3f} {r['recall_faiss']:>8.3f}"
        print(line)
    write_results(args.json, f"adc_books{'' if args.bits == 8 else '4'}.json", {"rows": rows})


if __name__ == "__main__":
    main()
