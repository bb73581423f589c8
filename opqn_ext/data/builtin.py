"""The built-in image data sets by name, whole and at their own size: ORL faces, Fashion-MNIST (its
60k training images followed by its 10k test images)."""
from __future__ import annotations

from typing import cast

import torch

from .datasets import LabeledImages
from .fashion_mnist import load_fashion_mnist
from .orl import load_orl

BUILTIN_DATASETS = ("orl", "fashion-mnist")


def load_builtin(name: str) -> LabeledImages:
    """The data set ``name`` (one of ``BUILTIN_DATASETS``); item ``i`` is the data set's ``i``-th image."""
    if name == "orl":
        return load_orl()
    if name == "fashion-mnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        return LabeledImages(torch.cat([cast(torch.Tensor, train.images), cast(torch.Tensor, test.images)]),
                             torch.cat([train.labels, test.labels]), train.classes)
    raise ValueError(f"name must be one of {', '.join(BUILTIN_DATASETS)}, got {name!r}")
