"""The forward of soft_quantize without gradients for a few queries: what a search computes for
its queries' tables (OPQNIndex.query_lut), and what encode computes for a few new items, at batches
of 1-256 queries, against the eager reference (opqn_ext/reference.py, batched einsum) under
no_grad. A forward of up to 2^21 multiply-adds a product runs the row loops (csrc/cpu/row_kernels.h),
larger ones the batched BLAS products. Results are checked against the reference first; the best
of 5 rounds of repeated calls, microseconds per call.

    python benchmarks/bench_query_tables.py [--batches 1 2 4 ...] [--json PATH]
"""
import argparse
import json
import os
import platform
import time

import torch

import opqn_ext
from opqn_ext import reference

SHAPES = [(8, 64, 64), (4, 128, 64), (16, 32, 16), (2, 256, 256)]  # (M, d, K)


def best_us(fn, seconds=0.2):
    fn()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds / 5 or n < 3:
        fn()
        n += 1
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return min(rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/)")
    args = parser.parse_args()
    rows = []
    where = (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, "
             f"opqn ISA {opqn_ext.build_info()['active_cpu_isa']}, torch {torch.__version__}")
    print(f"soft_quantize forward, no grad, float32, normalize ({where}): us per call")
    print(f"{'M':>3} {'d':>4} {'K':>4} {'nq':>4} | {'fused':>8} {'eager':>8} | {'x eager':>7}")
    with torch.no_grad():
        for M, d, K in SHAPES:
            a = torch.randn(M, d, K, generator=torch.Generator().manual_seed(0)) * (2.0 / (d + K)) ** 0.5
            c = opqn_ext.orthonormal_codebooks(M, d, K)
            for nq in args.batches:
                x = torch.randn(nq, M * d, generator=torch.Generator().manual_seed(nq))
                got = opqn_ext.soft_quantize(x, a, c, 1.0, True)
                want = reference.soft_quantize(x, a, c, 1.0, True)
                for name, u, v in zip(("probs", "quantized", "entropy"), got, want):
                    torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
                fused = best_us(lambda: opqn_ext.soft_quantize(x, a, c, 1.0, True))
                eager = best_us(lambda: reference.soft_quantize(x, a, c, 1.0, True))
                rows.append({"M": M, "d": d, "K": K, "nq": nq, "fused_us": fused, "eager_us": eager,
                             "x_eager": eager / fused})
                print(f"{M:>3} {d:>4} {K:>4} {nq:>4} | {fused:>8.1f} {eager:>8.1f} | {eager / fused:>7.2f}", flush=True)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "query_tables.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": where, "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
