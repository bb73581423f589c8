"""``.npy`` files mapped into memory as tensors, and read-ahead advice for the rows a batch will
gather from them.

A batch of 256 random images gathered from a mapped file whose pages are on disk faults them in
one at a time, and the kernel's read-ahead around each fault reads neighbours no batch asked for
(40 batches of 112 x 112 images from a 1.5 GB file read all 1.4 GB of it). ``will_need`` tells the
kernel which rows come next (``madvise(MADV_WILLNEED)`` per row), so it reads just those (0.4 GB),
many at once, before the gather touches them: those 40 batches waited 0.21-0.32 s for their data
instead of 1.11-1.32 s (benchmarks/bench_folder_cache.py, RESULTS.md).
"""
from __future__ import annotations

import mmap
import os
import weakref

import numpy as np
import torch

# data_ptr of a mapped tensor -> (its mapping, byte offset of row 0, bytes per row, rows)
_ROW_SPANS: dict[int, tuple[mmap.mmap, int, int, int]] = {}


def map_npy(path: str | os.PathLike) -> torch.Tensor | None:
    """The array of an ``.npy`` file as a tensor on a copy-on-write mapping of the file (writes stay
    in this process), None if the file is missing, cut short, or not a C-ordered ``.npy`` array of
    numbers with at least one dimension."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(f)
            offset = f.tell()
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            if (fortran_order or dtype.fields is not None or dtype.hasobject or not shape
                    or os.fstat(f.fileno()).st_size < offset + shape[0] * row_bytes):
                return None
            if shape[0] * row_bytes == 0:
                return torch.from_numpy(np.empty(shape, dtype))
            mapping = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return None
    array = np.frombuffer(mapping, dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)
    try:
        tensor = torch.from_numpy(array)
    except TypeError:  # a dtype torch does not have
        return None
    _ROW_SPANS[tensor.data_ptr()] = (mapping, offset, row_bytes, shape[0])
    weakref.finalize(tensor, _ROW_SPANS.pop, tensor.data_ptr(), None)
    return tensor


def is_mapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is one that :func:`map_npy` returned (and still maps its file)."""
    return tensor.data_ptr() in _ROW_SPANS


def will_need(tensor: torch.Tensor, rows: torch.Tensor) -> None:
    """Asks the kernel to start reading ``tensor[rows]`` from disk, for a tensor of
    :func:`map_npy` (other tensors: nothing to do). Rows out of range are left to the gather."""
    span = _ROW_SPANS.get(tensor.data_ptr())
    if span is None or not hasattr(mmap, "MADV_WILLNEED"):
        return
    mapping, offset, row_bytes, count = span
    for row in rows.tolist():
        row = row + count if row < 0 else row
        if 0 <= row < count:
            start = offset + row * row_bytes
            aligned = start - start % mmap.PAGESIZE
            mapping.madvise(mmap.MADV_WILLNEED, aligned, start + row_bytes - aligned)
