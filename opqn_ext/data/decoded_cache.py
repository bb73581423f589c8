"""An image folder decoded once into a file that later runs map into memory.

Reading a folder into memory decodes every image in every run, and in every process of a torchrun
job, each holding its own copy. The cache decodes the folder once, at one size, into an ``.npy``
file (uint8 ``[N, C, H, W]``); every later run and process maps that file (copy-on-write), so a
host holds one copy of the images (the page cache's), however many processes train on it, and a
set larger than memory is paged in from disk as batches need it.

A cache is tied to the folder's content: its manifest holds a fingerprint of every image file's
path, size and modification time, and a folder that changed since (an image added, removed or
rewritten) is decoded again. Under torchrun the first process of each host (``LOCAL_RANK`` 0)
decodes, with the loader processes of all its host's ranks; the others wait for its manifest.
A process that decodes holds a lock on a file beside the cache (``flock``), so that another job, on
this host or on another one sharing ``cache_dir`` over a network file system, waits for it and then
maps its file instead of decoding the folder a second time. (On a file system without ``flock``,
such as Lustre mounted without ``-o flock``, each decodes; both results are correct.)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..file_lock import exclusive_lock
from .image_files import ImageFiles, decode_into
from .mapped_files import map_npy

CACHE_VERSION = 1
_WAIT_POLL_SECONDS = 0.2
# a failure older than this when a process starts waiting is an earlier job's (LOCAL_RANK 0 removes
# its own job's before decoding)
_STALE_FAILURE_SECONDS = 30.0


def folder_fingerprint(root: str | Path, paths: Sequence[str]) -> str:
    """sha256 (hex) of each image's path below ``root``, byte size and modification time, in order."""
    digest, prefix = hashlib.sha256(), os.path.join(str(Path(root)), "")  # how scan_image_folder joins
    for path in paths:
        st = os.stat(path)
        path = os.fspath(path)
        below = path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, root)
        digest.update(f"{below}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def cache_files(cache_dir: str | Path, root: str | Path, size: tuple[int, int], grayscale: bool) -> tuple[Path, Path]:
    """(images .npy, manifest .json) of ``root`` read at ``size`` in ``cache_dir``: named after the
    folder, the size and the channels, and a hash of the folder's absolute path (two folders of one
    name do not share a file)."""
    root = Path(root).resolve()
    tag = hashlib.sha256(os.fsencode(root)).hexdigest()[:8]
    stem = f"{root.name}-{size[0]}x{size[1]}-{'gray' if grayscale else 'rgb'}-{tag}"
    cache_dir = Path(cache_dir)
    return cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"


def _manifest(root: Path, size: tuple[int, int], grayscale: bool, count: int, fingerprint: str) -> dict:
    return {"version": CACHE_VERSION, "root": str(root.resolve()), "size": [int(s) for s in size],
            "grayscale": bool(grayscale), "count": count, "fingerprint": fingerprint}


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _open(images_path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached images mapped copy-on-write (writes stay in this process), None if the file is
    missing or not ``shape`` uint8."""
    images = map_npy(images_path)
    if images is None or images.dtype != torch.uint8 or tuple(images.shape) != shape:
        return None
    return images


def _ready(manifest_path: Path, images_path: Path, wanted: dict, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached images when the manifest says they are those ``wanted`` and the file holds them."""
    return _open(images_path, shape) if _read_manifest(manifest_path) == wanted else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _build(paths: Sequence[str], size: tuple[int, int], grayscale: bool, images_path: Path, workers: int,
           progress: bool) -> None:
    """Decodes every image into a temporary file beside ``images_path``, then renames it into place."""
    from tqdm.auto import tqdm

    files = ImageFiles(paths, size, grayscale)
    need = files.shape.numel()
    free = shutil.disk_usage(images_path.parent).free
    if need > free:
        raise ValueError(f"cache_dir {images_path.parent} has {free / 1e9:.1f} GB free; the {len(files)} images "
                         f"need {need / 1e9:.1f} GB decoded at {size[0]}x{size[1]}")
    tmp = images_path.with_name(f".{images_path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=tuple(files.shape))
        with tqdm(total=len(files), desc=f"decoding into {images_path.name}", unit="image",
                  disable=None if progress else True) as bar:
            decode_into(torch.from_numpy(array), files, workers, bar)
        array.flush()
        del array
        os.replace(tmp, images_path)
    finally:
        tmp.unlink(missing_ok=True)


def lock_file(manifest_path: Path) -> Path:
    """The file a process decoding the cache holds locked (it stays: removing it could let two
    processes lock two different files of one name)."""
    return manifest_path.with_name(f".{manifest_path.stem}.lock")


def _failure_file(manifest_path: Path) -> Path:
    """Where LOCAL_RANK 0 leaves its error for the processes of its host and torchrun job (and its
    attempt: the processes of a restart wait for a new decoding, not for the error that ended the last)."""
    job = ".".join(os.environ.get(name, "") for name in ("TORCHELASTIC_RUN_ID", "MASTER_PORT",
                                                          "TORCHELASTIC_RESTART_COUNT"))
    return manifest_path.with_name(f".{manifest_path.name}.{socket.gethostname()}.{job}.failed")


def _failed_since(failure: Path, since: float) -> str | None:
    """The message of a failure written after ``since`` (wall time), None if there is none."""
    try:
        if failure.stat().st_mtime >= since:
            return failure.read_text()
    except OSError:
        pass
    return None


def decoded_images(root: str | Path, paths: Sequence[str], size: tuple[int, int], grayscale: bool,
                   cache_dir: str | Path, workers: int = 0, progress: bool = False,
                   timeout: float | None = None) -> tuple[torch.Tensor, bool]:
    """(images ``[N, C, H, W]`` uint8 mapped from the cache of ``root`` in ``cache_dir``, whether
    this call decoded them). ``paths`` are the folder's images (:func:`scan_image_folder`).

    The cache is decoded (by ``workers`` loader processes) when missing or when the folder changed;
    under torchrun only by ``LOCAL_RANK`` 0, with ``workers`` x ``LOCAL_WORLD_SIZE`` processes,
    while the host's other processes wait for it (at most ``timeout`` seconds; None: no limit) and
    raise its error if it fails. While another job decodes the same cache, this call waits for it
    (as long, saying so on stderr with ``progress``), then maps its file."""
    root, cache_dir = Path(root), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    images_path, manifest_path = cache_files(cache_dir, root, size, grayscale)
    shape = (len(paths), 1 if grayscale else 3, *size)
    wanted = _manifest(root, size, grayscale, len(paths), folder_fingerprint(root, paths))
    images = _ready(manifest_path, images_path, wanted, shape)
    if images is not None:
        return images, False
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_rank != 0:
        return _wait_for(manifest_path, images_path, wanted, shape, timeout), False
    failure = _failure_file(manifest_path)
    failure.unlink(missing_ok=True)
    try:
        with exclusive_lock(lock_file(manifest_path), f"another process decoding the images into {images_path}",
                            timeout, progress):
            images = _ready(manifest_path, images_path, wanted, shape)  # decoded by the process that held the lock
            if images is not None:
                return images, False
            manifest_path.unlink(missing_ok=True)  # no process may take the old images for the new ones
            _build(paths, size, grayscale, images_path, workers * local_world, progress)  # the host's other ranks wait
            _write_atomically(manifest_path, json.dumps(wanted))
    except BaseException as err:
        if local_world > 1:
            _write_atomically(failure, f"{type(err).__name__}: {err}")
        raise
    images = _open(images_path, shape)
    if images is None:
        raise RuntimeError(f"{images_path} changed while it was written (another process writing the same cache?)")
    return images, True


def _wait_for(manifest_path: Path, images_path: Path, wanted: dict, shape: tuple[int, ...],
              timeout: float | None) -> torch.Tensor:
    """The images once the host's LOCAL_RANK 0 has written them and their manifest."""
    failure = _failure_file(manifest_path)
    start, since = time.monotonic(), time.time() - _STALE_FAILURE_SECONDS
    while True:
        images = _ready(manifest_path, images_path, wanted, shape)
        if images is not None:
            return images
        message = _failed_since(failure, since)
        if message is not None:
            raise RuntimeError(f"LOCAL_RANK 0 failed to decode the images into {images_path}: {message}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"waited {timeout:.0f} s for LOCAL_RANK 0 to decode the images into {images_path}")
        time.sleep(_WAIT_POLL_SECONDS)
