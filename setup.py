"""Build opqn_ext: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

OPQN_WITH_CUDA=auto (default) | 0 (CPU only, for quick local loops) | 1 (fail unless CUDA builds).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_cuda_home():
    """A CUDA toolkit folder holding both nvcc and libcudart, for when CUDA_HOME is not set (an nvcc
    on PATH may be a wrapper outside the toolkit, which would send the linker to the wrong place)."""
    nvcc = shutil.which("nvcc")
    candidates = ["/usr/local/cuda"] + ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else [])
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_rt = any(glob.glob(os.path.join(home, lib, "libcudart.so*")) for lib in ("lib64", "lib"))
        if has_nvcc and has_rt:
            return home
    return None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and _default_cuda_home():
    os.environ["CUDA_HOME"] = _default_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it on import)
from torch.utils import cpp_extension  # noqa: E402


def _nvcc_path():
    home = cpp_extension.CUDA_HOME
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _nvcc_release(nvcc):
    """The release that ``nvcc --version`` names ("13.0" from "Cuda compilation tools, release 13.0,
    V13.0.48"), or None."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found.group(1) if found else None


def _want_cuda():
    mode = os.environ.get("OPQN_WITH_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"OPQN_WITH_CUDA must be auto, 0 or 1, got {mode!r}")
    has_torch_cuda = torch.version.cuda is not None
    nvcc = _nvcc_path()
    if mode == "0":
        return False, "OPQN_WITH_CUDA=0"
    release = _nvcc_release(nvcc) if has_torch_cuda and nvcc else None
    torch_major = torch.version.cuda.split(".")[0] if has_torch_cuda else None
    if release and release.split(".")[0] == torch_major:
        return True, f"torch {torch.__version__} has CUDA {torch.version.cuda}, nvcc {release} at {nvcc}"
    if not has_torch_cuda:
        why = "torch is a CPU-only build"
    elif not nvcc:
        why = "nvcc was not found (set CUDA_HOME)"
    elif not release:
        why = f"{nvcc} --version gave no release number"
    else:  # torch's cpp_extension refuses to build across CUDA major versions
        why = (f"nvcc {release} at {nvcc} does not match the CUDA {torch.version.cuda} of torch {torch.__version__} "
               f"(the major versions must agree: set CUDA_HOME to a CUDA {torch_major}.x toolkit)")
    if mode == "1":
        sys.exit(f"OPQN_WITH_CUDA=1 but CUDA kernels cannot be built: {why}")
    return False, why


def _torch_requirement():
    """The torch releases the built library loads with: the minor release it is compiled against.
    torch's C++ ABI changes between minor releases (a library built on 2.14 fails to load on 2.13
    or 2.15), so a wheel says which torch it needs, and pip keeps or installs that one. The lower
    bound admits that release's nightlies and source builds (2.14.0.dev20260901, NGC containers'
    2.14.0a0+git...), which a plain >=2.14 would not."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return f"torch>={major}.{minor}.0.dev0,<{major}.{minor + 1}"


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


with_cuda, reason = _want_cuda()
sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
# at::parallel_for is inline and, with torch's OpenMP backend, a `#pragma omp parallel`: without
# -fopenmp every parallel loop of ours would run on one thread. (libgomp is torch's own at run time:
# same soname, already loaded.)
# -Wno-psabi: the row kernels' 32-byte vector helpers are internal and inlined, so the ABI note GCC
# gives for them in the baseline (non-AVX) build does not apply.
# -std=c++20 named here: the sources are C++20 (as CMakeLists.txt says); older torch (2.11, the GPU
# machines' torch, for one) would otherwise compile them as C++17.
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-Wno-psabi"]
link_flags = ["-fopenmp"]
macros = []
if with_cuda:
    sources += _sources("csrc/cuda/*.cu")
    macros.append(("OPQN_WITH_CUDA", "1"))
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No visible GPU to take the architecture from: build for Hopper, plus PTX for newer cards.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
    extension = cpp_extension.CUDAExtension
    extra = {"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]}
else:
    extension = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}

print(f"opqn_ext: building CPU kernels; CUDA kernels: {'yes' if with_cuda else 'no'} ({reason})"
      + (f", arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'from the visible GPU')}" if with_cuda else ""))

setup(
    install_requires=[_torch_requirement(), "numpy", "tqdm", "safetensors", "pillow>=9.1"],
    ext_modules=[
        extension(
            name="opqn_ext._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=macros,
            extra_compile_args=extra,
            extra_link_args=link_flags,
        )
    ],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
