"""Forward+backward time of the fused soft_quantize against the eager PyTorch reference
(opqn_ext/reference.py, batched einsum), torch.compile(reference), and the per-book Python loop
of the paper's released code, at OPQN training shapes (DESIGN.md section 6).

Training setting: x ([B, M*d], like a BatchNorm'd feature: N(0, 1)) and assign_weight
(Xavier-uniform, as the paper initializes it) require grad, the orthonormal DCT codebook is fixed,
and the loss reaches the op through `quantized` and `entropy`. Two regimes:
  dense  - scale 1: the soft assignments of a freshly initialized model (high entropy);
  peaked - scale 20: low-entropy assignments, as the entropy regularizer drives them in training.
Correctness is checked before anything is timed: every peer against the reference computed in
float64 (the largest error, relative to each output's magnitude, goes to the JSON). On CUDA, the
fused op and the eager reference are also timed as one captured CUDA graph per step (columns
"graph"): replaying it leaves out the host's dispatch and launch work, so those columns compare
device time alone. Each sample there is GRAPH_REPLAYS replays back to back between two CUDA events
(per replay: their elapsed time over GRAPH_REPLAYS), since a replay waited for one at a time would
measure the launch and the wait (some 0.05 ms) more than the kernels.

Column "gemms": the five batched matrix products of the step alone (x @ A, probs @ C^T,
grad_quantized @ C, g @ A^T, x^T @ g, with torch.bmm into preallocated outputs, batch-major and
contiguous: BLAS's best case), which every formulation that keeps all K words of every row must
compute; "eager/gemms" is therefore the most any such formulation, fused or not, could gain over
the eager reference on this BLAS. The peaked rows' fused op skips most of the words (csrc/cpu/
peaked_products.h), so there the bound does not hold.

On the CPU, glibc's malloc hands freed memory at the top of its heap back to the system once more
than a threshold is free there, so a process whose steps free and reallocate a few hundred KiB
across that line page-faults on every step (300 faults a step, 0.9 -> 1.7 ms at 8 x 64 x 64 for
the fused op alone), depending on its allocation history; --keep-heap raises glibc's trim and mmap
thresholds for every peer, which takes that noise out of the runs.

    python benchmarks/bench_soft_quantize.py [--device cuda] [--repeats N] [--json PATH] [--flush-denormal] [--keep-heap]
"""
import argparse
import ctypes
import ctypes.util
import json
import math
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import opqn_ext
from opqn_ext import reference

SHAPES = [  # (B, M, d, K): D = M * d
    (256, 4, 128, 64),
    (256, 8, 64, 64),
    (256, 8, 256, 256),
]
REGIMES = {"dense": 1.0, "peaked": 20.0}


def per_book_loop(x, assign_weight, codebook, scale=1.0, normalize=False):
    """The formulation of the paper's released code: a Python loop over books."""
    d = assign_weight.shape[1]
    probs, quantized, entropy = [], [], []
    for m, xm in enumerate(torch.split(x, d, dim=1)):
        if normalize:
            xm = F.normalize(xm, dim=1)
        log_p = F.log_softmax(scale * (xm @ assign_weight[m]), dim=1)
        p = log_p.exp()
        probs.append(p)
        quantized.append(p @ codebook[m].t())
        entropy.append(-(p * log_p).sum(1))
    return torch.stack(probs, 1), torch.stack(quantized, 1), torch.stack(entropy, 1)


def make_inputs(B, M, d, K, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, M * d, generator=g, dtype=dtype).to(device).requires_grad_()
    bound = math.sqrt(6.0 / (d + K))  # Xavier-uniform
    a = ((torch.rand(M, d, K, generator=g, dtype=dtype) * 2 - 1) * bound).to(device).requires_grad_()
    c = opqn_ext.orthonormal_codebooks(M, d, K, dtype=dtype, device=device)
    grad_q = torch.randn(B, M, d, generator=g, dtype=dtype).to(device)
    grad_h = torch.full((B, M), 0.1, dtype=dtype).to(device)
    return x, a, c, grad_q, grad_h


def step(fn, scale, x, a, c, grad_q, grad_h):
    x.grad = a.grad = None
    _, q, h = fn(x, a, c, scale, False)
    torch.autograd.backward([q, h], [grad_q, grad_h])
    return q, h, x.grad, a.grad


def check(got, want, what):
    """got (float32) against want (the reference in float64): each element within 1e-4 of it
    relative, or 1e-4 of the output's largest magnitude, since the weight gradients are sums over
    the batch whose terms cancel. Returns the largest error relative to that magnitude."""
    worst = 0.0
    for name, u, v in zip(("quantized", "entropy", "grad_x", "grad_assign_weight"), got, want):
        size = max(1.0, v.abs().max().item())
        torch.testing.assert_close(u.double(), v, rtol=1e-4, atol=1e-4 * size,
                                   msg=lambda m: f"{what} {name}: {m}")
        worst = max(worst, (u.double() - v).abs().max().item() / size)
    return worst


def gemm_floor(B, M, d, K, device, dtype):
    """The five batched products of a training step, into preallocated outputs (see the module
    docstring); returns a function that runs them."""
    g = torch.Generator().manual_seed(1)
    x, grad_q = (torch.randn(M, B, d, generator=g, dtype=dtype).to(device) for _ in range(2))
    a, c = (torch.randn(M, d, K, generator=g, dtype=dtype).to(device) for _ in range(2))
    probs = torch.rand(M, B, K, generator=g, dtype=dtype).to(device)
    logits, grad_p = torch.empty_like(probs), torch.empty_like(probs)
    quantized, grad_x = torch.empty_like(x), torch.empty_like(x)
    grad_a = torch.empty_like(a)

    def run():
        torch.bmm(x, a, out=logits)
        torch.bmm(probs, c.transpose(1, 2), out=quantized)
        torch.bmm(grad_q, c, out=grad_p)
        torch.bmm(grad_p, a.transpose(1, 2), out=grad_x)
        torch.bmm(x.transpose(1, 2), grad_p, out=grad_a)

    return run


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


def graph_replay(fn, scale, inputs):
    """The training step of fn captured in a CUDA graph (after warm-up on a side stream, as
    torch.cuda.graph asks); returns its replay, or the reason the capture failed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step(fn, scale, *inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step(fn, scale, *inputs)
    except RuntimeError as error:
        return f"capture failed: {error}"
    return graph.replay


GRAPH_REPLAYS = 20


def graph_ms(replay, repeats):
    """Median over `repeats` samples of the device time of one replay: GRAPH_REPLAYS replays queued
    back to back, timed by CUDA events on the current stream."""
    for _ in range(3):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(GRAPH_REPLAYS):
            replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / GRAPH_REPLAYS)
    return statistics.median(samples)


def add_graph_timings(rows, peers, device, repeats):
    """Adds fused_graph_ms, eager_graph_ms and x_eager_graph (None where a capture failed) to every
    row, and prints them."""
    print("\nas CUDA graphs (device time without host overhead, ms):")
    print(f"{'regime':>7} {'B':>4} {'M':>2} {'d':>4} {'K':>4} | {'fused':>7} {'eager':>7} | {'x eager':>7}")
    for r in rows:
        inputs = make_inputs(r["B"], r["M"], r["d"], r["K"], device, torch.float32)
        for name in ("fused", "eager"):
            replay = graph_replay(peers[name], r["scale"], inputs)
            if isinstance(replay, str):
                print(f"{name}: {replay}")
            r[f"{name}_graph_ms"] = None if isinstance(replay, str) else graph_ms(replay, repeats)
        both = r["fused_graph_ms"] is not None and r["eager_graph_ms"] is not None
        r["x_eager_graph"] = r["eager_graph_ms"] / r["fused_graph_ms"] if both else None
        cells = [f"{v:>7.3f}" if v is not None else f"{'n/a':>7}"
                 for v in (r["fused_graph_ms"], r["eager_graph_ms"], r["x_eager_graph"])]
        print(f"{r['regime']:>7} {r['B']:>4} {r['M']:>2} {r['d']:>4} {r['K']:>4} | {cells[0]} {cells[1]} | {cells[2]}")


def keep_heap():
    """glibc's malloc keeps freed memory: trim threshold 1 GiB, blocks up to 32 MiB (its largest mmap
    threshold) from the heap. False without glibc."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 25))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", default=None, help="where to write results (default benchmarks/results/)")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="torch.set_flush_denormal(True) for every peer (CPU: subnormals become 0)")
    parser.add_argument("--keep-heap", action="store_true",
                        help="glibc's malloc keeps freed memory instead of returning it (no page faults from its trims)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        raise SystemExit("this CPU cannot flush denormals")
    if args.keep_heap and not keep_heap():
        raise SystemExit("--keep-heap needs glibc's mallopt")
    compiled = torch.compile(reference.soft_quantize)
    peers = {"fused": opqn_ext.soft_quantize, "eager": reference.soft_quantize, "compile": compiled,
             "per_book_loop": per_book_loop}
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = (f"{platform.machine()} CPU, {torch.get_num_threads()} threads, "
                 f"opqn ISA {opqn_ext.build_info()['active_cpu_isa']}")
    file_name = f"soft_quantize_{device.type}{'_ftz' if args.flush_denormal else ''}{'_keep_heap' if args.keep_heap else ''}.json"
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", file_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows = []

    def write_json():
        with open(path, "w") as f:
            json.dump({"device": where, "torch": torch.__version__, "dtype": "float32",
                       "flush_denormal": args.flush_denormal, "keep_heap": args.keep_heap, "rows": rows}, f, indent=2)

    ftz = (", subnormals flushed to zero" if args.flush_denormal else "") + (", heap kept" if args.keep_heap else "")
    print(f"soft_quantize forward+backward (ms, median of {args.repeats}), float32, {where}{ftz}, torch {torch.__version__}")
    head = (f"{'regime':>7} {'B':>4} {'M':>2} {'d':>4} {'K':>4} {'H/logK':>6} | {'fused':>7} {'eager':>7} "
            f"{'compile':>7} {'loop':>7} | {'x eager':>7} {'x compile':>9} {'x loop':>6} | {'gemms':>7} {'eager/gemms':>11}")
    print(head)
    print("-" * len(head))
    for regime, scale in REGIMES.items():
        for B, M, d, K in SHAPES:
            inputs = make_inputs(B, M, d, K, device, torch.float32)
            exact = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
            want = [t.detach() for t in step(reference.soft_quantize, scale, *exact)]
            errors = {name: check([t.detach().clone() for t in step(fn, scale, *inputs)], want, name)
                      for name, fn in peers.items()}
            with torch.no_grad():
                entropy = opqn_ext.soft_quantize(inputs[0], inputs[1], inputs[2], scale).entropy
            r = {"regime": regime, "scale": scale, "B": B, "M": M, "d": d, "K": K,
                 "entropy_over_log_k": float(entropy.mean() / math.log(K)),
                 **{f"{name}_error_vs_float64": e for name, e in errors.items()}}
            for name, fn in peers.items():
                r[f"{name}_ms"] = time_ms(lambda: step(fn, scale, *inputs), device, args.repeats)
            for name in ("eager", "compile", "per_book_loop"):
                r[f"x_{name}"] = r[f"{name}_ms"] / r["fused_ms"]
            r["gemms_ms"] = time_ms(gemm_floor(B, M, d, K, device, torch.float32), device, args.repeats)
            r["eager_over_gemms"] = r["eager_ms"] / r["gemms_ms"]
            rows.append(r)
            write_json()  # row by row, so that a run stopped early keeps what it measured
            print(f"{r['regime']:>7} {r['B']:>4} {r['M']:>2} {r['d']:>4} {r['K']:>4} {r['entropy_over_log_k']:>6.2f} | "
                  f"{r['fused_ms']:>7.3f} {r['eager_ms']:>7.3f} {r['compile_ms']:>7.3f} {r['per_book_loop_ms']:>7.3f} | "
                  f"{r['x_eager']:>7.2f} {r['x_compile']:>9.2f} {r['x_per_book_loop']:>6.2f} | "
                  f"{r['gemms_ms']:>7.3f} {r['eager_over_gemms']:>11.2f}", flush=True)
    print(f"wrote {path}")
    if device.type == "cuda":  # after the eager-mode results are out, in case a capture breaks CUDA
        add_graph_timings(rows, peers, device, args.repeats)
        write_json()
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
