"""One OPQN training step (forward, backward, SGD update) with the fused soft_quantize op against
the same step with the pure-PyTorch reference in its place.

Two settings: an MLP over precomputed 128-d embeddings (where the head is most of the step) and
the paper's residual network on 32x32 images (where the backbone dominates). Both heads start
from the same weights and must produce the same loss before anything is timed.

With --autocast, the fused step also runs with the backbone under bfloat16 autocast (the OPQN ops
compute in float32 inside it): the default on CUDA (TrainConfig.amp), opt-in on the CPU (cpu_amp).
With --compile, the fused step also runs with its forward under torch.compile (`opqn train
--compile`), the fused ops in its graph.

    python benchmarks/bench_train.py [--device cpu|cuda] [--steps 30] [--autocast] [--compile] [--json PATH]
"""
import argparse
import json
import os
import statistics
import time

import torch

import opqn_ext.nn as opqn_nn
from opqn_ext import reference
from opqn_ext.ops import SoftQuantizeResult
from opqn_ext.nn import EmbeddingMLP, FaceResNet20, OrthoPQHead

FUSED = opqn_nn.soft_quantize


def reference_soft_quantize(*args, **kwargs):
    return SoftQuantizeResult(*reference.soft_quantize(*args, **kwargs))


def make(setting, M, K, device):
    torch.manual_seed(0)
    if setting == "mlp":
        backbone, inputs = EmbeddingMLP(128, 512), torch.randn(256, 128)
    else:
        backbone, inputs = FaceResNet20(512, 32, 1, width=64), torch.randn(256, 1, 32, 32)
    head = OrthoPQHead(512, 1000, M, K, seed=0)
    model = torch.nn.ModuleDict({"backbone": backbone, "head": head}).to(device)
    labels = torch.randint(0, 1000, (256,), generator=torch.Generator().manual_seed(1))
    return model, inputs.to(device), labels.to(device)


def loss_of(model, inputs, labels, autocast):
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=autocast):
        return model["head"](model["backbone"](inputs).float(), labels).loss


def step_seconds(model, inputs, labels, steps, device, autocast=False, forward=loss_of):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = forward(model, inputs, labels, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--autocast", action="store_true", help="also time the fused step under bfloat16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time the fused step compiled by torch.compile")
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for setting, steps in (("mlp", args.steps), ("resnet20", max(3, args.steps // 6))):
        for M, K in ((8, 16), (4, 64), (8, 64)):
            times, losses = {}, {}
            for name, fn in (("fused", FUSED), ("reference", reference_soft_quantize)):
                opqn_nn.soft_quantize = fn
                model, inputs, labels = make(setting, M, K, device)
                with torch.no_grad():
                    losses[name] = float(loss_of(model, inputs, labels, autocast=False))
                times[name] = step_seconds(model, inputs, labels, steps, device)
            opqn_nn.soft_quantize = FUSED
            assert abs(losses["fused"] - losses["reference"]) < 1e-4 * abs(losses["reference"]), losses
            row = {"setting": setting, "M": M, "K": K, "fused_ms": times["fused"] * 1e3,
                   "reference_ms": times["reference"] * 1e3, "speedup": times["reference"] / times["fused"]}
            if args.autocast:  # bfloat16 features: the loss moves by about their rounding, no more
                model, inputs, labels = make(setting, M, K, device)
                with torch.no_grad():
                    mixed_loss = float(loss_of(model, inputs, labels, autocast=True))
                assert abs(mixed_loss - losses["fused"]) < 2e-2 * abs(losses["fused"]), (mixed_loss, losses)
                mixed = step_seconds(model, inputs, labels, steps, device, autocast=True)
                row.update(autocast_ms=mixed * 1e3, autocast_speedup=times["fused"] / mixed)
            if args.compile:  # the compiled kernels round differently, no more
                torch._dynamo.reset()
                compiled = torch.compile(loss_of)
                model, inputs, labels = make(setting, M, K, device)
                with torch.no_grad():
                    compiled_loss = float(compiled(model, inputs, labels, False))
                assert abs(compiled_loss - losses["fused"]) < 1e-4 * abs(losses["fused"]), (compiled_loss, losses)
                fast = step_seconds(model, inputs, labels, steps, device, forward=compiled)
                row.update(compiled_ms=fast * 1e3, compiled_speedup=times["fused"] / fast)
            rows.append(row)
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nOPQN training step, B=256, D=512, 1000 classes, {device} ({torch.get_num_threads()} threads)")
    amp_head = f" {'bf16 autocast ms':>17} {'x fused':>8}" if args.autocast else ""
    compile_head = f" {'compiled ms':>12} {'x fused':>8}" if args.compile else ""
    print(f"{'backbone':>9} {'M x K':>7} {'fused ms':>9} {'reference ms':>13} {'speedup':>8}{amp_head}{compile_head}")
    for r in rows:
        amp = f" {r['autocast_ms']:17.2f} {r['autocast_speedup']:7.2f}x" if args.autocast else ""
        fast = f" {r['compiled_ms']:12.2f} {r['compiled_speedup']:7.2f}x" if args.compile else ""
        print(f"{r['setting']:>9} {r['M']:>3} x {r['K']:<3} {r['fused_ms']:9.2f} {r['reference_ms']:13.2f} "
              f"{r['speedup']:7.2f}x{amp}{fast}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"device": str(device), "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
