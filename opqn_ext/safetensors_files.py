"""safetensors files written with the permissions any other file of the process would get.

safetensors 0.8 writes a file through a temporary file, which it creates with mode 0600, and
renames that into place (safetensors issue #782): an index, code file or feature file written by
one user would be unreadable to a search service or job of another, and rewriting a file would
drop the mode it had. :func:`save_file` writes as safetensors does, then gives the file the mode of
the file it replaces, or else the mode a new file gets under the process umask.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import torch


def process_umask() -> int:
    """The umask of this process (read from /proc where it can be, so no thread sees it changed)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # the strictest value for the moment it is set
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits of a file created with ``open(path, "w")``."""
    return 0o666 & ~process_umask()


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
              replaces: str | Path | None = None) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)``, the file then given the permission
    bits of the file it replaces (``replaces``, by default ``path`` itself) if that exists, else
    those of a new file."""
    from safetensors.torch import save_file as write

    replaced = Path(path if replaces is None else replaces)
    try:
        mode = stat.S_IMODE(replaced.stat().st_mode)
    except FileNotFoundError:
        mode = new_file_mode()
    write(tensors, str(path), metadata=metadata)
    os.chmod(path, mode)
