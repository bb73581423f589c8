import math

import numpy as np
import pytest
import torch

from opqn_ext import orthonormal_codebooks


@pytest.mark.parametrize("kind", ["dct", "random", "hadamard"])
@pytest.mark.parametrize("M,d,K", [(1, 1, 1), (4, 16, 16), (8, 64, 32), (2, 256, 256), (3, 8, 1)])
def test_columns_are_orthonormal(kind, M, d, K):
    c = orthonormal_codebooks(M, d, K, kind=kind, seed=3, dtype=torch.float64)
    assert c.shape == (M, d, K)
    eye = torch.eye(K, dtype=torch.float64).expand(M, K, K)
    torch.testing.assert_close(c.transpose(1, 2) @ c, eye, atol=1e-12, rtol=0)


def test_dct_is_the_papers_construction():
    d, K, M = 6, 4, 3
    t = torch.empty(d, d, dtype=torch.float64)
    for j in range(d):
        for k in range(d):
            t[j, k] = math.cos((j + 0.5) * k * math.pi / d)
    t[:, 0] /= math.sqrt(2)
    t /= math.sqrt(d / 2)
    expected = [t[:, :K], t @ t[:, :K], t @ t @ t[:, :K]]
    got = orthonormal_codebooks(M, d, K, kind="dct", dtype=torch.float64)
    for m in range(M):
        torch.testing.assert_close(got[m], expected[m], atol=1e-13, rtol=0)


def test_books_differ_from_each_other():
    for kind in ("dct", "random", "hadamard"):
        c = orthonormal_codebooks(3, 16, 8, kind=kind, seed=1, dtype=torch.float64)
        assert not torch.allclose(c[0], c[1]) and not torch.allclose(c[1], c[2])


def test_random_is_reproducible_by_seed():
    a = orthonormal_codebooks(2, 32, 16, kind="random", seed=7)
    b = orthonormal_codebooks(2, 32, 16, kind="random", seed=7)
    c = orthonormal_codebooks(2, 32, 16, kind="random", seed=8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_hadamard_entries_are_plus_minus_inverse_sqrt_d():
    c = orthonormal_codebooks(3, 32, 16, kind="hadamard", dtype=torch.float64)
    torch.testing.assert_close(c.abs(), torch.full_like(c, 32 ** -0.5))


def test_dtype_and_device():
    c = orthonormal_codebooks(2, 8, 4, dtype=torch.float16, device="cpu")
    assert c.dtype == torch.float16 and c.device.type == "cpu"


def test_numpy_integer_sizes_are_accepted():
    got = orthonormal_codebooks(np.int64(2), np.int32(8), np.uint8(4))
    assert torch.equal(got, orthonormal_codebooks(2, 8, 4))


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((0, 8, 4), {}, "num_books"),
        ((2, -1, 4), {}, "dim"),
        ((2, 8, 0), {}, "num_words"),
        ((2, 8, 9), {}, r"num_words \(9\) must be <= dim \(8\)"),
        ((2, 8.0, 4), {}, "dim"),
        ((2, 12, 4), {"kind": "hadamard"}, "dim must be a power of two"),
        ((2, 8, 4), {"kind": "pca"}, "kind must be one of"),
        ((True, 8, 4), {}, "num_books must be a positive integer, got True"),
        ((2, 8, 4), {"dtype": torch.int32}, "dtype must be a floating-point torch.dtype"),
        ((2, 8, 4), {"dtype": torch.complex64}, "dtype must be a floating-point torch.dtype"),
        ((2, 8, 4), {"dtype": "float32"}, "dtype must be a floating-point torch.dtype"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        orthonormal_codebooks(*args, **kwargs)
