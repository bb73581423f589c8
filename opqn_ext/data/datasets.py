"""In-memory labeled data sets: images (uint8, NCHW) or precomputed features, with class names."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .image_files import ImageFiles


@dataclass
class LabeledImages:
    """``images [N, C, H, W]`` uint8 (a tensor, or :class:`ImageFiles` read on access), ``labels [N]``
    int64 in ``0..len(classes)-1``."""

    images: torch.Tensor | ImageFiles
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if isinstance(self.images, torch.Tensor) and (self.images.dim() != 4 or self.images.dtype != torch.uint8):
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if not isinstance(self.images, (torch.Tensor, ImageFiles)):
            raise TypeError(f"images must be a tensor or ImageFiles, got {type(self.images).__name__}")
        _check_labels(self.labels, len(self.images), len(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "LabeledImages":
        images = self.images[indices] if isinstance(self.images, torch.Tensor) else self.images.subset(indices)
        return LabeledImages(images, self.labels[indices], self.classes)


@dataclass
class LabeledFeatures:
    """``features [N, D]`` float32 (embeddings from any recognizer), ``labels [N]`` int64."""

    features: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self):
        if self.features.dim() != 2 or not self.features.dtype.is_floating_point:
            raise ValueError(f"features must be floating-point [N, D], got {self.features.dtype} "
                             f"{list(self.features.shape)}")
        _check_labels(self.labels, len(self.features), len(self.classes))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "LabeledFeatures":
        return LabeledFeatures(self.features[indices], self.labels[indices], self.classes)


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> None:
    if labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) != n:
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} {list(labels.shape)}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
