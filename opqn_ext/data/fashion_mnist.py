"""Fashion-MNIST (60k train / 10k test, 28x28 grayscale, 10 classes) from Debian's
``dataset-fashion-mnist`` package, read from its IDX files."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from .datasets import LabeledImages

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) of unsigned bytes as an array of its shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    payload = data[4 + 4 * ndim:]
    if len(payload) != int(np.prod(shape)):
        raise ValueError(f"{path}: {len(payload)} data bytes, the header says {shape}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | Path | None = None) -> LabeledImages:
    """``split`` "train" (60000) or "test" (10000) as ``[N, 1, 28, 28]`` uint8 images."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("OPQN_FASHION_MNIST_ROOT") or FASHION_MNIST_ROOT)
    image_file, label_file = (root / name for name in _FILES[split])
    if not image_file.exists() or not label_file.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found under {root}: install it with "
            "`sudo apt-get install dataset-fashion-mnist` (or set OPQN_FASHION_MNIST_ROOT)")
    images = read_idx(image_file)
    labels = read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    return LabeledImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                         list(FASHION_MNIST_CLASSES))
