"""Feature files: embeddings from any face recognizer with their labels.

- ``.safetensors``: tensors ``features [N, D]`` and ``labels [N]`` (int64), and optionally the
  class names as JSON in the metadata key ``classes``.
- ``.npy``: the features; labels in a second ``.npy`` (``labels_path``, by default
  ``<name>.labels.npy`` next to it).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .datasets import LabeledFeatures


def _labels_path(path: Path) -> Path:
    return path.with_name(path.stem + ".labels.npy")


def save_features(path: str | Path, features: torch.Tensor, labels: torch.Tensor, classes: list[str] | None = None) -> None:
    """Write features and labels as ``.safetensors`` or ``.npy`` (+ ``.labels.npy``)."""
    path = Path(path)
    data = LabeledFeatures(features.float().contiguous().cpu(), labels.long().contiguous().cpu(),
                           classes or [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)])
    if path.suffix == ".safetensors":
        from ..safetensors_files import save_file

        save_file({"features": data.features, "labels": data.labels}, path, metadata={"classes": json.dumps(data.classes)})
    elif path.suffix == ".npy":
        np.save(path, data.features.numpy())
        np.save(_labels_path(path), data.labels.numpy())
    else:
        raise ValueError(f"feature files end in .safetensors or .npy, got {path.name}")


def load_features(path: str | Path, labels_path: str | Path | None = None) -> LabeledFeatures:
    """Read a feature file written by :func:`save_features` or by any tool in these formats."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file {path} does not exist")
    classes = None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if not {"features", "labels"} <= keys:
                raise ValueError(f"{path} must hold tensors 'features' and 'labels', has {sorted(keys)}")
            features, labels = f.get_tensor("features"), f.get_tensor("labels")
            meta = f.metadata() or {}
        if "classes" in meta:
            classes = json.loads(meta["classes"])
    elif path.suffix == ".npy":
        lp = Path(labels_path) if labels_path else _labels_path(path)
        if not lp.exists():
            raise FileNotFoundError(f"labels for {path} not found: expected {lp} (or pass labels_path)")
        features, labels = torch.from_numpy(np.load(path)), torch.from_numpy(np.load(lp))
    else:
        raise ValueError(f"feature files end in .safetensors or .npy, got {path.name}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{path}: labels must be integers, got {labels.dtype}")
    labels = labels.long()
    if classes is None:
        classes = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    return LabeledFeatures(features.float(), labels, classes)
