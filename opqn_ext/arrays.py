"""Array arguments of the Python API: tensors, or the NumPy arrays (and nested sequences) that
FAISS users hold."""
from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray  # features, queries, codes, tables: tensors or NumPy arrays


def as_tensor(values, name: str) -> torch.Tensor:
    """``values`` as a tensor: a tensor as it is; a NumPy array (its memory shared) or a nested
    sequence converted; anything else a TypeError naming the argument ``name``."""
    if isinstance(values, torch.Tensor):
        return values
    try:
        return torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor or an array, got {type(values).__name__} ({err})") from None
