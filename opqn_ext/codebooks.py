"""Orthonormal codebook constructions: [M, d, K] with C_m^T C_m = I_K (DESIGN.md section 1)."""
import math
from typing import Optional

import torch

from .ops import _integer

KINDS = ("dct", "random", "hadamard")


def _dct_matrix(d: int) -> torch.Tensor:
    """The orthonormal d x d DCT-II matrix of the paper: T[j, k] = cos((j + 0.5) k pi / d), column 0
    divided by sqrt(2), everything divided by sqrt(d / 2)."""
    j = torch.arange(d, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(d, dtype=torch.float64).unsqueeze(0)
    t = torch.cos((j + 0.5) * k * math.pi / d)
    t[:, 0] /= math.sqrt(2.0)
    return t / math.sqrt(d / 2.0)


def _hadamard_matrix(d: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix scaled to orthonormal columns (d a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def _generator(seed: Optional[int]) -> Optional[torch.Generator]:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _positive_integer(name: str, value) -> int:
    try:
        number = _integer(name, value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def orthonormal_codebooks(
    num_books: int,
    dim: int,
    num_words: int,
    kind: str = "dct",
    seed: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> torch.Tensor:
    """Fixed orthonormal codebooks ``[num_books, dim, num_words]``: book m's columns are its words.

    kind:
        ``"dct"``: the paper's construction. With T the orthonormal DCT-II matrix, book 0 is the first
            ``num_words`` columns of T and book i is ``T @ book(i-1)``. Deterministic; ``seed`` unused.
        ``"random"``: per book, the Q factor of a Gaussian ``[dim, num_words]`` matrix (signs fixed so
            diag(R) > 0). ``seed`` makes it reproducible; None draws from torch's global generator.
        ``"hadamard"``: ``dim`` a power of two. Book 0 is the first ``num_words`` columns of the
            scaled Sylvester Hadamard matrix H; book m > 0 is the same with rows sign-flipped by a
            Rademacher diagonal drawn from ``seed`` (0 when None), so books differ.

    Raises:
        ValueError: sizes that are not positive integers (Python or numpy), ``num_words > dim``, an
            unknown ``kind``, ``kind="hadamard"`` with ``dim`` not a power of two, or a ``dtype``
            that is not a real floating-point type. Each message names the argument.
    """
    num_books, dim, num_words = (_positive_integer(name, value) for name, value in
                                 (("num_books", num_books), ("dim", dim), ("num_words", num_words)))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (orthonormal words are not integers), "
                         f"got {dtype!r}")
    if num_words > dim:
        raise ValueError(
            f"num_words ({num_words}) must be <= dim ({dim}): at most dim orthonormal words fit in dim dimensions"
        )
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    if kind == "dct":
        t = _dct_matrix(dim)
        books = [t[:, :num_words]]
        for _ in range(1, num_books):
            books.append(t @ books[-1])
    elif kind == "random":
        g = _generator(seed)
        books = []
        for _ in range(num_books):
            q, r = torch.linalg.qr(torch.randn(dim, num_words, dtype=torch.float64, generator=g))
            books.append(q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(())))
    else:
        if dim & (dim - 1):
            raise ValueError(f"dim must be a power of two for kind='hadamard', got {dim}")
        h = _hadamard_matrix(dim)[:, :num_words]
        g = _generator(0 if seed is None else seed)
        books = [h]
        for _ in range(1, num_books):
            signs = torch.randint(0, 2, (dim, 1), generator=g, dtype=torch.float64) * 2 - 1
            books.append(h * signs)
    return torch.stack(books).to(dtype=dtype, device=device)
