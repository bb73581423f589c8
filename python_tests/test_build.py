import os
import shutil
import subprocess
import sys

import torch

import opqn_ext


def test_build_info_reports_build_and_machine():
    info = opqn_ext.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["cpu_isas"][0] == "scalar"
    assert info["active_cpu_isa"] in info["cpu_isas"]
    assert isinstance(info["cuda_built"], bool)
    assert info["cuda_available"] == torch.cuda.is_available()


def test_cuda_kernels_are_built_whenever_they_can_be():
    # CI machines have a CUDA torch and nvcc but no GPU: the .cu files must still be compiled.
    can_build = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if can_build and os.environ.get("OPQN_WITH_CUDA", "auto") != "0":
        assert opqn_ext.build_info()["cuda_built"]


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
