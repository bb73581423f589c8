"""Shared fixtures: devices (CUDA when present), CPU instruction-set paths, seeded generators."""
import pytest
import torch

import opqn_ext

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CPU_ISAS = opqn_ext._C.available_cpu_isas()


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Runs the test once per CPU instruction-set path this machine has, then restores the path."""
    before = opqn_ext._C.active_cpu_isa()
    opqn_ext._C.set_cpu_isa(request.param)
    yield request.param
    opqn_ext._C.set_cpu_isa(before)


def results_on_every_path(fn):
    """[fn() for every CPU instruction-set path x 1 and 2 threads], restoring both afterwards."""
    threads_before, isa_before = torch.get_num_threads(), opqn_ext._C.active_cpu_isa()
    results = []
    try:
        for isa in CPU_ISAS:
            opqn_ext._C.set_cpu_isa(isa)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                results.append(fn())
    finally:
        torch.set_num_threads(threads_before)
        opqn_ext._C.set_cpu_isa(isa_before)
    return results


def make_problem(B, M, d, K, *, dtype=torch.float64, device="cpu", seed=0, kind="dct"):
    """x [B, M*d], Xavier-like assign_weight [M, d, K], orthonormal codebook [M, d, K]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, M * d, generator=g, dtype=torch.float64)
    a = torch.randn(M, d, K, generator=g, dtype=torch.float64) * (2.0 / (d + K)) ** 0.5
    c = opqn_ext.orthonormal_codebooks(M, d, K, kind=kind, seed=seed, dtype=torch.float64)
    return x.to(dtype=dtype, device=device), a.to(dtype=dtype, device=device), c.to(dtype=dtype, device=device)


@pytest.fixture(scope="session")
def cuda_emulator(tmp_path_factory):
    """The CUDA kernels compiled for the host with the tests' CUDA emulator (python_tests/cuda_emulation),
    as a ctypes library; skips where there is no C++ compiler."""
    import ctypes
    import os
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.join(root, "python_tests", "cuda_emulation")
    library = tmp_path_factory.mktemp("cuda_emulation") / "libopqn_cuda_emulation.so"
    sources = [os.path.join(here, name) for name in ("cuda_emulator.cpp", "kernels_entry.cpp", "emulator_selftest.cpp")]
    command = [compiler, "-std=c++20", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
               "-DOPQN_CUDA_EMULATION", "-I", os.path.join(root, "csrc"), "-I", here,
               "-isystem", include_paths()[0], *sources, "-o", str(library)]
    build = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    lib = ctypes.CDLL(str(library))
    lib.emu_last_error.restype = ctypes.c_char_p
    return lib
