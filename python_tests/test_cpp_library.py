"""The C++ library as libtorch users take it: CMakeLists.txt configured, built and installed with
CMake (the ops library opqn_ext_ops, CPU kernels, no Python module), then the programs of
cpp_tests/ built against the installed package through find_package(opqn_ext): the typed C++ API
against brute-force loops, an AOTInductor package of a model that calls the ops, run in a
process without Python, and index files (where the nlohmann-json package of the dev extra is
installed): files of OPQNIndex.save read and searched in C++, items added in C++ and saved for
OPQNIndex.load. The build stays in build/cpp-library (incremental, as setup.py's). The same programs
are also built against the library the Python package holds (setup.py's build; find_package through
opqn_ext.cmake_prefix_path), as a pip user builds them.
OPQN_CPP_TESTS_CUDA=1 (benchmarks/gpu_check.sh) builds the library with its CUDA kernels instead, in
build/cpp-library-cuda, and requires the C++ API's CUDA checks to run. OPQN_CPP_TESTS_SANITIZE=FLAGS
(make sanitize) builds the library and the programs with those compiler flags (AddressSanitizer,
UBSan), in build/cpp-library-sanitize."""
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
from test_index import damaged_copies, flip_a_bit_in_array

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = os.environ.get("OPQN_CPP_TESTS_CUDA") == "1"
SANITIZE = os.environ.get("OPQN_CPP_TESTS_SANITIZE", "")
BUILD = os.path.join(ROOT, "build", "cpp-library-cuda" if CUDA else "cpp-library-sanitize" if SANITIZE else "cpp-library")
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


def skip_without_cmake_for_torch():
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    toolkit = toolkit_release()
    if torch.version.cuda is not None and toolkit is not None and toolkit != torch.version.cuda.split(".")[0]:
        pytest.skip(f"torch's CMake package (a CUDA {torch.version.cuda} build) fails to configure with the "
                    f"CUDA {toolkit} toolkit here (it needs one of its own major version)")


@pytest.fixture(scope="module")
def programs():
    """The installed prefix and the folder of the built cpp_tests programs."""
    skip_without_cmake_for_torch()
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    prefix, tests = os.path.join(BUILD, "prefix"), os.path.join(BUILD, "tests")
    torch_cmake = torch.utils.cmake_prefix_path
    jobs = str(os.cpu_count() or 2)
    os.makedirs(BUILD, exist_ok=True)
    with exclusive_lock(os.path.join(BUILD, ".lock"), "another test process building the C++ library"):  # xdist
        index_files = [f"-DOPQN_WITH_INDEX_FILES={'ON' if JSON_PREFIX else 'OFF'}"]
        flags = [f"-DCMAKE_{kind}_FLAGS={SANITIZE}" for kind in ("CXX", "SHARED_LINKER", "EXE_LINKER")] if SANITIZE else []
        cmake("-S", ROOT, "-B", os.path.join(BUILD, "library"), *generator, f"-DOPQN_WITH_CUDA={'ON' if CUDA else 'OFF'}",
              "-DOPQN_BUILD_PYTHON_MODULE=OFF", *index_files, *flags,
              f"-DCMAKE_PREFIX_PATH={torch_cmake};{JSON_PREFIX or ''}")
        cmake("--build", os.path.join(BUILD, "library"), "-j", jobs)
        cmake("--install", os.path.join(BUILD, "library"), "--prefix", prefix)
        cmake("-S", os.path.join(ROOT, "cpp_tests"), "-B", tests, *generator, "-DCMAKE_BUILD_TYPE=Release", *flags,
              f"-DCMAKE_PREFIX_PATH={prefix};{torch_cmake}")
        cmake("--build", tests, "-j", jobs)
    return prefix, tests


def test_the_installed_package_holds_the_library_header_and_cmake_files(programs):
    prefix, _ = programs
    lib = os.path.join(prefix, "lib")
    assert os.path.isfile(os.path.join(prefix, "include", "opqn_ext", "ops.h"))
    # index.h only with the index files (nlohmann-json installed: built; otherwise left out)
    assert os.path.isfile(os.path.join(prefix, "include", "opqn_ext", "index.h")) == (JSON_PREFIX is not None)
    assert {"opqn_extConfig.cmake", "opqn_extConfigVersion.cmake", "opqn_extTargets.cmake",
            "opqn_extFindTorch.cmake"} <= set(os.listdir(os.path.join(lib, "cmake", "opqn_ext")))
    needed = needed_libraries(os.path.join(lib, "libopqn_ext_ops.so"))
    assert "libtorch.so" in needed and not [name for name in needed if "python" in name]  # nothing of Python


def needed_libraries(path):
    """The sonames a shared library asks the loader for (readelf's NEEDED entries)."""
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)


def run_typed_api_checks(tests):
    """Runs cpp_tests/test_cpp_api from the folder `tests`: its line on CUDA (every other check passed)."""
    done = subprocess.run([os.path.join(tests, "test_cpp_api")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    cuda, verdict = done.stdout.strip().splitlines()
    assert verdict == "every check passed"
    return cuda


def test_the_cpp_api_agrees_with_brute_force_and_names_bad_arguments(programs):
    cuda = run_typed_api_checks(programs[1])
    if CUDA:
        assert cuda == "cuda: checked"
    else:
        assert cuda == "cuda: not checked (the library has no CUDA kernels)"


def package_file(*parts):
    return os.path.join(os.path.dirname(opqn_ext.__file__), *parts)


def package_has_index_files() -> bool:
    with open(os.path.join(opqn_ext.cmake_prefix_path, "opqn_ext", "opqn_extBuild.cmake")) as f:
        return "set(OPQN_EXT_INDEX_FILES ON)" in f.read()


@pytest.fixture(scope="module")
def package_programs():
    """The folder of cpp_tests programs built, as a pip user builds a program, against the C++ library
    that the Python package holds: find_package(opqn_ext) through opqn_ext.cmake_prefix_path."""
    if SANITIZE:
        pytest.skip("the sanitizer builds check the library of CMakeLists.txt")
    skip_without_cmake_for_torch()
    tests = os.path.join(BUILD, "package-tests")
    targets = ["test_cpp_api"] + (["search_index_file"] if package_has_index_files() else [])
    os.makedirs(BUILD, exist_ok=True)
    with exclusive_lock(os.path.join(BUILD, ".lock"), "another test process building the C++ library"):
        cmake("-S", os.path.join(ROOT, "cpp_tests"), "-B", tests, *(["-G", "Ninja"] if shutil.which("ninja") else []),
              "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={opqn_ext.cmake_prefix_path};{torch.utils.cmake_prefix_path}")
        cmake("--build", tests, "-j", str(os.cpu_count() or 2), "--target", *targets)
    return tests


def test_the_python_package_holds_a_cpp_library_for_find_package():
    library = package_file("lib", "libopqn_ext_ops.so")
    for header in ("ops.h", "index.h"):
        assert os.path.isfile(package_file("include", "opqn_ext", header))
    cmake_files = set(os.listdir(os.path.join(opqn_ext.cmake_prefix_path, "opqn_ext")))
    assert {"opqn_extConfig.cmake", "opqn_extConfigVersion.cmake", "opqn_extFindTorch.cmake",
            "opqn_extBuild.cmake"} <= cmake_files
    with open(os.path.join(opqn_ext.cmake_prefix_path, "opqn_ext", "opqn_extConfigVersion.cmake")) as f:
        assert f'set(PACKAGE_VERSION "{opqn_ext.__version__}")' in f.read()
    # `make test` installs nlohmann-json before it builds the package, so the index files are in
    assert package_has_index_files() == (JSON_PREFIX is not None)
    assert not [name for name in needed_libraries(library) if "python" in name]  # a C++ program can load it
    assert "libopqn_ext_ops.so" in needed_libraries(opqn_ext._C.__file__)  # the module uses it: the ops exist once


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_index_h_without_the_index_files_stops_the_compiler_with_what_to_do(tmp_path):
    source = tmp_path / "server.cpp"
    source.write_text("#include <opqn_ext/index.h>\nint main() {}\n")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    done = subprocess.run(["c++", "-std=c++20", "-fsyntax-only", "-Wfatal-errors", f"-I{package_file('include')}",
                           f"-I{torch_include}", str(source)], capture_output=True, text=True)
    assert done.returncode != 0
    assert "this opqn_ext library was built without its index files" in done.stderr, done.stderr[-2000:]
    assert "pip install nlohmann-json" in done.stderr


def test_programs_built_on_the_python_package_pass_the_typed_api_checks(package_programs):
    cuda = run_typed_api_checks(package_programs)
    info = opqn_ext.build_info()
    if not info["cuda_built"]:
        assert cuda == "cuda: not checked (the library has no CUDA kernels)"
    else:
        assert cuda == ("cuda: checked" if info["cuda_available"] else "cuda: not checked (no GPU)")


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
    """search_index_file(index_path, queries, k, device, mapped, options, subset) -> (scores, ids, tables)
    from the C++ program (`mapped`: the index loaded with its per-item arrays mapped; `options`: more
    of its options, as "fast=2"; `subset`: ids to search among; with the option "range=S", (lims,
    scores, ids) of range_search), or its error message (a str)."""
    if JSON_PREFIX is None:
        pytest.skip("the C++ index files need nlohmann/json.hpp: pip install nlohmann-json (the dev extra)")
    return index_searcher(os.path.join(programs[1], "search_index_file"), tmp_path_factory.mktemp("index_file_search"))


def index_searcher(program, folder):
    """The search of the fixture index_file_search, by the search_index_file program at `program`."""
    def search(path, queries, k, device="cpu", mapped=False, options=(), subset=None):
        torch.save(queries, folder / "queries.pt")
        if subset is not None:
            torch.save(subset, folder / "subset.pt")
            options = (*options, f"subset={folder / 'subset.pt'}")
        done = subprocess.run([program, str(path), str(folder / "queries.pt"), str(k), str(folder / "out.pt"), device,
                               *(["map"] if mapped else []), *options], capture_output=True, text=True)
        if done.returncode == 1 and done.stderr.startswith("error: "):
            return done.stderr[len("error: "):].strip()
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"(file mapped: {'yes' if mapped and index_items(path) else 'no'})" in done.stdout  # empty: nothing to map
        return torch.load(folder / "out.pt")
    return search


def index_items(path) -> int:
    return OPQNIndex.load(path, verify=False).ids.shape[0]


def gallery(tmp_path, items=500, num_words=16, learn_codebook=False):
    """An index of `items` random features (4 books of max(16, K) dimensions) with ids that skip and
    labels, saved; and 7 queries."""
    g = torch.Generator().manual_seed(items + num_words)
    D = 4 * max(16, num_words)
    index = OPQNIndex.from_head(OrthoPQHead(D, 10, 4, num_words, seed=0, learn_codebook=learn_codebook))
    index.add(torch.randn(items, D, generator=g), ids=torch.arange(items) * 3 + 5,
              labels=torch.randint(0, 10, (items,), generator=g))
    return index, index.save(tmp_path / "gallery.opqn"), torch.randn(7, D, generator=g)


@pytest.mark.parametrize("num_words,learn_codebook,mapped", [(16, False, False), (256, False, False),
                                                            (16, True, False), (256, False, True)])
def test_an_index_file_searched_in_cpp_gives_the_python_results(index_file_search, tmp_path, num_words,
                                                                 learn_codebook, mapped):
    index, path, queries = gallery(tmp_path, num_words=num_words, learn_codebook=learn_codebook)
    assert index.orthonormal != learn_codebook
    for k in (1, 10, 500, 503):  # k beyond the 500 items: padding, as FAISS pads
        scores, ids, tables = index_file_search(path, queries, k, mapped=mapped)
        want_scores, want_ids = index.search(queries, k)
        assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    if learn_codebook:  # tables from the quantized queries' products with the codebook
        torch.testing.assert_close(tables, index.query_lut(queries), rtol=1e-6, atol=1e-7)
    else:  # the soft_quantize kernel's probabilities, as in Python
        assert torch.equal(tables, index.query_lut(queries))


def test_cpp_searches_among_subsets_of_4_bit_codes_and_tables_as_python_does(index_file_search, tmp_path):
    index, path, queries = gallery(tmp_path, items=700)
    subset = torch.cat([index.ids[::3], torch.tensor([2, 4, 10**9])])  # 2, 4, 10**9: ids it lacks, ignored
    luts = index.query_lut(queries)
    for k in (240,) if SANITIZE else (1, 10, 240):  # 240: more than the subset's 234 items; sanitizers: slow starts
        for fast, rerank in ((False, 2), (True, 1), (True, 3)):
            want = index.search(queries, k, fast_scan=fast, rerank=rerank)
            options = [f"fast={rerank}"] if fast else []
            for more in ([], ["batch=3"], ["luts"]):
                scores, ids, _ = index_file_search(path, luts if "luts" in more else queries, k,
                                                   options=options + more)
                assert torch.equal(ids, want[1]) and torch.equal(scores, want[0]), (k, fast, rerank, more)
            want = index.search(queries, k, fast_scan=fast, rerank=rerank, subset=subset)
            for more in ([], ["restricted"], ["luts"]):
                scores, ids, _ = index_file_search(path, luts if "luts" in more else queries, k,
                                                   options=options + more, subset=subset)
                assert torch.equal(ids, want[1]) and torch.equal(scores, want[0]), (k, fast, rerank, more)


@pytest.mark.parametrize("num_words", [16, 256])
def test_cpp_range_search_gives_the_python_ranges(index_file_search, tmp_path, num_words):
    index, path, queries = gallery(tmp_path, items=2500, num_words=num_words)
    queries = torch.cat([queries, index.reconstruct(index.ids[:3])])  # queries that match items well
    scores = index.search(queries, 2500)[0]
    # thresholds that leave ~0, ~50, ~1000 (growing top-k scans) and every item (every score computed)
    thresholds = [float(scores[:, 0].max()) + 1, float(scores[:, 50].median()), float(scores[:, 1000].median()),
                  float(scores.min()), float("-inf")]
    for min_score in thresholds[2:4] if SANITIZE else thresholds:  # sanitizers: each start takes seconds
        for subset in (None, index.ids[5:2000:2]):
            want = index.range_search(queries, min_score, subset=subset)
            got = index_file_search(path, queries, 1, options=[f"range={min_score!r}"], subset=subset)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (min_score, subset is None)
            assert int(got[0][-1]) == len(got[1])
    assert index_file_search(path, queries, 1, options=["range=-inf"])[0].diff().eq(2500).all()


def test_a_program_built_on_the_python_package_searches_saved_indexes_as_python(package_programs, tmp_path):
    if not package_has_index_files():
        pytest.skip("the package's C++ library was built without the index files (no nlohmann-json then)")
    search = index_searcher(os.path.join(package_programs, "search_index_file"), tmp_path)
    index, path, queries = gallery(tmp_path, items=700)
    for k in (1, 10, 703):
        for fast, mapped in ((False, False), (True, True)):
            scores, ids, tables = search(path, queries, k, mapped=mapped, options=["fast=2"] if fast else [])
            want_scores, want_ids = index.search(queries, k, fast_scan=fast)
            assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores), (k, fast)
    assert torch.equal(tables, index.query_lut(queries))
    min_score = float(index.search(queries, 50)[0][:, -1].median())
    got = search(path, queries, 1, options=[f"range={min_score!r}"])
    assert all(torch.equal(g, w) for g, w in zip(got, index.range_search(queries, min_score)))


def test_the_cpp_search_options_are_checked(index_file_search, tmp_path):
    _, path, queries = gallery(tmp_path, items=40, num_words=256)
    message = index_file_search(path, queries, 2, options=["fast=2"])
    assert "fast_scan needs K <= 16 codes; this index has K=256" in message
    _, path, queries = gallery(tmp_path, items=40)
    assert "batch_size must be >= 1, got 0" in index_file_search(path, queries, 2, options=["batch=0"])
    assert "luts must be [nq, 4, 16], got [7, 4, 15]" in index_file_search(path, torch.rand(7, 4, 15), 2,
                                                                               options=["luts"])
    assert "subset must be integers, got Float" in index_file_search(path, queries, 2, subset=torch.rand(3))
    assert "min_score must be a number, got nan" in index_file_search(path, queries, 2, options=["range=nan"])
    queries[2, 0] = float("inf")
    for options in (["range=0.5"], ["fast=2"]):
        assert "queries rows [2] give tables that are not finite" in index_file_search(path, queries, 2,
                                                                                      options=options)


@pytest.mark.skipif(not (CUDA and torch.cuda.is_available()), reason="the library's CUDA kernels and a GPU")
def test_an_index_file_searched_on_cuda_in_cpp_gives_the_python_results(index_file_search, tmp_path):
    index, path, queries = gallery(tmp_path)
    scores, ids, tables = index_file_search(path, queries, 10, "cuda")
    on_cuda = index.to("cuda")
    want_scores, want_ids = on_cuda.search(queries, 10)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    torch.testing.assert_close(tables, index.query_lut(queries).cpu(), rtol=1e-6, atol=1e-7)
    subset = index.ids[::3]
    for options, fast, sub in ((["fast=2"], True, None), ([], False, subset), (["fast=2"], True, subset)):
        scores, ids, _ = index_file_search(path, queries, 10, "cuda", options=options, subset=sub)
        want_scores, want_ids = on_cuda.search(queries, 10, fast_scan=fast, subset=sub)
        assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores), options
    min_score = float(on_cuda.search(queries, 40)[0][:, -1].median())
    got = index_file_search(path, queries, 1, "cuda", options=[f"range={min_score!r}"])
    assert all(torch.equal(g, w) for g, w in zip(got, on_cuda.range_search(queries, min_score)))


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
    for mapped in (False, True):
        path.write_bytes(good[:-40])
        assert "truncated index file (array" in index_file_search(path, queries, 2, mapped=mapped)
        path.write_bytes(good)
        flip_a_bit_in_array(path, "codes")
        message = index_file_search(path, queries, 2, mapped=mapped)
        assert "is corrupted (CRC-32 mismatch)" in message and "array codes" in message
    from safetensors.torch import save_file
    save_file({"codes": torch.zeros(2, 4, dtype=torch.uint8)}, tmp_path / "plain.safetensors")
    assert "not an OPQN index" in index_file_search(tmp_path / "plain.safetensors", queries, 2)
    path.write_bytes(good)
    assert "queries must be [nq, 64]" in index_file_search(path, queries[:, :60], 2)
    assert "k must be >= 1, got 0" in index_file_search(path, queries, 0)
    queries[3, 5] = float("nan")
    assert "queries rows [3] give tables that are not finite" in index_file_search(path, queries, 2)


def test_damaged_index_files_are_refused_in_cpp_as_in_python_never_crashing(programs, tmp_path):
    if JSON_PREFIX is None:
        pytest.skip("the C++ index files need nlohmann/json.hpp: pip install nlohmann-json (the dev extra)")
    program = os.path.join(programs[1], "load_index_files")
    for num_words in (16, 256):
        folder = tmp_path / f"K{num_words}"
        folder.mkdir()
        _, path, _ = gallery(folder, items=70, num_words=num_words)
        damaged = damaged_copies(path, folder, seed=num_words)
        files = [str(path)] + [str(file) for file, _ in damaged]
        for verify in ("verify", "noverify"):
            for read in ("map", "read"):
                done = subprocess.run([program, verify, read, *files], capture_output=True, encoding="utf-8",
                                      errors="replace")  # messages quote the damaged bytes
                assert done.returncode == 0, f"{verify} {read}: {done.stderr[-3000:]}"
                lines = done.stdout.splitlines()
                assert len(lines) == len(files) and lines[0] == "ok 70", lines[:1]
                for file, line in zip(files, lines):
                    assert line.startswith("ok ") or line.startswith(f"error: {file}: "), (file, line)
                if verify == "verify":
                    for (file, in_arrays), line in zip(damaged, lines[1:]):
                        assert not in_arrays or "is corrupted (CRC-32 mismatch)" in line, (file, line)
                        try:  # Python's loader accepts and refuses the same files
                            OPQNIndex.load(file, mmap=read == "map")
                            python = "ok"
                        except (ValueError, OSError) as err:
                            python = f"error: {err}"
                        assert line.startswith("ok") == python.startswith("ok"), (file, line, python)


@pytest.fixture(scope="module")
def index_file_update(programs, tmp_path_factory):
    """index_file_update(source, batches, output, device, mapped) -> what each step gave, from the C++
    program update_index_file (source: an index file, loaded mapped or not, or a model tuple for
    Index::create), or its error message (a str)."""
    if JSON_PREFIX is None:
        pytest.skip("the C++ index files need nlohmann/json.hpp: pip install nlohmann-json (the dev extra)")
    program = os.path.join(programs[1], "update_index_file")
    folder = tmp_path_factory.mktemp("index_file_update")

    def update(source, batches, output, device="cpu", mapped=False):
        if isinstance(source, tuple):
            torch.save(source, folder / "model.pt")
            source = folder / "model.pt"
        torch.save(batches, folder / "batches.pt")
        done = subprocess.run([program, str(source), str(folder / "batches.pt"), str(output), str(folder / "ids.pt"),
                               device, *(["map"] if mapped else [])], capture_output=True, text=True)
        if done.returncode == 1 and done.stderr.startswith("error: "):
            return done.stderr[len("error: "):].strip()
        assert done.returncode == 0, done.stdout + done.stderr
        return list(torch.load(folder / "ids.pt"))
    return update


def updates(D, M, K, seed=0):
    """Steps of every kind: features with default ids (after those held), with ids after those, with
    ids between them in no order (sorted in), codes with labels, an empty batch, a removal of ids
    held and not held, float64 features."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(40, D, generator=g), None, None),
            (torch.randn(30, D, generator=g), torch.arange(30, dtype=torch.int32) * 7 + 2000,
             torch.randint(0, 5, (30,), generator=g)),
            (torch.randn(25, D, generator=g), torch.randperm(25, generator=g) * 3 + 1000, None),
            (torch.randint(0, K, (9, M), generator=g, dtype=torch.uint8), None, torch.arange(9)),
            (torch.zeros(0, D), None, None),
            (None, torch.tensor([[1000, 1003, 7], [5, 2000, 30_000]], dtype=torch.int16), None),
            (torch.randn(3, D, generator=g, dtype=torch.float64), None, None)]


def apply_in_python(index, batches):
    """What update_index_file gives for the steps of `batches`, done by OPQNIndex."""
    given = []
    for values, ids, labels in batches:
        if isinstance(values, str):  # ("merge", path, id offset) or ("reconstruct", ids, None)
            given.append(index.merge_from(OPQNIndex.load(ids), labels) if values == "merge" else index.reconstruct(ids))
        elif values is None:
            given += [index.contains(ids), index.labels_of(ids), torch.tensor([index.remove(ids)])]
        else:
            given.append(index.add_codes(values, ids, labels) if values.dtype == torch.uint8
                         else index.add(values, ids, labels))
    return given


def assert_same_index(loaded, index):
    for name in ("codes", "ids", "labels", "assign_weight", "codebook"):
        assert torch.equal(getattr(loaded, name).cpu(), getattr(index, name).cpu()), name
    assert (loaded.query_scale, loaded.orthonormal, loaded.settings) == (index.query_scale, index.orthonormal,
                                                                         index.settings)


@pytest.mark.parametrize("num_words,learn_codebook,mapped", [(16, False, False), (256, True, False), (16, False, True)])
def test_items_added_and_saved_in_cpp_load_in_python_as_python_adds_them(index_file_update, tmp_path, num_words,
                                                                         learn_codebook, mapped):
    index, path, queries = gallery(tmp_path, items=60, num_words=num_words, learn_codebook=learn_codebook)
    index.settings = {"backbone": "resnet20", "bits": [32, 64], "note": "é"}
    index.save(path)
    batches = updates(index.num_books * index.dim, index.num_books, num_words)
    output = path if mapped else tmp_path / "updated.opqn"  # mapped: saved over the file it maps
    given = index_file_update(path, batches, output, mapped=mapped)
    want = apply_in_python(index, batches)
    assert len(given) == len(want) and all(torch.equal(g, w) for g, w in zip(given, want))
    loaded = OPQNIndex.load(output)
    assert given[5].tolist() == [[True, True, False], [True, True, False]] and given[7].item() == 4
    assert given[6][0, 2] == given[6][1, 2] == -1 and given[6][1, 1] != -1  # 7, 30000: not held; 2000 labelled
    assert len(loaded) == 60 + 40 + 30 + 25 + 9 - 4 + 3
    assert_same_index(loaded, index)
    for got, expected in zip(loaded.search(queries, 12), index.search(queries, 12)):
        assert torch.equal(got, expected)


def test_an_index_made_in_cpp_is_a_safetensors_file_python_reads(index_file_update, tmp_path):
    head = OrthoPQHead(64, 10, 4, 16, seed=3)
    index = OPQNIndex.from_head(head, settings={"dataset": "orl"})
    model = (index.assign_weight, index.codebook, index.query_scale, '{"dataset": "orl"}', None)
    batches = [(None, torch.tensor([0, 3]), None)] + updates(64, 4, 16, seed=1)  # a removal from nothing first
    given = index_file_update(model, batches, tmp_path / "made.opqn")
    assert [t.tolist() for t in given[:3]] == [[False, False], [-1, -1], [0]]
    assert all(torch.equal(g, w) for g, w in zip(given, apply_in_python(index, batches)))
    loaded = OPQNIndex.load(tmp_path / "made.opqn", mmap=True)
    assert loaded.orthonormal and loaded.settings == {"dataset": "orl"}
    assert_same_index(loaded, index)
    from safetensors import safe_open
    with safe_open(tmp_path / "made.opqn", "pt") as f:  # the reference reader of the format
        assert set(f.keys()) == {"codes", "ids", "labels", "assign_weight", "codebook"}
        assert torch.equal(f.get_tensor("ids"), index.ids) and torch.equal(f.get_tensor("codes"), index.codes)
    header_len = int.from_bytes((tmp_path / "made.opqn").read_bytes()[:8], "little")
    assert header_len % 8 == 0  # the arrays start aligned: 8-byte ids first, memory-mapped by load


def test_an_index_saved_in_cpp_replaces_the_file_whole_and_keeps_its_permissions(index_file_update, tmp_path):
    _, path, _ = gallery(tmp_path, items=20)
    os.chmod(path, 0o640)
    assert index_file_update(path, [(torch.randn(5, 64), None, None)], path)[0].tolist() == list(range(63, 68))
    assert os.stat(path).st_mode & 0o777 == 0o640 and len(OPQNIndex.load(path)) == 25
    assert sorted(os.listdir(tmp_path)) == ["gallery.opqn"]  # no temporary file left
    fresh = tmp_path / "fresh.opqn"
    index_file_update(path, [], fresh)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(fresh).st_mode & 0o777 == 0o666 & ~umask
    message = index_file_update(path, [], tmp_path / "no_such_folder" / "x.opqn")
    assert "cannot create the index file" in message and "No such file or directory" in message


def test_indexes_merged_in_cpp_and_the_items_it_reconstructs_are_pythons(index_file_update, tmp_path):
    index, path, _ = gallery(tmp_path, items=60)  # ids 5, 8, ..., 182
    head = OrthoPQHead(64, 10, 4, 16, seed=0)  # gallery's model
    g = torch.Generator().manual_seed(4)
    parts = {}
    for name, ids in (("after", torch.arange(20) + 500), ("between", torch.arange(20) * 3 + 6), ("none", None)):
        part = OPQNIndex.from_head(head)
        if ids is not None:  # 500, ...: after every id held (appended); 6, 9, ...: between them (sorted in)
            part.add(torch.randn(20, 64, generator=g), ids=ids, labels=torch.randint(0, 9, (20,), generator=g))
        parts[name] = str(part.save(tmp_path / f"{name}.opqn"))
    batches = [("merge", parts["after"], 0), ("merge", parts["between"], 0), ("merge", parts["none"], 7),
               ("merge", parts["after"], 1000), ("reconstruct", torch.tensor([[5, 506], [1512, 9]]), None),
               (torch.randn(3, 64, generator=g), None, None)]
    given = index_file_update(path, batches, tmp_path / "merged.opqn")
    want = apply_in_python(index, batches)
    assert len(given) == len(want) and all(torch.equal(a, b) for a, b in zip(given, want))
    assert given[4].shape == (4, 64) and given[5].tolist() == [1520, 1521, 1522]
    assert_same_index(OPQNIndex.load(tmp_path / "merged.opqn"), index)
    (tmp_path / "wider").mkdir()
    others = {"other": OPQNIndex.from_head(OrthoPQHead(64, 10, 4, 16, seed=1)),
              "scaled": OPQNIndex(index.assign_weight, index.codebook, 2.0),
              "wider": gallery(tmp_path / "wider", items=3, num_words=32)[0]}
    parts.update({name: str(part.save(tmp_path / f"{name}.opqn")) for name, part in others.items()})
    for steps, expected in [
            ([("merge", parts["other"], 0)], "other cannot be merged: its assignment weights differ (another model "
                                             "made its codes)"),
            ([("merge", parts["scaled"], 0)], "other cannot be merged: its query tables differ (query scale or "
                                              "codebook kind)"),
            ([("merge", parts["wider"], 0)], "other cannot be merged: its codes are M=4 books of K=32 words (d=32), "
                                             "not M=4, K=16 (d=16)"),
            ([("merge", parts["between"], 0)] * 2, "other holds ids this index holds already: [6, 9, 12, 15, 18, 21, "
                                                   "24, 27, 30, 33] and 10 more"),
            ([("merge", parts["after"], -501)], "other's ids plus id_offset must not hold -1"),
            ([("reconstruct", torch.tensor([5, 7, 8]), None)], "ids not in the index: [7]")]:
        message = index_file_update(path, steps, tmp_path / "out.opqn")
        assert isinstance(message, str) and expected in message, (expected, message)
    assert not (tmp_path / "out.opqn").exists()


def test_the_cpp_index_names_bad_items_and_models(index_file_update, tmp_path):
    _, path, _ = gallery(tmp_path, items=20)  # ids 5, 8, ..., 62
    out = tmp_path / "out.opqn"
    nan = torch.randn(6, 64)
    nan[4, 2] = float("nan")
    for batch, expected in [
            ((torch.randn(3, 60), None, None), "features must be [B, 64], got [3, 60]"),
            ((nan, None, None), "features must be finite: rows [4] hold NaN or infinite values"),
            ((torch.zeros(2, 4, dtype=torch.int32), None, None), "features must be"),
            ((torch.full((2, 4), 16, dtype=torch.uint8), None, None), "codes must be < K=16, got a code 16"),
            ((torch.zeros(2, 3, dtype=torch.uint8), None, None), "codes must be uint8 [B, 4], got Byte [2, 3]"),
            ((torch.randn(2, 64), torch.tensor([1.0, 2.0]), None), "ids must be 2 integers, got Float [2]"),
            ((torch.randn(2, 64), torch.tensor([100]), None), "ids must be 2 integers, got Long [1]"),
            ((torch.randn(2, 64), torch.tensor([7, 7]), None), "ids must be unique: the batch repeats an id"),
            ((torch.randn(3, 64), torch.tensor([7, 8, 11]), None), "ids already in the index: [8, 11]"),
            ((torch.randn(2, 64), torch.tensor([-1, 3]), None), "ids must not hold -1"),
            ((torch.randn(2, 64), None, torch.tensor([True, False])), "labels must be 2 integers, got Bool [2]"),
            ((None, torch.tensor([5.0]), None), "ids must be integers, got Float")]:
        message = index_file_update(path, [batch], out)
        assert isinstance(message, str) and expected in message, (expected, message)
    assert not out.exists()  # nothing saved after a refused batch
    A = torch.randn(2, 8, 4)
    for model, expected in [
            ((A, A[:, :, :3], 1.0, "{}", None), "assign_weight and codebook must both be [M, d, K]"),
            ((torch.randn(1, 300, 257), torch.randn(1, 300, 257), 1.0, "{}", None), "K must be <= 256, got K=257"),
            ((A.masked_fill(A > 1, float("inf")), A, 1.0, "{}", None), "assign_weight must be finite"),
            ((A, A, float("nan"), "{}", None), "query_scale must be finite"),
            ((A, A, 1.0, "[1, 2]", None), "settings must be the text of a JSON object, got [1, 2]"),
            ((A, A, 1.0, "{", None), "settings must be the text of a JSON object")]:
        message = index_file_update(model, [], out)
        assert isinstance(message, str) and expected in message, (expected, message)


@pytest.mark.skipif(not (CUDA and torch.cuda.is_available()), reason="the library's CUDA kernels and a GPU")
def test_items_added_on_cuda_in_cpp_are_those_python_adds(index_file_update, tmp_path):
    index, path, queries = gallery(tmp_path, items=60)
    batches = updates(64, 4, 16)
    index_file_update(path, batches, tmp_path / "updated.opqn", "cuda")
    apply_in_python(index.to("cuda"), batches)
    assert_same_index(OPQNIndex.load(tmp_path / "updated.opqn"), index)
