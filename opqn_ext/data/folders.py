"""Image folders in the layout face data sets come in: ``root/<identity>/<image>`` (FaceScrub,
VGGFace2, CASIA-WebFace exports), images possibly in folders below (YouTube Faces:
``root/<identity>/<video>/<frame>``). Identities are the sorted sub-folder names of ``root``."""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .datasets import LabeledImages
from .decoded_cache import decoded_images
from .image_files import ImageFiles, decode_into, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".tif", ".tiff", ".webp")


def images_below(folder: str | Path) -> list[str]:
    """The image files at any depth below ``folder`` (symbolic links followed), a folder's own files
    in sorted order before its sub-folders'."""
    paths = []
    for parent, subfolders, files in os.walk(folder, followlinks=True):
        subfolders.sort()
        paths += [os.path.join(parent, file) for file in sorted(files)
                  if os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS]
    return paths


def scan_image_folder(root: str | Path) -> tuple[list[str], torch.Tensor, list[str]]:
    """(image paths, int64 labels, identity names) of ``root/<identity>/.../<image>``, without
    reading any image: identities in sorted order, each one's images at any depth below its folder
    (symbolic links followed), a folder's own files in sorted order before its sub-folders'."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no identity sub-folders (expected root/<identity>/<image>)")
    paths, counts = [], []
    for name in classes:
        found = images_below(root / name)
        paths += found
        counts.append(len(found))
    if not paths:
        raise ValueError(f"{root} holds no images with extensions {IMAGE_EXTENSIONS}")
    labels = torch.arange(len(classes)).repeat_interleave(torch.tensor(counts))
    return paths, labels, classes


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable of /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def load_image_folder(root: str | Path, size: tuple[int, int] | None = None, grayscale: bool = False,
                      stream: bool = False, workers: int = 0, progress: bool = False,
                      cache_dir: str | Path | None = None) -> LabeledImages:
    """Every image under ``root/<identity>/`` as ``[N, C, H, W]`` uint8 (C = 1 or 3).

    ``size`` = (height, width) resizes every image (bilinear), decoded by ``workers`` DataLoader
    processes (0: in this one); without it all images must already share one size and are read in
    this process. ``stream=True`` reads no image here: ``images`` is then an :class:`ImageFiles`
    that decodes them when a batch needs them (``size`` required), for sets larger than memory. A
    set that would not fit in the memory available is refused with that advice before any image is
    read. ``cache_dir`` (with ``size``): the images are decoded once into a file there and mapped
    from it by every later call and process, a set larger than memory included
    (:mod:`opqn_ext.data.decoded_cache`). Unreadable images raise an error naming the file.
    ``progress``: a progress bar.
    """
    from tqdm.auto import tqdm

    if stream and cache_dir is not None:
        raise ValueError("stream=True decodes the images batch by batch, cache_dir maps them decoded once: choose one")
    if stream or cache_dir is not None:
        if size is None:
            what = "stream=True" if stream else "cache_dir"
            raise ValueError(f"{what} needs size=(height, width): every image is resized to one size")
        paths, labels, classes = scan_image_folder(root)
        if cache_dir is None:
            return LabeledImages(ImageFiles(paths, size, grayscale), labels, classes)
        images, _ = decoded_images(root, paths, size, grayscale, cache_dir, workers, progress)
        return LabeledImages(images, labels, classes)
    paths, labels, classes = scan_image_folder(root)
    if size is None:  # the first image's size is every image's
        first = read_image(paths[0], None, grayscale)
        shape = first.shape
    else:
        shape = (1 if grayscale else 3, *size)
    _check_fits_in_memory(len(paths), math.prod(shape), root)
    images = torch.empty((len(paths), *shape), dtype=torch.uint8)
    bar = tqdm(total=len(paths), desc=f"reading {Path(root).name}", unit="image", disable=None if progress else True)
    if size is None:
        images[0] = torch.from_numpy(first)
        bar.update(1)
        for i, path in enumerate(paths[1:], 1):
            array = read_image(path, size, grayscale)
            if array.shape != first.shape:
                raise ValueError(f"{path} is {array.shape[1:]} but earlier images are {first.shape[1:]}: "
                                 "pass size=(height, width) to resize them all")
            images[i] = torch.from_numpy(array)
            bar.update(1)
    else:
        decode_into(images, ImageFiles(paths, size, grayscale), workers, bar)
    bar.close()
    return LabeledImages(images, labels, classes)


def _check_fits_in_memory(count: int, image_bytes: int, root) -> None:
    """Refuses a set larger than 80% of the memory available, counting one copy per process of this
    host when torchrun started several (LOCAL_WORLD_SIZE): each reads the set at the same time."""
    copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need, available = count * image_bytes * copies, available_memory()
    if available is not None and need > 0.8 * available:
        each = f" ({copies} processes on this host, one copy each)" if copies > 1 else ""
        raise ValueError(f"the {count} images of {root} take {need / 1e9:.1f} GB at this size{each}, more than the "
                         f"{available / 1e9:.1f} GB of memory available: decode them once into a file that "
                         "the processes of a host map and share, with cache_dir=DIR (opqn train --cache-dir DIR), "
                         "or read them batch by batch with stream=True (opqn train --stream)")
