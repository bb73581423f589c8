"""Image folders in the layout face data sets come in: ``root/<identity>/<image>`` (FaceScrub,
VGGFace2, CASIA-WebFace exports). Identities are the sorted sub-folder names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .datasets import LabeledImages

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


def load_image_folder(root: str | Path, size: tuple[int, int] | None = None, grayscale: bool = False) -> LabeledImages:
    """Every image under ``root/<identity>/`` as ``[N, C, H, W]`` uint8 (C = 1 or 3).

    ``size`` = (height, width) resizes every image (bilinear); without it all images must already
    share one size. Unreadable images raise an error naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no identity sub-folders (expected root/<identity>/<image>)")
    arrays, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in files:
            try:
                with Image.open(path) as img:
                    img = img.convert("L" if grayscale else "RGB")
                    if size is not None:
                        img = img.resize((size[1], size[0]), Image.BILINEAR)
                    array = np.asarray(img, dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"{path}: unreadable image ({err})") from err
            if arrays and array.shape != arrays[0].shape:
                raise ValueError(f"{path} is {array.shape[:2]} but earlier images are {arrays[0].shape[:2]}: "
                                 "pass size=(height, width) to resize them all")
            arrays.append(array)
            labels.append(label)
    if not arrays:
        raise ValueError(f"{root} holds no images with extensions {IMAGE_EXTENSIONS}")
    images = np.stack(arrays)
    images = images[:, None] if grayscale else images.transpose(0, 3, 1, 2)
    return LabeledImages(torch.from_numpy(np.ascontiguousarray(images)), torch.tensor(labels, dtype=torch.int64), classes)
