"""The C++ library as libtorch users take it: CMakeLists.txt configured, built and installed with
CMake (the ops library opqn_ext_ops, CPU kernels, no Python module), then the programs of
cpp_tests/ built against the installed package through find_package(opqn_ext): the typed C++ API
against brute-force loops, and an AOTInductor package of a model that calls the ops, run in a
process without Python. The build stays in build/cpp-library (incremental, as setup.py's).
OPQN_CPP_TESTS_CUDA=1 (benchmarks/gpu_check.sh) builds the library with its CUDA kernels instead, in
build/cpp-library-cuda, and requires the C++ API's CUDA checks to run."""
import os
import re
import shutil
import subprocess

import pytest
import torch

import opqn_ext
from opqn_ext.file_lock import exclusive_lock
from test_compile import Retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.environ.get("OPQN_CPP_TESTS_CUDA") == "1"
BUILD = os.path.join(ROOT, "build", "cpp-library-cuda" if CUDA else "cpp-library")


def cmake(*args, cwd=ROOT):
    done = subprocess.run(["cmake", *args], cwd=cwd, capture_output=True, text=True)
    assert done.returncode == 0, f"cmake {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done.stdout


def toolkit_release():
    """The major version of the CUDA toolkit torch's CMake package finds (cmake/opqn_extFindTorch.cmake
    prefers /usr/local/cuda), or None where there is none."""
    nvcc = "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else shutil.which("nvcc")
    if nvcc is None:
        return None
    found = re.search(r"release (\d+)\.", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return found.group(1) if found else None


@pytest.fixture(scope="module")
def programs():
    """The installed prefix and the folder of the built cpp_tests programs."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    toolkit = toolkit_release()
    if torch.version.cuda is not None and toolkit is not None and toolkit != torch.version.cuda.split(".")[0]:
        pytest.skip(f"torch's CMake package (a CUDA {torch.version.cuda} build) fails to configure with the "
                    f"CUDA {toolkit} toolkit here (it needs one of its own major version)")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    prefix, tests = os.path.join(BUILD, "prefix"), os.path.join(BUILD, "tests")
    torch_cmake = torch.utils.cmake_prefix_path
    jobs = str(os.cpu_count() or 2)
    os.makedirs(BUILD, exist_ok=True)
    with exclusive_lock(os.path.join(BUILD, ".lock"), "another test process building the C++ library"):  # xdist
        cmake("-S", ROOT, "-B", os.path.join(BUILD, "library"), *generator, f"-DOPQN_WITH_CUDA={'ON' if CUDA else 'OFF'}",
              "-DOPQN_BUILD_PYTHON_MODULE=OFF", f"-DCMAKE_PREFIX_PATH={torch_cmake}")
        cmake("--build", os.path.join(BUILD, "library"), "-j", jobs)
        cmake("--install", os.path.join(BUILD, "library"), "--prefix", prefix)
        cmake("-S", os.path.join(ROOT, "cpp_tests"), "-B", tests, *generator, "-DCMAKE_BUILD_TYPE=Release",
              f"-DCMAKE_PREFIX_PATH={prefix};{torch_cmake}")
        cmake("--build", tests, "-j", jobs)
    return prefix, tests


def test_the_installed_package_holds_the_library_header_and_cmake_files(programs):
    prefix, _ = programs
    lib = os.path.join(prefix, "lib")
    assert os.path.isfile(os.path.join(prefix, "include", "opqn_ext", "ops.h"))
    assert {"opqn_extConfig.cmake", "opqn_extConfigVersion.cmake", "opqn_extTargets.cmake",
            "opqn_extFindTorch.cmake"} <= set(os.listdir(os.path.join(lib, "cmake", "opqn_ext")))
    library = os.path.join(lib, "libopqn_ext_ops.so")
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert "libtorch.so" in needed and not [name for name in needed if "python" in name]  # nothing of Python


def test_the_cpp_api_agrees_with_brute_force_and_names_bad_arguments(programs):
    _, tests = programs
    done = subprocess.run([os.path.join(tests, "test_cpp_api")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    cuda, verdict = done.stdout.strip().splitlines()
    assert verdict == "every check passed"
    if CUDA:
        assert cuda == "cuda: checked"
    else:
        assert cuda == "cuda: not checked (the library has no CUDA kernels)"


def test_an_aotinductor_package_calling_the_ops_runs_in_cpp_without_python(programs, tmp_path):
    _, tests = programs
    model = Retrieval().eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        exported = torch.export.export(model, (torch.randn(8, 32),), dynamic_shapes={"inputs": {0: batch}})
        package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    calls = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert Retrieval.OPS <= calls  # the fused ops themselves, not a decomposition
    inputs = torch.randn(13, 32, generator=torch.Generator().manual_seed(1))  # another batch size
    torch.save((inputs,), tmp_path / "inputs.pt")
    done = subprocess.run([os.path.join(tests, "run_aoti_package"), package, str(tmp_path / "inputs.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    got = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        in_python = torch._inductor.aoti_load_package(package)(inputs)
        eager = model(inputs)
    assert len(got) == len(eager) == 6
    for mine, python, want in zip(got, in_python, eager):
        assert mine.dtype == want.dtype and mine.shape == want.shape
        assert torch.equal(mine, python)  # the same compiled code, in C++ and in Python
        if want.is_floating_point():
            torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(mine, want)


def test_the_cmake_project_version_is_the_package_version():
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        assert f"project(opqn_ext VERSION {opqn_ext.__version__} LANGUAGES CXX)" in f.read()




def test_opqn_export_writes_a_package_that_cpp_runs_on_the_data_sets_images(programs, tmp_path, capsys):
    """A trained ORL run exported with `opqn export -o model.pt2`, run in C++ without Python on the
    data set's uint8 images: the codes `opqn encode` stores and the tables of the model's head."""
    from safetensors.torch import load_file

    from opqn_ext.onnx_export import RetrievalEncoder
    from test_cli import export_an_orl_run

    _, tests = programs
    model, data, package, out = export_an_orl_run(tmp_path, capsys, "encoder.pt2")
    assert "checked with torch._inductor.aoti_load_package on 7 random inputs: 56 of 56 codes equal the model's" in out
    images = data.inputs  # uint8 [400, 1, 32, 32], as training read them
    torch.save((images,), tmp_path / "images.pt")
    done = subprocess.run([os.path.join(tests, "run_aoti_package"), str(package), str(tmp_path / "images.pt"),
                           str(tmp_path / "outputs.pt")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    codes, tables = torch.load(tmp_path / "outputs.pt")
    stored = load_file(str(tmp_path / "codes.safetensors"))
    assert torch.equal(codes[stored["items"]], stored["codes"])
    with torch.no_grad():
        torch.testing.assert_close(tables, RetrievalEncoder(model)(images)[1], rtol=1e-4, atol=1e-6)


def test_opqn_export_names_the_formats_it_writes(tmp_path, capsys):
    from opqn_ext.cli import main

    assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "model.bin")]) == 2
    assert (f"-o must name an .onnx file (an ONNX graph) or a .pt2 file (an AOTInductor package), got "
            f"{tmp_path / 'model.bin'}") in capsys.readouterr().err
