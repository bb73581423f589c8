"""The CPU top-k reservoir (csrc/cpu/topk_heap.cpp) on its own, built for the host with a driver
that offers pairs in scan order and in random order (topk_heap_host.cpp): the scans only ever offer
in increasing id order, so the adc tests cannot reach every branch of its selection."""
import os
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = shutil.which("c++") or shutil.which("g++")


@pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")
def test_reservoir_keeps_the_best_k_in_result_order(tmp_path):
    exe = tmp_path / "topk_heap_host"
    torch_lib = cpp_extension.library_paths()[0]  # radix_sort.cpp's checks are c10's
    # under make sanitize with AddressSanitizer and UBSan: a selection that writes past its scratch fails
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"] \
        if os.environ.get("OPQN_SANITIZE_EMULATION") == "1" else []
    command = [COMPILER, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", *sanitize,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               "-I", os.path.join(ROOT, "csrc"), *[arg for p in cpp_extension.include_paths() for arg in ("-isystem", p)],
               os.path.join(ROOT, "python_tests", "topk_heap_host.cpp"),
               os.path.join(ROOT, "csrc", "cpu", "topk_heap.cpp"), os.path.join(ROOT, "csrc", "cpu", "radix_sort.cpp"),
               f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-o", str(exe)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # make sanitize preloads the runtimes
    if sanitize:
        env["ASAN_OPTIONS"] = "detect_leaks=0"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok: ")
