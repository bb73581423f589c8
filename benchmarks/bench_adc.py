"""ADC top-k scan of opqn_ext against FAISS on the same codes and tables (issue 3, DESIGN.md section 6).

OPQN setting: M books of K = 256 orthonormal codewords (dimension d = 256, so D = 2048: the 64-bit
configuration 8 x 256), uniform random database codes, queries = soft-quantized vectors s of random
features. FAISS IndexPQ (inner product) gets the OPQN codewords as centroids and our codes as its
codes; queried with s, its tables are <s_m, c_mk> = probs (orthonormality), so both rank the same
codes. That is checked first (scores equal within float rounding, the same top-k apart from
near-ties), then everything is timed. Peers: FAISS IndexPQ (8-bit, M = 8) for adc_topk, FAISS
IndexPQFastScan (4-bit, M = 16 books of 16 words, its own 8-bit quantized tables) for adc_topk4 on
the packed codes (recall@k of both against the exact 4-bit ranking), and a naive torch gather +
topk. Bandwidth: codes bytes scanned per second against a measured DRAM read rate. Where the
active CPU path is AVX-512, both scans are also timed on the AVX2 path, in the same run, against
FAISS on its AVX2 path too where its dynamic dispatch allows (`faiss.SIMDConfig`): what a CPU
without AVX-512 runs (`avx2 8b`, `PQ avx2`, `avx2 4b`, `f4 avx2`, and their ratios `x avx2`).

    python benchmarks/bench_adc.py [--sizes 1000000 8000000] [--json PATH]
"""
import argparse
import json
import os
import platform
import statistics
import time

import faiss
import numpy as np
import torch

import opqn_ext
from opqn_ext import reference


def median_seconds(fn, repeats):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def dram_read_gbps():
    """Read bandwidth of a 1 GiB float32 sum over both threads (a lower bound of the machine's)."""
    x = torch.ones(1 << 28)
    seconds = median_seconds(lambda: x.sum(), 5)
    return x.numel() * 4 / seconds / 1e9


def opqn_queries(M, d, K, nq, seed):
    """Soft-quantized query vectors [nq, M*d] and their tables (probs) [nq, M, K]."""
    g = torch.Generator().manual_seed(seed)
    codebook = opqn_ext.orthonormal_codebooks(M, d, K)
    assign = torch.randn(M, d, K, generator=g) * (2.0 / (d + K)) ** 0.5
    x = torch.randn(nq, M * d, generator=g)
    probs, quantized, _ = opqn_ext.soft_quantize(x, assign, codebook, scale=8.0, normalize=True)
    return codebook, quantized.reshape(nq, M * d).contiguous(), probs.contiguous()


def faiss_pq(codebook, codes, nbits):
    """IndexPQ (inner product) whose centroids are the OPQN codewords and whose codes are ours."""
    M, d, K = codebook.shape
    index = faiss.IndexPQ(M * d, M, nbits, faiss.METRIC_INNER_PRODUCT)
    centroids = np.zeros((M, 1 << nbits, d), dtype=np.float32)
    centroids[:, :K, :] = codebook.permute(0, 2, 1).numpy()
    faiss.copy_array_to_vector(centroids.ravel(), index.pq.centroids)
    index.is_trained = True
    packed = codes.numpy() if nbits == 8 else (codes[:, 0::2] | (codes[:, 1::2] << 4)).numpy()
    faiss.copy_array_to_vector(np.ascontiguousarray(packed).ravel(), index.codes)
    index.ntotal = codes.shape[0]
    return index


def check_same_ranking(ours, theirs, k):
    (s, i), (fs, fi) = ours, theirs
    fs, fi = torch.from_numpy(fs), torch.from_numpy(fi)
    torch.testing.assert_close(s, fs, rtol=0, atol=1e-5)
    differ = i != fi
    # positions may swap only between codes whose scores agree to rounding
    assert bool((~differ | (s - fs).abs().le(1e-5)).all()), "FAISS and opqn_ext rank different codes"
    return float(differ.float().mean())


def on_isa(isa, fn):
    """fn() with the CPU kernel path `isa`, restoring the active one."""
    before = opqn_ext._C.active_cpu_isa()
    opqn_ext._C.set_cpu_isa(isa)
    try:
        return fn()
    finally:
        opqn_ext._C.set_cpu_isa(before)


def on_faiss_avx2(fn):
    """fn() with FAISS dispatching to its AVX2 kernels, restoring its level; None where it cannot."""
    config = getattr(faiss, "SIMDConfig", None)
    if (config is None or not config.has_dynamic_dispatch()
            or not config.is_simd_level_available(faiss.SIMDLevel_AVX2)):
        return None
    before = config.get_level()
    config.set_level(faiss.SIMDLevel_AVX2)
    try:
        return fn()
    finally:
        config.set_level(before)


def write_results(path, default_name, payload):
    """Writes payload as JSON to path, or to benchmarks/results/default_name."""
    path = path or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", default_name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {path}")


def ratio(peer, ours):
    return peer / ours if peer and ours else None


def cell(value, width, digits):
    """value right-aligned in width with digits decimals, or '-' where it is missing."""
    return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def recall(found, exact):
    """Mean fraction of the exact top-k ids that were found."""
    return float(sum(len(set(f.tolist()) & set(e.tolist())) for f, e in zip(found, exact)) / exact.numel())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 8_000_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    bandwidth = dram_read_gbps()
    with_avx2 = opqn_ext._C.active_cpu_isa() == "avx512"
    M, d, K = 8, 256, 256
    M4, d4, K4 = 16, 16, 16
    rows = []
    for N in args.sizes:
        g = torch.Generator().manual_seed(N)
        codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.uint8)
        codes4 = torch.randint(0, K4, (N, M4), generator=g, dtype=torch.uint8)
        for nq in (1, 100):
            codebook, queries, lut = opqn_queries(M, d, K, nq, seed=nq)
            codebook4, queries4, lut4 = opqn_queries(M4, d4, K4, nq, seed=nq + 1)
            pq = faiss_pq(codebook, codes, 8)
            fast = faiss.IndexPQFastScan(faiss_pq(codebook4, codes4, 4))
            packed4 = opqn_ext.pack_codes4(codes4)
            for k in (10, 100):
                exact = opqn_ext.adc_topk(lut, codes, k)
                swapped = check_same_ranking(exact, pq.search(queries.numpy(), k), k)
                exact4 = opqn_ext.adc_topk(lut4, codes4, k)[1]
                recall_ours4 = recall(opqn_ext.adc_topk4(lut4, packed4, k)[1], exact4)
                recall_fast4 = recall(torch.from_numpy(fast.search(queries4.numpy(), k)[1]), exact4)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    faiss.omp_set_num_threads(threads)
                    t_ours = median_seconds(lambda: opqn_ext.adc_topk(lut, codes, k), args.repeats)
                    t_pq = median_seconds(lambda: pq.search(queries.numpy(), k), args.repeats)
                    t_fast = median_seconds(lambda: fast.search(queries4.numpy(), k), args.repeats)
                    t_ours4 = median_seconds(lambda: opqn_ext.adc_topk4(lut4, packed4, k), args.repeats)
                    t_avx2 = t_pq_avx2 = t_avx2_4 = t_fast_avx2 = None
                    if with_avx2:
                        t_avx2 = on_isa("avx2", lambda: median_seconds(lambda: opqn_ext.adc_topk(lut, codes, k),
                                                                       args.repeats))
                        t_avx2_4 = on_isa("avx2", lambda: median_seconds(
                            lambda: opqn_ext.adc_topk4(lut4, packed4, k), args.repeats))
                        t_pq_avx2 = on_faiss_avx2(lambda: median_seconds(lambda: pq.search(queries.numpy(), k),
                                                                         args.repeats))
                        t_fast_avx2 = on_faiss_avx2(lambda: median_seconds(
                            lambda: fast.search(queries4.numpy(), k), args.repeats))
                    t_naive = None
                    if N * nq <= 100_000_000:
                        t_naive = median_seconds(lambda: reference.adc_scores(lut, codes).topk(k, dim=1), 1)
                    scanned = N * nq
                    row = {
                        "N": N, "nq": nq, "k": k, "threads": threads,
                        "opqn_gcodes_s": scanned / t_ours / 1e9,
                        "opqn_avx2_gcodes_s": scanned / t_avx2 / 1e9 if t_avx2 else None,
                        "faiss_pq_avx2_gcodes_s": scanned / t_pq_avx2 / 1e9 if t_pq_avx2 else None,
                        "x_avx2_faiss_pq_avx2": ratio(t_pq_avx2, t_avx2),
                        "faiss_pq_gcodes_s": scanned / t_pq / 1e9,
                        "faiss_fastscan_gcodes_s": scanned / t_fast / 1e9,
                        "opqn4_gcodes_s": scanned / t_ours4 / 1e9,
                        "x4_faiss_fastscan": t_fast / t_ours4,
                        "opqn4_avx2_gcodes_s": scanned / t_avx2_4 / 1e9 if t_avx2_4 else None,
                        "faiss_fastscan_avx2_gcodes_s": scanned / t_fast_avx2 / 1e9 if t_fast_avx2 else None,
                        "x4_avx2_faiss_fastscan_avx2": ratio(t_fast_avx2, t_avx2_4),
                        "recall_opqn4": recall_ours4,
                        "recall_faiss_fastscan": recall_fast4,
                        "naive_torch_gcodes_s": scanned / t_naive / 1e9 if t_naive else None,
                        "x_faiss_pq": t_pq / t_ours,
                        "x_naive_torch": t_naive / t_ours if t_naive else None,
                        "opqn_code_gbps": N * M * (1 if nq == 1 else nq) / t_ours / 1e9,
                        "positions_swapped_on_ties": swapped,
                    }
                    row["bandwidth_fraction"] = (N * M / t_ours / 1e9) / bandwidth if nq == 1 else None
                    rows.append(row)
                    print({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}, flush=True)
    torch.set_num_threads(2)
    faiss_level = faiss.SIMDConfig.get_level_name() if hasattr(faiss, "SIMDConfig") else "static"
    where = (f"{platform.machine()} CPU, FAISS {faiss.__version__} ({faiss.get_compile_options().strip()}; level "
             f"{faiss_level}), torch {torch.__version__}, ISA {opqn_ext.build_info()['active_cpu_isa']}")
    print(f"\nADC top-k scan, Gcodes/s (codes x queries per second); {where}; DRAM read {bandwidth:.1f} GB/s")
    print("8-bit: M=8 x 256 words; 4-bit: M=16 x 16 words; recall@k against exact ADC; BW frac: nq=1 code bytes/s over DRAM read")
    head = (f"{'N':>9} {'nq':>4} {'k':>4} {'thr':>3} | {'opqn 8b':>8} {'faiss PQ':>8} {'x PQ':>6}"
            f" {'avx2 8b':>8} {'PQ avx2':>8} {'x avx2':>6} {'naive':>7} {'x naive':>7} {'BW frac':>7} |"
            f" {'opqn 4b':>8} {'fast4':>7} {'x fast4':>7} {'avx2 4b':>8} {'f4 avx2':>8} {'x avx2':>6}"
            f" {'recall':>6} {'f.recall':>8}")
    print(head)
    print("-" * len(head))

    for r in rows:
        print(f"{r['N']:>9} {r['nq']:>4} {r['k']:>4} {r['threads']:>3} | {r['opqn_gcodes_s']:>8.3f} "
              f"{r['faiss_pq_gcodes_s']:>8.3f} {r['x_faiss_pq']:>6.2f} {cell(r['opqn_avx2_gcodes_s'], 8, 3)} "
              f"{cell(r['faiss_pq_avx2_gcodes_s'], 8, 3)} {cell(r['x_avx2_faiss_pq_avx2'], 6, 2)} "
              f"{cell(r['naive_torch_gcodes_s'], 7, 3)} {cell(r['x_naive_torch'], 7, 1)} "
              f"{cell(r['bandwidth_fraction'], 7, 2)} | {r['opqn4_gcodes_s']:>8.3f} "
              f"{r['faiss_fastscan_gcodes_s']:>7.3f} {r['x4_faiss_fastscan']:>7.2f} "
              f"{cell(r['opqn4_avx2_gcodes_s'], 8, 3)} {cell(r['faiss_fastscan_avx2_gcodes_s'], 8, 3)} "
              f"{cell(r['x4_avx2_faiss_fastscan_avx2'], 6, 2)} {r['recall_opqn4']:>6.3f} "
              f"{r['recall_faiss_fastscan']:>8.3f}")
    write_results(args.json, "adc_cpu.json", {"device": where, "dram_read_gbps": bandwidth, "rows": rows})


if __name__ == "__main__":
    main()
