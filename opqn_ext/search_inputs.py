"""What ``opqn search --query`` reads, and how search results name what they found.

Queries: image files, or every image below the folders named (no identity layout needed), read as
the model's training data was read, so that a query image that is also in the training set gives
that item's features; for a model on feature files (the mlp backbone), feature files.

Names: an index built from a data set holds its identity names, and one built from an image folder
also the folder's path and fingerprint (:func:`folder_source`); a search maps the items it finds to
their image files while the folder still matches that fingerprint.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data.decoded_cache import folder_fingerprint
from .data.folders import IMAGE_EXTENSIONS, images_below, scan_image_folder
from .data.image_files import ImageFiles, read_image

FEATURE_SUFFIXES = (".npy", ".safetensors")


def query_paths(specs: Sequence[str], features: bool) -> list[str]:
    """The files that ``specs`` name, in order: image files and the images below folders, or with
    ``features`` feature files (.npy ``[n, D]``, or .safetensors holding ``features``)."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec) and not features:
            found = images_below(spec)
            if not found:
                raise ValueError(f"--query {spec}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} below it")
            paths += found
        elif os.path.isfile(spec):
            suffixes = FEATURE_SUFFIXES if features else IMAGE_EXTENSIONS
            if os.path.splitext(spec)[1].lower() not in suffixes:
                what = "feature files (the model takes features)" if features else "images"
                raise ValueError(f"--query {spec}: expected {what} ending in {', '.join(suffixes)}")
            paths.append(spec)
        else:
            raise ValueError(f"--query {spec} does not exist" if not os.path.exists(spec) else
                             f"--query {spec}: the model takes features, name feature files")
    return paths


def _feature_rows(path: str) -> torch.Tensor:
    if path.endswith(".npy"):
        rows = torch.from_numpy(np.load(path))
    else:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            if "features" not in f.keys():
                raise ValueError(f"--query {path} must hold a tensor 'features', has {sorted(f.keys())}")
            rows = f.get_tensor("features")
    if rows.dim() != 2 or not rows.dtype.is_floating_point:
        raise ValueError(f"--query {path}: features must be floating [n, D], got {rows.dtype} {list(rows.shape)}")
    return rows.float()


def query_inputs(paths: Sequence[str], dataset: str,
                 input_shape: Sequence[int]) -> tuple[list[str], torch.Tensor | ImageFiles]:
    """(a name per query, the model inputs of the queries) of the query files, prepared as the
    training data set's (``dataset``) were: for a model of ``input_shape`` ``[D]``, every row of the
    feature files (named ``file[row]``); else one uint8 ``[C, S, S]`` image per file, decoded at the
    input size as an image folder is (streamed, by the caller's loader) or, for the built-in image
    sets, at its own size and then resized as those are."""
    if len(input_shape) == 1:
        files = [(p, _feature_rows(p)) for p in paths]
        rows = torch.cat([r for _, r in files])
        if rows.shape[1] != input_shape[0]:
            raise ValueError(f"--query features have {rows.shape[1]} dimensions, the model takes {input_shape[0]}")
        return [f"{p}[{i}]" for p, r in files for i in range(len(r))], rows
    channels, size = int(input_shape[0]), (int(input_shape[1]), int(input_shape[2]))
    if dataset == "folder":
        return list(paths), ImageFiles(paths, size, grayscale=channels == 1)
    from .train import images_to_inputs

    return list(paths), torch.cat([images_to_inputs(torch.from_numpy(read_image(p, None, channels == 1))[None],
                                                    size[0]) for p in paths])


def folder_source(root: str | Path) -> dict:
    """What names the items of an index built from the image folder ``root``: its path, image count
    and fingerprint (the item ids are the positions of :func:`scan_image_folder`'s paths)."""
    paths, _, _ = scan_image_folder(root)
    return {"root": str(Path(root).resolve()), "count": len(paths), "fingerprint": folder_fingerprint(root, paths)}


def item_paths(source: dict) -> tuple[list[str] | None, str]:
    """(each item's image file below the folder, None if they cannot be named; why not)."""
    root = source["root"]
    try:
        paths, _, _ = scan_image_folder(root)
    except (OSError, ValueError) as err:
        return None, f"the index's image folder cannot be read ({err})"
    if len(paths) != source["count"] or folder_fingerprint(root, paths) != source["fingerprint"]:
        return None, f"{root} changed since the index was built"
    prefix = os.path.join(root, "")  # how scan_image_folder joins
    return [p[len(prefix):] if p.startswith(prefix) else os.path.relpath(p, root) for p in paths], ""
