"""When the public functions of :mod:`opqn_ext.ops` compute with plain torch operations instead
of the registered ops.

- torch.func transforms and forward-mode AD. The registered ops differentiate in reverse mode only
  (``torch.library.register_autograd``), and that formula reaches neither forward-mode AD nor
  torch.func's transforms: with a dual tensor (``torch.autograd.forward_ad``) the op's outputs
  carry no tangent, so ``torch.func.jvp`` / ``jacfwd`` would silently give zeros, and
  ``torch.func.grad`` / ``vjp`` / ``jacrev`` / ``hessian`` stop with an error about
  ``setup_context``. Under those (and under ``vmap``), the pure-PyTorch references
  (:mod:`opqn_ext.reference`) run, which every transform can go through.
- ONNX export (``torch.onnx.export``, either exporter): an ONNX graph holds standard operators
  only, so ``soft_quantize`` and ``encode`` are written with them (MatMul, Softmax, ArgMax), in the
  input's precision, as a runtime such as ONNX Runtime or TensorRT runs them; the scans as every
  score (Gather, Add) then TopK (``adc_topk``, ``adc_topk4``: exact ADC, memory ``[nq, N]``).
- ``soft_quantize`` with a tensor as its scale, traced by torch.compile: the op takes a number.

Everywhere else the fused kernels run.
"""
from collections.abc import Callable

import torch
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad

from . import reference


def differentiating(*tensors: torch.Tensor) -> bool:
    """True inside a torch.func transform, or when one of ``tensors`` carries a forward-mode
    tangent (under torch.compile, whose tracing sees no tangents: inside a ``dual_level`` context)."""
    if torch._C._are_functorch_transforms_active():
        return True
    if forward_ad._current_level < 0:  # no dual level entered: no tangents (the common case, first)
        return False
    return torch.compiler.is_compiling() or any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def vmapped() -> bool:
    """True inside torch.func.vmap (also as jacfwd and hessian run it), where no tensor's values can
    decide anything: each holds a whole batch."""
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def with_finite_lut(checks: Callable[..., object]) -> Callable[..., object]:
    """A scan's argument ``checks`` followed by the check its kernels make of ``lut`` (the first
    argument): NaN or infinities raise the op's error, never a ranking of NaN scores. Not made under
    vmap (see :func:`vmapped`), where the fallback's scores hold the NaN instead."""
    def checked(lut: torch.Tensor, *rest):
        checks(lut, *rest)
        if not vmapped() and not bool(torch.isfinite(lut).all()):
            raise RuntimeError("lut must be finite: it contains NaN or infinite values")
    return checked


def exporting_onnx() -> bool:
    """True while torch.onnx.export traces (either exporter: the dynamo one compiles, the TorchScript
    one traces); asked only then, since the question itself takes microseconds."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()) and torch.onnx.is_in_onnx_export()


def traced_tensor(value) -> bool:
    """True for a tensor while torch.compile traces: an op argument that takes a number cannot be
    read from it then (a module's buffer used as soft_quantize's scale)."""
    return isinstance(value, torch.Tensor) and torch.compiler.is_compiling()


def run(checks: Callable[..., object], plain: Callable, *args):
    """``plain(*args)``, the plain torch code of an op, after the op's argument ``checks`` (its fake
    kernel's), and inside torch.autocast as the op runs there (csrc/autocast.cpp): floating-point
    tensors other than float64 cast to float32, autocast off. The checks are skipped while
    torch.compile or torch.jit traces, which cannot follow them (there, a bad argument fails inside
    ``plain``, with torch's error)."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.type
    autocast = torch.is_autocast_enabled(device)
    if autocast:
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64
                     else a for a in args)
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        checks(*args)
    if not autocast:
        return plain(*args)
    with torch.autocast(device, enabled=False):
        return plain(*args)


def adc_topk_for_export(lut: torch.Tensor, codes: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``adc_topk`` as standard operators: every score, added in book order as the kernels add it
    (the same values, bit for bit), then TopK, which ONNX specifies to put the smaller index first
    among equal values: the op's order."""
    top = torch.topk(reference.adc_scores(lut, codes), k, dim=1)
    return top.values, top.indices


def encode_for_export(x: torch.Tensor, assign_weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """``encode`` as standard operators: codes ``[B, M]`` uint8, the first largest similarity per
    book (ArgMax keeps the first). ``normalize`` changes nothing (a positive factor per sub-vector
    changes no argmax), so it is left out. Float16/bfloat16 computed in float32, as the op does."""
    M, d, K = assign_weight.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.reshape(x.shape[0], M, d).to(compute).transpose(0, 1)  # [M, B, d]
    logits = torch.matmul(xs, assign_weight.to(compute))  # [M, B, K]
    return logits.argmax(-1).transpose(0, 1).to(torch.uint8)
