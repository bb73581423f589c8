import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version

import opqn_ext


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_build_info_reports_build_and_machine():
    info = opqn_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cpu_isas"][0] == "scalar"
    assert info["active_cpu_isa"] in info["cpu_isas"]
    assert isinstance(info["cuda_built"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()


def nvcc_major(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.", out)
    return found.group(1) if found else None


def test_cuda_kernels_are_built_whenever_they_can_be():
    # CI machines have a CUDA torch and nvcc (of torch's CUDA major version) but no GPU: the .cu
    # files must still be compiled.
    nvcc = shutil.which("nvcc")
    can_build = torch.version.cuda is not None and nvcc is not None and \
        nvcc_major(nvcc) == torch.version.cuda.split(".")[0]
    if can_build and os.environ.get("OPQN_WITH_CUDA", "auto") != "0":
        assert opqn_ext.build_info()["cuda_built"]


def fake_toolkit(tmp_path, release):
    """A CUDA_HOME whose nvcc reports ``release`` (and does nothing else)."""
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return nvcc.parent.parent


@pytest.mark.skipif(torch.version.cuda is None, reason="the check applies to a CUDA build of torch")
@pytest.mark.parametrize("mode", ["auto", "1"])
def test_build_skips_or_refuses_an_nvcc_of_another_cuda_major_version(tmp_path, mode):
    # torch's cpp_extension fails the whole build when nvcc's major version differs from torch's;
    # auto builds the CPU kernels and says why, 1 stops with the reason. `setup.py --name` runs the
    # build decision without building anything.
    other = f"{int(torch.version.cuda.split('.')[0]) + 1}.0"
    env = dict(os.environ, CUDA_HOME=str(fake_toolkit(tmp_path, other)), OPQN_WITH_CUDA=mode)
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    why = f"nvcc {other} at {env['CUDA_HOME']}/bin/nvcc does not match the CUDA {torch.version.cuda} of torch"
    if mode == "auto":
        assert proc.returncode == 0, proc.stderr
        assert "CUDA kernels: no (" + why in proc.stdout
    else:
        assert proc.returncode != 0 and "OPQN_WITH_CUDA=1 but CUDA kernels cannot be built: " + why in proc.stderr


@pytest.mark.parametrize("mode,says", [
    ("0", "C++ index files: no (OPQN_WITH_INDEX_FILES=0)"),
    ("1", "C++ index files: yes (nlohmann/json.hpp in "),
    ("yes", "OPQN_WITH_INDEX_FILES must be auto, 0 or 1, got 'yes'"),
])
def test_the_index_files_of_the_cpp_library_are_chosen_by_environment(mode, says):
    # `setup.py --name` makes the build's decisions without building; the dev extra has nlohmann-json
    if mode == "1" and importlib.util.find_spec("nlohmann_json") is None:
        pytest.skip("nlohmann-json (the dev extra) is not installed")
    env = dict(os.environ, OPQN_WITH_INDEX_FILES=mode, OPQN_WITH_CUDA="0")
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert (proc.returncode == 0) == (mode != "yes"), proc.stderr
    assert says in (proc.stdout if mode != "yes" else proc.stderr)


def test_ops_are_registered_for_cpu_and_cuda_when_built():
    # rank_stats ranks on the CPU only; pack_codes4 is composite (one kernel for every device)
    for name in ("soft_quantize", "soft_quantize_backward", "encode", "adc_topk", "adc_scores", "adc_topk4"):
        op = getattr(torch.ops.opqn_ext, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")
        assert has_cuda == opqn_ext.build_info()["cuda_built"]


def test_missing_compiled_library_raises_import_error_with_build_hint():
    code = "import sys; sys.modules['opqn_ext._C'] = None\nimport opqn_ext"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "pip install --no-build-isolation -e ." in proc.stderr


def test_cpu_isa_can_be_forced_by_environment():
    for isa in opqn_ext._C.available_cpu_isas():
        env = dict(os.environ, OPQN_CPU_ISA=isa)
        out = subprocess.run([sys.executable, "-c", "import opqn_ext; print(opqn_ext.build_info()['active_cpu_isa'])"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
        assert out == isa


def test_unknown_cpu_isa_is_rejected():
    env = dict(os.environ, OPQN_CPU_ISA="sse9")
    proc = subprocess.run([sys.executable, "-c", "import opqn_ext, torch; x = torch.zeros(1, 2);"
                           "c = opqn_ext.orthonormal_codebooks(1, 2, 2); opqn_ext.soft_quantize(x, c, c)"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "OPQN_CPU_ISA must be 'scalar', 'avx2' or 'avx512'" in proc.stderr
    try:
        opqn_ext._C.set_cpu_isa("sse9")
    except ValueError as err:
        assert "'sse9'" in str(err)
    else:
        raise AssertionError("set_cpu_isa accepted an unknown path")


def tracked_files():
    proc = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout: no list of the project's files to compare with")
    return [f for f in proc.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


def test_source_distribution_holds_everything_a_build_and_the_tests_need(tmp_path):
    # pip and `python -m build` build a wheel from the sdist alone: a header left out of it (setup.py
    # names only the .cpp and .cu files) fails that build. The sdist is made by the PEP 517 hook they
    # call, from a copy of the checkout (the hook writes metadata next to setup.py).
    tracked = tracked_files()
    src = tmp_path / "src"
    for name in tracked:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), src / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "dist")], cwd=src, capture_output=True,
                          text=True, env=dict(os.environ, OPQN_WITH_CUDA="0"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdist = tmp_path / "dist" / proc.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = [f for f in tracked if f.startswith(("csrc/", "opqn_ext/", "python_tests/", "cmake/", "cpp_tests/"))
              or f in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md")]
    assert any(f.endswith(".cuh") for f in needed) and any(f.endswith(".h") for f in needed)
    assert "cmake/opqn_extConfig.cmake.in" in needed and "cpp_tests/CMakeLists.txt" in needed
    assert sorted(set(needed) - packed) == []
    assert not any("__pycache__" in name or name.endswith((".so", ".o", ".pyc")) for name in packed)


def test_package_requires_the_torch_minor_release_it_was_built_against(tmp_path):
    # torch's C++ ABI changes between minor releases: the library built here loads only with this
    # torch's minor release, and the package's metadata says so, so pip never pairs it with another.
    # read from another folder: the checkout may hold metadata of its own (opqn_ext.egg-info)
    code = "import importlib.metadata as m, json; print(json.dumps(m.requires('opqn-ext')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    if "PackageNotFoundError" in proc.stderr:
        pytest.skip("opqn_ext is built in place, not installed: no package metadata")
    assert proc.returncode == 0, proc.stderr
    requirements = [Requirement(r) for r in json.loads(proc.stdout)]
    (spec,) = [r.specifier for r in requirements if r.name == "torch"]
    built = Version(torch.__version__).release[:2]
    release = f"{built[0]}.{built[1]}"
    for version in (torch.__version__, f"{release}.0", f"{release}.3+cu130", f"{release}.0a0+gitecf3bae",
                    f"{release}.0.dev20260901+cpu"):  # nightlies and source builds (NGC containers) too
        assert spec.contains(version), version
    assert not spec.contains(f"{built[0]}.{built[1] + 1}.0") and not spec.contains(f"{built[0]}.{built[1] + 1}.0.dev1")
    assert built[1] == 0 or not spec.contains(f"{built[0]}.{built[1] - 1}.99")
