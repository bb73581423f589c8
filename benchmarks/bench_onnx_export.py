"""The graph `opqn export` writes, run by ONNX Runtime, and its AOTInductor package (`-o
model.pt2`, run by torch._inductor.aoti_load_package), against the same model in PyTorch (eager
and torch.compile) on the CPU: uint8 face images [B, 3, S, S] -> database codes and query tables,
the work a deployment does per image. FaceResNet20 (the paper's backbone) with 512-d features and
32-bit codes (8 books of 16 words). Every runtime's codes and tables are checked against eager
PyTorch before anything is timed; times are medians, threads as torch has them.

    python benchmarks/bench_onnx_export.py [--size 112] [--width 64] [--batch 64] [--repeats 10] [--json PATH]
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

from opqn_ext.aoti_export import export_aoti
from opqn_ext.nn import FaceResNet20, OrthoPQHead
from opqn_ext.onnx_export import RetrievalEncoder, example_inputs, export_onnx
from opqn_ext.train import OPQNModel


def median_ms(fn, repeats):
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--width", type=int, default=64, help="FaceResNet20 base channels (64 in the paper)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    shape = (3, args.size, args.size)
    model = OPQNModel(FaceResNet20(512, args.size, 3, args.width), OrthoPQHead(512, 1000, 8, 16, seed=0)).eval()
    encoder = RetrievalEncoder(model)
    images = example_inputs(shape, args.batch, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "encoder.onnx"
        export_onnx(model, shape, path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        export_aoti(model, shape, Path(tmp) / "encoder.pt2")
        package = torch._inductor.aoti_load_package(str(Path(tmp) / "encoder.pt2"))
    compiled = torch.compile(encoder)
    feeds = {session.get_inputs()[0].name: images.numpy()}
    runtimes = {
        "pytorch eager": lambda: encoder(images),
        "torch.compile": lambda: compiled(images),
        "onnxruntime": lambda: tuple(torch.from_numpy(a) for a in session.run(None, feeds)),
        "aotinductor": lambda: package(images),
    }
    with torch.no_grad():
        want_codes, want_tables = encoder(images)
        rows = []
        for name, run in runtimes.items():
            codes, tables = run()
            differing = int((codes != want_codes).sum())
            table_error = float((tables - want_tables).abs().max())
            assert differing <= codes.numel() // 100 and table_error < 1e-3, (name, differing, table_error)
            rows.append({"runtime": name, "ms": median_ms(run, args.repeats), "codes_differing": differing,
                         "table_error": table_error})
    eager_ms = rows[0]["ms"]
    print(f"FaceResNet20 width {args.width}, {args.size}x{args.size} RGB uint8, batch {args.batch}, "
          f"{torch.get_num_threads()} threads ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__})")
    print(f"{'runtime':<16} {'ms/batch':>9} {'images/s':>9} {'x eager':>8} {'codes differing':>16} {'table error':>12}")
    for row in rows:
        row["images_per_s"] = args.batch / row["ms"] * 1e3
        row["x_eager"] = eager_ms / row["ms"]
        print(f"{row['runtime']:<16} {row['ms']:9.2f} {row['images_per_s']:9.1f} {row['x_eager']:8.2f} "
              f"{row['codes_differing']:>10} of {want_codes.numel():<4} {row['table_error']:12.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(),
                                               "cpu_count": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
