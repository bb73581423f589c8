"""Build opqn_ext: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc exists.

Two libraries go into the package: opqn_ext/lib/libopqn_ext_ops.so, the ops without Python (for
C++ programs too: the package holds its headers, opqn_ext/include, and a CMake package,
opqn_ext/share/cmake), and the Python module opqn_ext._C, linked to it.

OPQN_WITH_CUDA=auto (default) | 0 (CPU only, for quick local loops) | 1 (fail unless CUDA builds).
OPQN_WITH_INDEX_FILES=auto (default) | 0 | 1: the C++ index files (opqn_ext/index.h) in the ops
library, which need nlohmann/json.hpp (pip install nlohmann-json) and zlib.
"""
import glob
import importlib.util
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


def _json_include_dir():
    """The folder holding nlohmann/json.hpp: the nlohmann-json package's, or the system's; or None."""
    spec = importlib.util.find_spec("nlohmann_json")
    folders = [os.path.join(os.path.dirname(spec.origin), "include")] if spec is not None and spec.origin else []
    folders += ["/usr/include", "/usr/local/include"]
    return next((f for f in folders if os.path.isfile(os.path.join(f, "nlohmann", "json.hpp"))), None)


def _want_index_files():
    """(the nlohmann/json.hpp folder or None, why): whether the ops library gets the index files."""
    mode = os.environ.get("OPQN_WITH_INDEX_FILES", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"OPQN_WITH_INDEX_FILES must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None, "OPQN_WITH_INDEX_FILES=0"
    json_dir = _json_include_dir()
    has_zlib = any(os.path.isfile(os.path.join(f, "zlib.h")) for f in ("/usr/include", "/usr/local/include"))
    if json_dir and has_zlib:
        return json_dir, f"nlohmann/json.hpp in {json_dir}, zlib"
    why = "nlohmann/json.hpp was not found (pip install nlohmann-json)" if not json_dir else "zlib.h was not found"
    if mode == "1":
        sys.exit(f"OPQN_WITH_INDEX_FILES=1 but the index files cannot be built: {why}")
    return None, why


LIBRARY = "opqn_ext.lib.libopqn_ext_ops"


class BuildLibraries(cpp_extension.BuildExtension):
    """The ops library under its own name (libopqn_ext_ops.so, no Python suffix), built first; the
    Python module linked to the library as built; then the facts of the build that the package's
    CMake files read (share/cmake/opqn_ext: its version, and whether the index files are in)."""

    def get_ext_filename(self, fullname):
        name = super().get_ext_filename(fullname)
        if fullname.split(".")[-1] == LIBRARY.split(".")[-1]:
            return os.path.join(os.path.dirname(name), "libopqn_ext_ops.so")
        return name

    def build_extension(self, ext):
        if ext.name != LIBRARY:
            ext.library_dirs.append(os.path.dirname(self.get_ext_fullpath(LIBRARY)))
        super().build_extension(ext)

    def run(self):
        package = (self.get_finalized_command("build_py").get_package_dir("opqn_ext") if self.inplace
                   else os.path.join(self.build_lib, "opqn_ext"))
        os.makedirs(os.path.join(package, "lib"), exist_ok=True)  # an in-place build copies the library there
        super().run()
        cmake_dir = os.path.join(package, "share", "cmake", "opqn_ext")
        os.makedirs(cmake_dir, exist_ok=True)
        with open(os.path.join(cmake_dir, "opqn_extBuild.cmake"), "w") as f:
            f.write("# Written by setup.py: whether the package's libopqn_ext_ops.so has the index files.\n"
                    f"set(OPQN_EXT_INDEX_FILES {'ON' if json_dir else 'OFF'})\n")
        with open(os.path.join(cmake_dir, "opqn_extConfigVersion.cmake"), "w") as f:
            f.write(_CONFIG_VERSION.replace("@VERSION@", self.distribution.get_version()))


# find_package(opqn_ext X.Y): versions of the same major and minor release, at or above the one asked.
_CONFIG_VERSION = """# Written by setup.py: the version of the opqn_ext package.
set(PACKAGE_VERSION "@VERSION@")
string(REGEX MATCH "^[0-9]+[.][0-9]+" _opqn_ext_minor "${PACKAGE_VERSION}")
string(REGEX MATCH "^[0-9]+[.][0-9]+" _opqn_ext_find_minor "${PACKAGE_FIND_VERSION}")
if(PACKAGE_FIND_VERSION AND (PACKAGE_VERSION VERSION_LESS PACKAGE_FIND_VERSION
                             OR NOT _opqn_ext_minor STREQUAL _opqn_ext_find_minor))
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
"""


with_cuda, reason = _want_cuda()
json_dir, index_reason = _want_index_files()
sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
sources.remove(os.path.join("csrc", "python_module.cpp"))
# at::parallel_for is inline and, with torch's OpenMP backend, a `#pragma omp parallel`: without
# -fopenmp every parallel loop of ours would run on one thread. (libgomp is torch's own at run time:
# same soname, already loaded.)
# -Wno-psabi: the row kernels' 32-byte vector helpers are internal and inlined, so the ABI note GCC
# gives for them in the baseline (non-AVX) build does not apply.
# -std=c++20 named here: the sources are C++20 (as CMakeLists.txt says); older torch (2.11, the GPU
# machines' torch, for one) would otherwise compile them as C++17.
cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp", "-Wno-psabi"]
macros = []
libraries = []
public_headers = os.path.join(ROOT, "opqn_ext", "include")  # opqn_ext/ops.h, opqn_ext/index.h
include_dirs = [os.path.join(ROOT, "csrc"), public_headers]
if json_dir:
    sources += _sources("csrc/index_file/*.cpp")
    macros.append(("OPQN_EXT_INDEX_FILES", "1"))
    include_dirs.append(json_dir)
    libraries.append("z")
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

ops_library = extension(name=LIBRARY, sources=sources, include_dirs=include_dirs, define_macros=macros,
                        libraries=libraries, extra_compile_args=extra)
# Nothing of Python in it; it finds torch's libraries (and CUDA's) where they were at build time,
# or next to it in site-packages, as a C++ program loading it needs.
ops_library.libraries.remove("torch_python")
rpaths = ["$ORIGIN/../../torch/lib"] + [os.path.abspath(d) for d in ops_library.library_dirs]
ops_library.extra_link_args = ["-fopenmp", "-Wl,-soname,libopqn_ext_ops.so"] + [f"-Wl,-rpath,{d}" for d in rpaths]
python_module = cpp_extension.CppExtension(
    name="opqn_ext._C", sources=[os.path.join("csrc", "python_module.cpp")], include_dirs=[public_headers],
    libraries=["opqn_ext_ops"], extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-Wl,-rpath,$ORIGIN/lib"])

print(f"opqn_ext: building CPU kernels; CUDA kernels: {'yes' if with_cuda else 'no'} ({reason})"
      + (f", arch list {os.environ.get('TORCH_CUDA_ARCH_LIST', 'from the visible GPU')}" if with_cuda else "")
      + f"; C++ index files: {'yes' if json_dir else 'no'} ({index_reason})")

setup(
    install_requires=[_torch_requirement(), "numpy", "tqdm", "safetensors", "pillow>=9.1"],
    ext_modules=[ops_library, python_module],  # in this order: the module links the library
    cmdclass={"build_ext": BuildLibraries.with_options(use_ninja=True)},
)
