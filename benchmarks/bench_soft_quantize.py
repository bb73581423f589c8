"""Forward+backward time of the fused soft_quantize against the eager PyTorch reference and
against torch.compile(reference), at OPQN training shapes (DESIGN.md section 6).

Training setting: x and assign_weight require grad, the orthonormal codebook is fixed, and the
loss reaches the op through `quantized` and `entropy`. Correctness is checked before timing.

    python benchmarks/bench_soft_quantize.py [--device cuda] [--json PATH]
"""
import argparse
import json
import os
import platform
import statistics
import time

import torch

import opqn_ext
from opqn_ext import reference

SHAPES = [  # (B, M, d, K): D = M * d
    (256, 4, 128, 64),
    (256, 8, 64, 64),
    (256, 8, 256, 256),
]


def make_inputs(B, M, d, K, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M * d, generator=g, dtype=dtype).to(device).requires_grad_()
    a = (torch.randn(M, d, K, generator=g, dtype=dtype) / d**0.5).to(device).requires_grad_()
    c = opqn_ext.orthonormal_codebooks(M, d, K, dtype=dtype, device=device)
    grad_q = torch.randn(B, M, d, generator=g, dtype=dtype).to(device)
    grad_h = torch.full((B, M), 0.1, dtype=dtype).to(device)
    return x, a, c, grad_q, grad_h


def step(fn, x, a, c, grad_q, grad_h, scale=1.0):
    x.grad = a.grad = None
    _, q, h = fn(x, a, c, scale, False)
    torch.autograd.backward([q, h], [grad_q, grad_h])
    return q, h, x.grad, a.grad


def check(fused, ref, rtol, atol):
    for name, got, want in zip(("quantized", "entropy", "grad_x", "grad_assign_weight"), fused, ref):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def time_ms(fn, device, repeats, warmup=5):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.float32
    compiled = torch.compile(reference.soft_quantize)
    rows = []
    for B, M, d, K in SHAPES:
        inputs = make_inputs(B, M, d, K, device, dtype)
        got = [t.detach().clone() for t in step(opqn_ext.soft_quantize, *inputs)]
        want = [t.detach().clone() for t in step(reference.soft_quantize, *inputs)]
        check(got, want, rtol=1e-4, atol=1e-4)
        check([t.detach().clone() for t in step(compiled, *inputs)], want, rtol=1e-4, atol=1e-4)
        t_fused = time_ms(lambda: step(opqn_ext.soft_quantize, *inputs), device, args.repeats)
        t_eager = time_ms(lambda: step(reference.soft_quantize, *inputs), device, args.repeats)
        t_comp = time_ms(lambda: step(compiled, *inputs), device, args.repeats)
        rows.append({"B": B, "M": M, "d": d, "K": K, "fused_ms": t_fused, "eager_ms": t_eager,
                     "compile_ms": t_comp, "speedup_vs_eager": t_eager / t_fused,
                     "speedup_vs_compile": t_comp / t_fused})

    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, ISA {opqn_ext.build_info()['active_cpu_isa']}"
    print(f"soft_quantize forward+backward, float32, {where}, torch {torch.__version__}")
    print(f"{'B':>5} {'M':>3} {'d':>4} {'K':>4} | {'fused ms':>9} {'eager ms':>9} {'compile ms':>10} | {'x eager':>8} {'x compile':>9}")
    for r in rows:
        print(f"{r['B']:>5} {r['M']:>3} {r['d']:>4} {r['K']:>4} | {r['fused_ms']:>9.3f} {r['eager_ms']:>9.3f} "
              f"{r['compile_ms']:>10.3f} | {r['speedup_vs_eager']:>8.2f} {r['speedup_vs_compile']:>9.2f}")
    path = args.json or os.path.join(os.path.dirname(__file__), "results", f"soft_quantize_{device.type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": where, "torch": torch.__version__, "dtype": "float32", "rows": rows}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
