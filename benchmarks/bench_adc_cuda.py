"""CUDA ADC top-k scan at N = 10M-100M against a torch gather + topk baseline (issue 3), for 8-bit
codes (M = 8, adc_topk) and 4-bit codes (M = 16, adc_topk4 on the packed layout, also against
adc_topk on the same codes a byte each).

All scan the same codes with the same tables; the gather baseline computes the scores of a chunk of
codes with gathers (one per book), takes its top-k with torch.topk and merges chunks. Results are
checked against each other (equal scores; the same ids apart from ties) before timing.

    python benchmarks/bench_adc_cuda.py [--sizes 10000000 100000000] [--json PATH]
"""
import argparse
import functools
import json
import os
import statistics

import torch

import opqn_ext

CHUNK = 1 << 24


def gather_topk(lut, codes, k):
    """The baseline: chunked gather scoring, torch.topk per chunk, merged."""
    nq, M, K = lut.shape
    best_s, best_i = None, None
    for first in range(0, codes.shape[0], CHUNK):
        c = codes[first:first + CHUNK].long()
        s = torch.zeros(nq, c.shape[0], device=lut.device)
        for m in range(M):
            s += lut[:, m, :].gather(1, c[:, m].unsqueeze(0).expand(nq, -1))
        cs, ci = s.topk(min(k, c.shape[0]), dim=1)
        ci = ci + first
        if best_s is None:
            best_s, best_i = cs, ci
        else:
            all_s, all_i = torch.cat([best_s, cs], 1), torch.cat([best_i, ci], 1)
            best_s, order = all_s.topk(k, dim=1)
            best_i = all_i.gather(1, order)
    return best_s, best_i


def cuda_ms(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(label, N, nq, k, ours, baselines, repeats):
    """Times ours() against each baseline (name -> fn), after checking they return equal scores."""
    s, _ = ours()
    for fn in baselines.values():
        torch.testing.assert_close(s, fn()[0], rtol=0, atol=1e-5)
    row = {"layout": label, "N": N, "nq": nq, "k": k, "opqn_ms": cuda_ms(ours, repeats)}
    for name, fn in baselines.items():
        row[f"{name}_ms"] = cuda_ms(fn, repeats)
        row[f"x_{name}"] = row[f"{name}_ms"] / row["opqn_ms"]
    row["opqn_gcodes_s"] = N * nq / row["opqn_ms"] / 1e6
    print({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
    return row


def measure_8bit(N: int, dev: torch.device, repeats: int) -> list[dict]:
    codes = torch.randint(0, 256, (N, 8), dtype=torch.uint8, device=dev)  # 8-bit, M = 8
    rows = []
    for nq in (1, 100):
        lut = torch.rand(nq, 8, 256, device=dev)
        for k in (10, 100, 1024):
            rows.append(measure("8-bit M=8", N, nq, k, functools.partial(opqn_ext.adc_topk, lut, codes, k),
                                {"gather": functools.partial(gather_topk, lut, codes, k)}, repeats))
    return rows


def measure_4bit(N: int, dev: torch.device, repeats: int) -> list[dict]:
    codes16 = torch.randint(0, 16, (N, 16), dtype=torch.uint8, device=dev)  # 4-bit, M = 16
    packed = opqn_ext.pack_codes4(codes16)
    rows = []
    for nq in (1, 100):
        lut = torch.rand(nq, 16, 16, device=dev)
        for k in (10, 100):
            rows.append(measure("4-bit M=16", N, nq, k, functools.partial(opqn_ext.adc_topk4, lut, packed, k),
                                {"adc_topk": functools.partial(opqn_ext.adc_topk, lut, codes16, k),
                                 "gather": functools.partial(gather_topk, lut, codes16, k)}, repeats))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000_000, 100_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = []
    for N in args.sizes:  # the codes of one layout at a time: 100M x 16 bytes is 1.6 GB
        rows += measure_8bit(N, dev, args.repeats)
        rows += measure_4bit(N, dev, args.repeats)
    name = torch.cuda.get_device_name(dev)
    print(f"\nCUDA ADC top-k, {name}, torch {torch.__version__}: Gcodes/s = codes x queries per second; "
          "x = baseline time / opqn time (adc_topk: the 4-bit codes unpacked, one byte each)")
    print(f"{'layout':>10} {'N':>10} {'nq':>4} {'k':>5} | {'opqn ms':>8} {'Gcodes/s':>8} | {'x gather':>8} {'x adc_topk':>10}")
    for r in rows:
        print(f"{r['layout']:>10} {r['N']:>10} {r['nq']:>4} {r['k']:>5} | {r['opqn_ms']:>8.3f} {r['opqn_gcodes_s']:>8.2f} | "
              f"{r['x_gather']:>8.2f} {r.get('x_adc_topk', float('nan')):>10.2f}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "adc_cuda.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
