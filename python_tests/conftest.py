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
    """The CUDA kernels and the CUDA adc top-k host code compiled for the host with the tests' CUDA
    emulator (python_tests/cuda_emulation), as a ctypes library; skips without a C++ compiler."""
    import ctypes
    import os
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths, library_paths

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    here = os.path.join(root, "python_tests", "cuda_emulation")
    out = tmp_path_factory.mktemp("cuda_emulation")
    sources = [os.path.join(here, name) for name in
               ("cuda_emulator.cpp", "kernels_entry.cpp", "emulator_selftest.cpp", "adc_topk_entry.cpp")]
    sources.append(os.path.join(root, "csrc", "adc_common.cpp"))  # pad_lut and the checks
    flags = ["-std=c++20", "-O2", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-DOPQN_CUDA_EMULATION",
             "-I", os.path.join(root, "csrc"), "-I", here]
    flags += [arg for path in include_paths() for arg in ("-isystem", path)]
    # in the files that instantiate kernels, undefined behaviour traps (SIGILL): a launch error;
    # float-to-integer conversions out of range too (not part of -fsanitize=undefined)
    trap_ub = ["-fsanitize=undefined,float-cast-overflow", "-fsanitize-undefined-trap-on-error", "-fno-sanitize=vptr"]
    with_kernels = ("kernels_entry.cpp", "emulator_selftest.cpp", "adc_topk_entry.cpp")
    link_flags = []
    if os.environ.get("OPQN_SANITIZE_EMULATION") == "1":  # make sanitize: AddressSanitizer too
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        link_flags += ["-fsanitize=address"]
    objects = [out / (os.path.basename(source) + ".o") for source in sources]
    builds = [subprocess.Popen([compiler, *flags, *(trap_ub if os.path.basename(source) in with_kernels else []),
                                "-c", source, "-o", str(obj)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
              for source, obj in zip(sources, objects)]
    for build in builds:
        output = build.communicate(timeout=600)[0]
        assert build.returncode == 0, output
    library = out / "libopqn_cuda_emulation.so"
    torch_lib = library_paths()[0]
    link = subprocess.run([compiler, "-shared", *link_flags, *map(str, objects), "-o", str(library), "-L", torch_lib,
                           f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"], capture_output=True, text=True,
                          timeout=120)
    assert link.returncode == 0, link.stderr
    lib = ctypes.CDLL(str(library))
    lib.emu_last_error.restype = ctypes.c_char_p
    return lib


@pytest.fixture(scope="session")
def orl_folder(tmp_path_factory):
    """ORL at the training input size of 32 x 32 written as an image folder, ``root/s01..s40/00..09.png``
    (folder names that sort in ORL's identity order): read as gray images, it gives the bytes
    and labels of ``prepare_data(TrainConfig(dataset="orl", input_size=32))``."""
    from PIL import Image

    from opqn_ext.train import TrainConfig, prepare_data

    root = tmp_path_factory.mktemp("orl_folder")
    prepared = prepare_data(TrainConfig(dataset="orl", input_size=32))
    for i, (image, label) in enumerate(zip(prepared.inputs, prepared.labels.tolist())):
        folder = root / f"s{label + 1:02d}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy()).save(folder / f"{i % 10:02d}.png")
    return root
