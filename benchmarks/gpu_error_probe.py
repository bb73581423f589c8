"""Which errors of the ops reach Python as a RuntimeError and which crash the process, one case per
process; with --backtrace, the first crashing case again under cuda-gdb, for its backtrace.

On the H200 machine of 2026-12-04 (its image's torch 2.11.0+cu130), a failed TORCH_CHECK whose
message formats an integer crashed the process (SIGSEGV), also in a minimal extension compiled
there with g++, while checks whose messages hold no integer raised normally. The cases below tell
those apart. Part of benchmarks/gpu_check.sh.

    python benchmarks/gpu_error_probe.py [--backtrace]
"""
import argparse
import shutil
import subprocess
import sys

CASES = {
    "message of text alone (lut holds NaN)":
        "opqn_ext.adc_topk(torch.full((1, 2, 4), float('nan')), torch.zeros(3, 2, dtype=torch.uint8), 1)",
    "message with integers (k > N)":
        "opqn_ext.adc_topk(torch.zeros(1, 2, 4), torch.zeros(3, 2, dtype=torch.uint8), 5)",
    "message with a double (scale NaN)":
        "opqn_ext.soft_quantize(torch.zeros(2, 8), torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), float('nan'))",
    "torch's own error with integers":
        "torch.zeros(2).view(3)",
    "CUDA size check (d=300)":
        "opqn_ext.soft_quantize(*[torch.zeros(s, device='cuda') for s in ((2, 300), (1, 300, 4), (1, 300, 4))])",
}


def program(code):
    return f"import torch, opqn_ext\ntry:\n    {code}\nexcept RuntimeError as e:\n    print(str(e).splitlines()[0])"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backtrace", action="store_true", help="run the first crashing case under cuda-gdb")
    args = parser.parse_args()
    crashed = []
    for name, code in CASES.items():
        run = subprocess.run([sys.executable, "-c", program(code)], capture_output=True, text=True, timeout=120)
        if run.returncode < 0:
            crashed.append(code)
            print(f"{name}: CRASHED (signal {-run.returncode})")
        elif run.returncode == 0 and run.stdout.strip():
            print(f"{name}: raised: {run.stdout.strip()}")
        else:
            print(f"{name}: rc={run.returncode}, no error raised: {run.stdout.strip()} {run.stderr.strip()[-300:]}")
    if args.backtrace and crashed:
        gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
        if gdb is None:
            print("no cuda-gdb or gdb for a backtrace")
        else:
            sys.stdout.flush()
            subprocess.run([gdb, "-q", "-batch", "-ex", "run", "-ex", "bt 30",
                            "--args", sys.executable, "-c", program(crashed[0])], timeout=240)
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
