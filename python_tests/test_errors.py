"""Every bad input of soft_quantize (DESIGN.md section 2) gives a clear error naming the argument,
in eager mode (C++ checks) and while tracing (fake kernels)."""
import pytest
import torch

import opqn_ext
from conftest import make_problem

X, A, C = make_problem(4, 2, 8, 4, dtype=torch.float32)


def cases():
    yield "x rank", (X[0], A, C), "x must have shape \\[B, M\\*d\\] or \\[B, M, d\\]"
    yield "x columns", (X[:, :15], A, C), "x must have M\\*d = 2\\*8 = 16 columns"
    yield "x 3d shape", (X.view(4, 4, 4), A, C), "x must have shape \\[B, 2, 8\\]"
    yield "x integer", (X.long(), A, C), "x must be a floating-point tensor"
    yield "weight rank", (X, A[0], C), "assign_weight must have shape \\[M, d, K\\]"
    yield "codebook rank", (X, A, C[0]), "codebook must have shape \\[M, d, K\\]"
    yield "codebook shape", (X, A, C[:, :, :3]), "codebook \\(it must match assign_weight\\) must have shape"
    yield "weight dtype", (X, A.double(), C), "assign_weight must have the dtype of x"
    yield "codebook dtype", (X, A, C.double()), "codebook must have the dtype of x"
    yield "K > d", (torch.zeros(4, 8), torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)), "K=5 words of dimension d=4"


@pytest.mark.parametrize("name,args,match", list(cases()), ids=[c[0] for c in cases()])
def test_bad_inputs_raise_clear_errors(name, args, match):
    with pytest.raises(RuntimeError, match=match):
        opqn_ext.soft_quantize(*args)


@pytest.mark.parametrize("name,args,match", list(cases()), ids=[c[0] for c in cases()])
def test_bad_inputs_raise_clear_errors_under_fake_tensors(name, args, match):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args]
        with pytest.raises(RuntimeError, match=match):
            opqn_ext.soft_quantize(*fake)


def test_non_finite_scale_is_rejected():
    for scale in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="scale must be finite"):
            opqn_ext.soft_quantize(X, A, C, scale)


def test_cpu_rejects_float8():
    f8 = torch.float8_e4m3fn
    with pytest.raises(RuntimeError, match="soft_quantize on CPU supports x of dtype float32, float64, float16 or bfloat16, got Float8_e4m3fn"):
        opqn_ext.soft_quantize(X.to(f8), A.to(f8), C.to(f8))


def test_backward_op_checks_gradient_shapes():
    p, q, h = opqn_ext.soft_quantize(X, A, C)
    with pytest.raises(RuntimeError, match="grad_quantized must have shape"):
        torch.ops.opqn_ext.soft_quantize_backward(None, q[:, :1], None, X, A, C, p, 1.0, False, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_entropy must have the dtype of x"):
        torch.ops.opqn_ext.soft_quantize_backward(None, None, h.double(), X, A, C, p, 1.0, False, [True, True, True])
    with pytest.raises(RuntimeError, match="probs must have shape"):
        torch.ops.opqn_ext.soft_quantize_backward(None, q, None, X, A, C, p[:2], 1.0, False, [True, True, True])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_mix_is_rejected():
    with pytest.raises(RuntimeError, match="assign_weight must be on the device of x"):
        opqn_ext.soft_quantize(X.cuda(), A, C)
    with pytest.raises(RuntimeError, match="codebook must be on the device of x"):
        opqn_ext.soft_quantize(X.cuda(), A.cuda(), C)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rejects_sizes_beyond_its_shared_memory_plan():
    x, a, c = make_problem(2, 1, 300, 4, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="soft_quantize on CUDA supports d and K up to 256, got d=300"):
        opqn_ext.soft_quantize(x, a, c)
    q, p = torch.zeros(2, 1, 300, device="cuda"), torch.full((2, 1, 4), 0.25, device="cuda")
    with pytest.raises(RuntimeError, match="soft_quantize on CUDA supports d and K up to 256, got d=300"):
        torch.ops.opqn_ext.soft_quantize_backward(None, q, None, x, a, c, p, 1.0, False, [True, True, True])
    x, a, _ = make_problem(2, 1, 1025, 4, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="encode on CUDA supports d up to 1024, got d=1025"):
        opqn_ext.encode(x, a)
    x, a = torch.ones(1, 65536, device="cuda"), torch.ones(65536, 1, 1, device="cuda")
    with pytest.raises(RuntimeError, match="soft_quantize on CUDA supports up to 65535 books, got M=65536"):
        opqn_ext.soft_quantize(x, a, a)
    with pytest.raises(RuntimeError, match="encode on CUDA supports up to 65535 books, got M=65536"):
        opqn_ext.encode(x, a)


def test_device_mix_is_rejected_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        x = mode.from_tensor(X)
        a = torch.empty(2, 8, 4, device="meta")
        with pytest.raises(RuntimeError, match="assign_weight must be on the device of x"):
            opqn_ext.soft_quantize(x, mode.from_tensor(a), mode.from_tensor(C))
