"""What ``opqn search --query`` and ``opqn index add --files`` read: image files, or every image
below the folders named (no identity layout needed), read as the model's training data was read,
so that an image that is also in the training set gives that item's features; for a model on
feature files (the mlp backbone), feature files.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .data.folders import IMAGE_EXTENSIONS, images_below
from .data.image_files import ImageFiles, read_image

FEATURE_SUFFIXES = (".npy", ".safetensors")


def input_paths(specs: Sequence[str], features: bool, option: str = "--query") -> list[str]:
    """The files that ``specs`` name, in order: image files and the images below folders, or with
    ``features`` feature files (.npy ``[n, D]``, or .safetensors holding ``features``); errors name
    them as arguments of ``option``."""
    paths = []
    for spec in specs:
        if os.path.isdir(spec) and not features:
            found = images_below(spec)
            if not found:
                raise ValueError(f"{option} {spec}: no images with extensions {', '.join(IMAGE_EXTENSIONS)} below it")
            paths += found
        elif os.path.isfile(spec):
            suffixes = FEATURE_SUFFIXES if features else IMAGE_EXTENSIONS
            if os.path.splitext(spec)[1].lower() not in suffixes:
                what = "feature files (the model takes features)" if features else "images"
                raise ValueError(f"{option} {spec}: expected {what} ending in {', '.join(suffixes)}")
            paths.append(spec)
        else:
            raise ValueError(f"{option} {spec} does not exist" if not os.path.exists(spec) else
                             f"{option} {spec}: the model takes features, name feature files")
    return paths


def _feature_rows(path: str, option: str) -> torch.Tensor:
    if path.endswith(".npy"):
        rows = torch.from_numpy(np.load(path))
    else:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            if "features" not in f.keys():
                raise ValueError(f"{option} {path} must hold a tensor 'features', has {sorted(f.keys())}")
            rows = f.get_tensor("features")
    if rows.dim() != 2 or not rows.dtype.is_floating_point:
        raise ValueError(f"{option} {path}: features must be floating [n, D], got {rows.dtype} {list(rows.shape)}")
    return rows.float()


def inputs_of(paths: Sequence[str], dataset: str, input_shape: Sequence[int],
              option: str = "--query") -> tuple[list[str], torch.Tensor | ImageFiles]:
    """(a name per input, the model inputs) of the files ``paths``, prepared as the
    training data set's (``dataset``) were: for a model of ``input_shape`` ``[D]``, every row of the
    feature files (named ``file[row]``); else one uint8 ``[C, S, S]`` image per file, decoded at the
    input size as an image folder is (streamed, by the caller's loader) or, for the built-in image
    sets, at its own size and then resized as those are."""
    if len(input_shape) == 1:
        files = [(p, _feature_rows(p, option)) for p in paths]
        rows = torch.cat([r for _, r in files])
        if rows.shape[1] != input_shape[0]:
            raise ValueError(f"{option} features have {rows.shape[1]} dimensions, the model takes {input_shape[0]}")
        return [f"{p}[{i}]" for p, r in files for i in range(len(r))], rows
    channels, size = int(input_shape[0]), (int(input_shape[1]), int(input_shape[2]))
    if dataset == "folder":
        return list(paths), ImageFiles(paths, size, grayscale=channels == 1)
    from .train import images_to_inputs

    return list(paths), torch.cat([images_to_inputs(torch.from_numpy(read_image(p, None, channels == 1))[None],
                                                    size[0]) for p in paths])
