"""When the public functions compute through their references instead of the registered ops.

The registered ops differentiate in reverse mode only (``torch.library.register_autograd``), and
that formula reaches neither forward-mode AD nor torch.func's transforms: with a dual tensor
(``torch.autograd.forward_ad``) the op's outputs carry no tangent, so ``torch.func.jvp`` /
``jacfwd`` would silently give zeros, and ``torch.func.grad`` / ``vjp`` / ``jacrev`` / ``hessian``
stop with an error about ``setup_context``. Under those (and under ``vmap``), the functions of
:mod:`opqn_ext.ops` run the pure-PyTorch references (:mod:`opqn_ext.reference`), which every
transform can go through; outside them, the fused kernels run as always.
"""
from collections.abc import Callable

import torch
from torch.autograd import forward_ad


def active(*tensors: torch.Tensor) -> bool:
    """True inside a torch.func transform, or when one of ``tensors`` carries a forward-mode
    tangent (under torch.compile, whose tracing sees no tangents: inside a ``dual_level`` context)."""
    if torch._C._are_functorch_transforms_active():
        return True
    if torch.compiler.is_compiling():
        return forward_ad._current_level >= 0
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def check(checks: Callable[..., object], *args) -> None:
    """Runs an op's argument ``checks`` (its fake kernel's) before a reference does its work;
    eagerly only: torch.compile cannot trace their messages (there, a bad argument fails inside
    the reference, with torch's error)."""
    if not torch.compiler.is_compiling():
        checks(*args)
