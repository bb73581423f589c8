"""Uses an installed opqn_ext wheel from outside the checkout: python .ci/installed_smoke.py TARGET,
where TARGET is the folder the wheel was installed into (pip install --target) and is first on
PYTHONPATH. Checks that the package comes from there, that its ops, index and command line work, that
a type checker reads its types (PEP 561: py.typed, the stub of the compiled module), and that a C++
program builds against the C++ library it holds (find_package(opqn_ext)) and runs."""
import os
import subprocess
import sys
import tempfile

import torch

target = os.path.realpath(sys.argv[1])
import opqn_ext  # noqa: E402
from opqn_ext import reference  # noqa: E402
from opqn_ext.index import OPQNIndex  # noqa: E402

assert os.path.realpath(opqn_ext.__file__).startswith(target + os.sep), opqn_ext.__file__
print("opqn_ext from", os.path.dirname(opqn_ext.__file__), opqn_ext.build_info())

torch.manual_seed(0)
M, d, K = 4, 32, 16
codebook = opqn_ext.orthonormal_codebooks(M, d, K, dtype=torch.float64)
weight = torch.randn(M, d, K, dtype=torch.float64, requires_grad=True)
x = torch.randn(64, M * d, dtype=torch.float64, requires_grad=True)
got = opqn_ext.soft_quantize(x, weight, codebook, scale=2.0)
want = reference.soft_quantize(x, weight, codebook, scale=2.0)
for g, w in zip(got, want):
    torch.testing.assert_close(g, w)
assert torch.autograd.gradcheck(lambda x, w: opqn_ext.soft_quantize(x, w, codebook)[1], (x[:4], weight))

codes = opqn_ext.encode(x.detach(), weight.detach())
assert torch.equal(codes, reference.encode(x.detach(), weight.detach()))
lut = want[0].detach().float()[:8]
scores, ids = opqn_ext.adc_topk(lut, codes, 10)
ref_scores, ref_ids = reference.adc_topk(lut, codes, 10)
assert torch.equal(ids, ref_ids) and torch.equal(scores, ref_scores)
scores4, ids4 = opqn_ext.adc_topk4(lut, opqn_ext.pack_codes4(codes), 10)
torch.testing.assert_close(scores4, ref_scores)

with tempfile.TemporaryDirectory() as tmp:
    index = OPQNIndex(weight.detach().float(), codebook.float(), query_scale=4.0)
    index.add(x.detach().float())
    path = index.save(os.path.join(tmp, "db.opqn"))
    loaded = OPQNIndex.load(path)
    first = index.search(x.detach().float()[:5], 3)
    again = loaded.search(x.detach().float()[:5], 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    opqn = os.path.join(target, "bin", "opqn")
    run = os.path.join(tmp, "run")
    for args in (["train", "--dataset", "orl", "--epochs", "1", "--width", "8", "--input-size", "32",
                  "--bits", "16", "--out-dir", run, "--no-progress"], ["eval", run]):
        proc = subprocess.run([opqn, *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        print(proc.stdout.strip().splitlines()[-1])

USER_CODE = """
import torch
import opqn_ext
from opqn_ext.index import OPQNIndex

def nearest(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return opqn_ext.adc_topk(lut, codes, 10)[1]

isas: list[str] = opqn_ext._C.available_cpu_isas()
size: int = OPQNIndex.load("db.opqn").codes
"""
with tempfile.TemporaryDirectory() as tmp:  # the last line is wrong: only a checker reading the types says so
    with open(os.path.join(tmp, "user.py"), "w") as f:
        f.write(USER_CODE)
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "user.py"], cwd=tmp,
                          capture_output=True, text=True)
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and errors[0].startswith("user.py:10: error: Incompatible types in assignment "
                                                     '(expression has type "Tensor", variable has type "int")'), \
        proc.stdout
    print("mypy reads the installed package's types")

# C++ programs build against the library the wheel holds, as the README says, and pass the typed
# API's checks (cpp_tests/test_cpp_api.cpp, from the checkout; the program runs without Python).
assert os.path.realpath(opqn_ext.cmake_prefix_path).startswith(target + os.sep), opqn_ext.cmake_prefix_path
cpp_tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cpp_tests")
with tempfile.TemporaryDirectory() as tmp:
    for args in (["-S", cpp_tests, "-B", tmp, "-DCMAKE_BUILD_TYPE=Release",
                  f"-DCMAKE_PREFIX_PATH={opqn_ext.cmake_prefix_path};{torch.utils.cmake_prefix_path}"],
                 ["--build", tmp, "-j", str(os.cpu_count() or 2), "--target", "test_cpp_api"]):
        proc = subprocess.run(["cmake", *args], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([os.path.join(tmp, "test_cpp_api")], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("every check passed"), proc.stdout + proc.stderr
    print("a C++ program built against the wheel's library passes the typed API's checks")
print("installed wheel works")
