"""Where a soft_quantize training step spends its time on a GPU, for benchmarks/gpu_check.sh.

On the H200 of 2026-12-04 the fused step took 0.33-0.55 ms against 0.05-0.12 ms of device time
(bench_soft_quantize.py's CUDA graph columns): host-bound. Two views of one shape's step
(bench_soft_quantize.py's training step, float32):

    python benchmarks/gpu_profile_soft_quantize.py --host-profile   # torch.profiler, host and device
    ncu --kernel-name regex:soft_quantize ... python benchmarks/gpu_profile_soft_quantize.py --steps 6

--host-profile times the fused and the eager step and prints torch.profiler's table of each (the
ops' host time, their kernels' device time, how many launches), and times the step's harness alone
(`floor`: the same step around two views of the inputs in place of the op), the least any step can
take there; without it, the script only runs --steps fused steps after a warm-up, for a kernel
profiler to capture.
"""
import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import opqn_ext
from opqn_ext import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_soft_quantize import make_inputs, step  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn, device, steps):
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3 / steps


def floor(x, assign_weight, codebook, scale, normalize):
    """The step's harness without the op: views of the inputs shaped as its outputs, so that the
    step still runs its autograd graph, backward and gradient accumulation."""
    B, (M, d, _) = x.shape[0], assign_weight.shape
    return None, x.view(B, M, d), assign_weight[:, 0, 0].expand(B, M)


def host_profile(peers, inputs, scale, device, steps):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in peers.items():
        run = lambda: step(fn, scale, *inputs)  # noqa: E731
        for _ in range(10):
            run()
        print(f"\n{name}: {wall_ms(run, device, steps):.3f} ms a step (wall, {steps} steps)")
        with profile(activities=activities) as prof:
            for _ in range(steps):
                run()
            sync(device)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by=sort, row_limit=10))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs=4, default=[256, 8, 64, 64], metavar=("B", "M", "d", "K"))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--host-profile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    inputs = make_inputs(*args.shape, device, torch.float32)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"soft_quantize step, B M d K = {args.shape}, scale {args.scale}, {where}, torch {torch.__version__}")
    if args.host_profile:
        run_floor = lambda: step(floor, args.scale, *inputs)  # noqa: E731
        for _ in range(10):
            run_floor()
        print(f"floor (the step without the op): {wall_ms(run_floor, device, args.steps):.3f} ms a step")
        host_profile({"fused": opqn_ext.soft_quantize, "eager": reference.soft_quantize}, inputs, args.scale,
                     device, args.steps)
        return
    for _ in range(3):
        step(opqn_ext.soft_quantize, args.scale, *inputs)
    sync(device)
    for _ in range(args.steps):
        step(opqn_ext.soft_quantize, args.scale, *inputs)
    sync(device)


if __name__ == "__main__":
    main()
