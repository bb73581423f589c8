"""The C++ library as libtorch users take it: CMakeLists.txt configured, built and installed with
CMake (the ops library opqn_ext_ops, CPU kernels, no Python module), then the programs of
cpp_tests/ built against the installed package through find_package(opqn_ext): the typed C++ API
against brute-force loops, an AOTInductor package of a model that calls the ops, run in a
process without Python, and index files of OPQNIndex.save read and searched in C++ (with the
reader, where the nlohmann-json package of the dev extra is installed). The build stays in build/cpp-library (incremental, as setup.py's).
OPQN_CPP_TESTS_CUDA=1 (benchmarks/gpu_check.sh) builds the library with its CUDA kernels instead, in
build/cpp-library-cuda, and requires the C++ API's CUDA checks to run."""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

import opqn_ext
from opqn_ext.file_lock import exclusive_lock
from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead
from test_compile import Retrieval
from test_index import flip_a_bit_in_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.environ.get("OPQN_CPP_TESTS_CUDA") == "1"
BUILD = os.path.join(ROOT, "build", "cpp-library-cuda" if CUDA else "cpp-library")
JSON = importlib.util.find_spec("nlohmann_json")  # its folder holds include/nlohmann/json.hpp
JSON_PREFIX = os.path.dirname(JSON.origin) if JSON is not None and JSON.origin else None


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
        reader = [f"-DOPQN_WITH_INDEX_READER={'ON' if JSON_PREFIX else 'OFF'}"]
        cmake("-S", ROOT, "-B", os.path.join(BUILD, "library"), *generator, f"-DOPQN_WITH_CUDA={'ON' if CUDA else 'OFF'}",
              "-DOPQN_BUILD_PYTHON_MODULE=OFF", *reader, f"-DCMAKE_PREFIX_PATH={torch_cmake};{JSON_PREFIX or ''}")
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
    # the reader's header only with the reader (nlohmann-json installed: built; otherwise left out)
    assert os.path.isfile(os.path.join(prefix, "include", "opqn_ext", "index.h")) == (JSON_PREFIX is not None)
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


@pytest.fixture(scope="module")
def index_file_search(programs, tmp_path_factory):
    """search_index_file(index_path, queries, k, device) -> (scores, ids, tables) from the C++ program,
    or the program's error message (a str)."""
    if JSON_PREFIX is None:
        pytest.skip("the C++ index-file reader needs nlohmann/json.hpp: pip install nlohmann-json (the dev extra)")
    program = os.path.join(programs[1], "search_index_file")
    folder = tmp_path_factory.mktemp("index_file_search")

    def search(path, queries, k, device="cpu"):
        torch.save(queries, folder / "queries.pt")
        done = subprocess.run([program, str(path), str(folder / "queries.pt"), str(k), str(folder / "out.pt"), device],
                              capture_output=True, text=True)
        if done.returncode == 1 and done.stderr.startswith("error: "):
            return done.stderr[len("error: "):].strip()
        assert done.returncode == 0, done.stdout + done.stderr
        return torch.load(folder / "out.pt")
    return search


def gallery(tmp_path, items=500, num_words=16, learn_codebook=False):
    """An index of `items` random features (4 books of max(16, K) dimensions) with ids that skip and
    labels, saved; and 7 queries."""
    g = torch.Generator().manual_seed(items + num_words)
    D = 4 * max(16, num_words)
    index = OPQNIndex.from_head(OrthoPQHead(D, 10, 4, num_words, seed=0, learn_codebook=learn_codebook))
    index.add(torch.randn(items, D, generator=g), ids=torch.arange(items) * 3 + 5,
              labels=torch.randint(0, 10, (items,), generator=g))
    return index, index.save(tmp_path / "gallery.opqn"), torch.randn(7, D, generator=g)


@pytest.mark.parametrize("num_words,learn_codebook", [(16, False), (256, False), (16, True)])
def test_an_index_file_searched_in_cpp_gives_the_python_results(index_file_search, tmp_path, num_words,
                                                                 learn_codebook):
    index, path, queries = gallery(tmp_path, num_words=num_words, learn_codebook=learn_codebook)
    assert index.orthonormal != learn_codebook
    for k in (1, 10, 500, 503):  # k beyond the 500 items: padding, as FAISS pads
        scores, ids, tables = index_file_search(path, queries, k)
        want_scores, want_ids = index.search(queries, k)
        assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    if learn_codebook:  # tables from the quantized queries' products with the codebook
        torch.testing.assert_close(tables, index.query_lut(queries), rtol=1e-6, atol=1e-7)
    else:  # the soft_quantize kernel's probabilities, as in Python
        assert torch.equal(tables, index.query_lut(queries))


@pytest.mark.skipif(not (CUDA and torch.cuda.is_available()), reason="the library's CUDA kernels and a GPU")
def test_an_index_file_searched_on_cuda_in_cpp_gives_the_python_results(index_file_search, tmp_path):
    index, path, queries = gallery(tmp_path)
    scores, ids, tables = index_file_search(path, queries, 10, "cuda")
    want_scores, want_ids = index.to("cuda").search(queries, 10)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    torch.testing.assert_close(tables, index.query_lut(queries).cpu(), rtol=1e-6, atol=1e-7)


def test_an_empty_index_file_gives_padding_and_empty_queries_give_nothing(index_file_search, tmp_path):
    _, path, queries = gallery(tmp_path, items=0)
    scores, ids, _ = index_file_search(path, queries, 3)
    assert ids.shape == (7, 3) and bool((ids == -1).all()) and bool((scores == float("-inf")).all())
    _, path, _ = gallery(tmp_path, items=20)
    scores, ids, _ = index_file_search(path, torch.zeros(0, 64), 4)
    assert scores.shape == ids.shape == (0, 4)


def test_the_cpp_reader_names_what_is_wrong(index_file_search, tmp_path):
    _, path, queries = gallery(tmp_path, items=50)
    good = path.read_bytes()
    assert "does not exist" in index_file_search(tmp_path / "missing.opqn", queries, 2)
    path.write_bytes(good[:-40])
    assert "truncated index file (array" in index_file_search(path, queries, 2)
    path.write_bytes(good)
    flip_a_bit_in_array(path, "codes")
    message = index_file_search(path, queries, 2)
    assert "is corrupted (CRC-32 mismatch)" in message and "array codes" in message
    from safetensors.torch import save_file
    save_file({"codes": torch.zeros(2, 4, dtype=torch.uint8)}, tmp_path / "plain.safetensors")
    assert "not an OPQN index" in index_file_search(tmp_path / "plain.safetensors", queries, 2)
    path.write_bytes(good)
    assert "queries must be [nq, 64]" in index_file_search(path, queries[:, :60], 2)
    assert "k must be >= 1, got 0" in index_file_search(path, queries, 0)
    queries[3, 5] = float("nan")
    assert "queries rows [3] give tables that are not finite" in index_file_search(path, queries, 2)
