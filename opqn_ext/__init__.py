"""opqn_ext: fused C++/CUDA ops for Orthonormal Product Quantization Networks (OPQN).

Public API (shapes in DESIGN.md section 2):
    orthonormal_codebooks(num_books, dim, num_words, kind="dct")  -> [M, d, K]
    soft_quantize(x, assign_weight, codebook, scale=1.0, normalize=False)
        -> (probs [B, M, K], quantized [B, M, d], entropy [B, M])
    encode(x, assign_weight) -> codes [B, M] uint8
    adc_topk(lut [nq, M, K], codes [N, M], k) -> (scores [nq, k], indices [nq, k])
    adc_scores(lut, codes) -> scores [nq, N] (every ADC score)
    pack_codes4(codes [N, M], values < 16) -> PackedCodes4;  adc_topk4(lut, packed, k, rerank=2)
    rank_stats(scores [nq, N], query_labels, db_labels, cutoffs) -> RankStats (AP, hits@cutoffs)
    build_info() -> how the compiled library was built
    cmake_prefix_path -> for C++ programs: find_package(opqn_ext) finds the package's ops library
"""
import os

import torch

try:
    from . import _C
except ImportError as err:  # the compiled library is missing or does not match this torch
    raise ImportError(
        f"opqn_ext's compiled library opqn_ext._C could not be loaded ({err}). Build it against the "
        "installed torch with `pip install --no-build-isolation -e .` from the source tree (or run "
        "`make test`, which creates .venv and builds it); set OPQN_WITH_CUDA=0 for a CPU-only build."
    ) from err

from . import _autograd, _fake  # noqa: F401  (registers fake kernels and autograd formulas)
from .codebooks import orthonormal_codebooks
from .ops import (
    PackedCodes4,
    RankStats,
    SoftQuantizeResult,
    adc_scores,
    adc_topk,
    adc_topk4,
    encode,
    pack_codes4,
    rank_stats,
    soft_quantize,
)

__version__ = "0.1.0"

# The CMake package of the C++ library the package holds (lib/libopqn_ext_ops.so, include/opqn_ext):
# put it, with torch.utils.cmake_prefix_path, in CMAKE_PREFIX_PATH for find_package(opqn_ext).
cmake_prefix_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "share", "cmake")

__all__ = [
    "PackedCodes4",
    "RankStats",
    "SoftQuantizeResult",
    "adc_scores",
    "adc_topk",
    "adc_topk4",
    "encode",
    "build_info",
    "cmake_prefix_path",
    "orthonormal_codebooks",
    "pack_codes4",
    "rank_stats",
    "soft_quantize",
]


def build_info() -> dict:
    """How the compiled library was built and what it can use on this machine.

    Keys: ``version``, ``torch_version``, ``cuda_built`` (CUDA kernels compiled in),
    ``cuda_available`` (a GPU usable now), ``cpu_isas`` (CPU instruction-set paths this machine
    runs) and ``active_cpu_isa`` (the one in use; ``OPQN_CPU_ISA`` forces one).
    """
    return {
        "version": __version__,
        "torch_version": torch.__version__,
        "cuda_built": _C.cuda_built(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_isas": _C.available_cpu_isas(),
        "active_cpu_isa": _C.active_cpu_isa(),
    }
