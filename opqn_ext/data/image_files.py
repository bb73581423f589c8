"""Images read from their files when a batch needs them, for image sets larger than memory
(VGGFace2's 3.3M images), and the batch iterator that training and evaluation share.

``ImageFiles`` is a ``torch.utils.data.Dataset`` of uint8 ``[C, H, W]`` images at one size; it
holds the paths only. :func:`input_batches` gives ``inputs[b]`` for each index tensor ``b``, from a
tensor in memory or from files decoded ahead of use by DataLoader worker processes: the same bytes
either way (:func:`read_image` is the one decoder of image folders).
"""
from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .mapped_files import is_mapped, will_need

_READ_AHEAD = 4  # batches each loader process, or thread gathering from a tensor, prepares ahead of use
_DECODE_BATCH = 256  # images a loader process decodes at a time while a whole folder is decoded


def read_image(path: str | os.PathLike, size: tuple[int, int] | None, grayscale: bool) -> np.ndarray:
    """One image file as uint8 ``[C, H, W]`` (C = 1 or 3), resized to ``size`` = (height, width)
    (bilinear, antialiased) when given. JPEGs are decoded at the smallest of libjpeg's 1/2, 1/4,
    1/8 scales that stays at least ``size`` (PIL's draft mode: 1.4-1.5x and 1.9x the images per
    second of a full decode for 280 x 230 faces resized to 112 and 32 pixels, RESULTS.md). An
    unreadable file raises ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if grayscale else "RGB"
    try:
        with Image.open(path) as opened:
            if size is not None:
                opened.draft(mode, (size[1], size[0]))
            img = opened.convert(mode)
            if size is not None and img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)  # [H, W] or [H, W, 3], read-only
    except (OSError, UnidentifiedImageError) as err:
        raise ValueError(f"{os.fsdecode(path)}: unreadable image ({err})") from err
    return np.array(array[None] if grayscale else array.transpose(2, 0, 1), order="C")


class ImageFiles(Dataset):
    """``[N, C, H, W]`` uint8 images decoded from ``paths`` on access, each resized to ``size`` =
    (height, width). ``files[i]`` reads image i; :meth:`read` reads several; ``shape`` and
    ``dtype`` are those of the whole set as a tensor."""

    def __init__(self, paths: Sequence[str | os.PathLike], size: tuple[int, int], grayscale: bool = False):
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (height, width) of positive sizes, got {tuple(size)}")
        # one byte buffer, not a list of str: forked loader workers share its pages (reading a
        # Python object writes its reference count, which would copy the pages of a list per worker)
        self._paths = np.array([os.fsencode(p) for p in paths], dtype=np.bytes_) if len(paths) else np.array([], "S1")
        self.size, self.grayscale = (int(size[0]), int(size[1])), bool(grayscale)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._paths), 1 if self.grayscale else 3, *self.size))

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, i: int) -> str:
        return os.fsdecode(self._paths[i])

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(read_image(self.path(i), self.size, self.grayscale))

    def read(self, indices: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """The images at ``indices`` (all by default) as ``[n, C, H, W]``, decoded in this process."""
        indices = range(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.int64).tolist()
        images = [self[i] for i in indices]
        return torch.stack(images) if images else torch.empty((0, *self.shape[1:]), dtype=torch.uint8)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> "ImageFiles":
        picked = ImageFiles([], self.size, self.grayscale)
        picked._paths = self._paths[torch.as_tensor(indices, dtype=torch.int64).numpy()]
        return picked


class _Unreadable:
    """What a loader process sends back for a batch with an unreadable file: the error's message."""

    def __init__(self, message: str):
        self.message = message


class _BatchReader(Dataset):
    """The dataset loader processes read: a whole batch a call, an unreadable file as its message
    (raised in the training process as one line, not as a worker's wrapped traceback)."""

    def __init__(self, files: ImageFiles):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, indices: list[int]) -> torch.Tensor | _Unreadable:
        try:
            return self.files.read(indices)
        except ValueError as err:
            return _Unreadable(str(err))


def _whole_batch(batch):
    return batch


def _raise_unreadable(batches: Iterator) -> Iterator[torch.Tensor]:
    for batch in batches:
        if isinstance(batch, _Unreadable):
            raise ValueError(batch.message)
        yield batch


class _IndexLists:
    """The batch sampler of :func:`input_batches`: each index tensor as a list, made when needed."""

    def __init__(self, batches: Sequence[torch.Tensor]):
        self.batches = batches

    def __iter__(self):
        return (b.tolist() for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def decode_into(out: torch.Tensor, files: ImageFiles, workers: int, bar) -> None:
    """Decodes every image of ``files`` into ``out`` (``[N, C, H, W]`` uint8, a tensor or a mapped
    file's), ``_DECODE_BATCH`` images at a time by ``workers`` loader processes, advancing the tqdm
    ``bar`` by each batch."""
    parts = torch.arange(len(files)).split(_DECODE_BATCH)
    for part, batch in zip(parts, input_batches(files, parts, workers)):
        out[part[0]:part[0] + len(part)] = batch
        bar.update(len(part))


def _advised_ahead(inputs: torch.Tensor, batches: Iterable[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    """``batches``, each index tensor given once the kernel has been told to read the rows of
    ``inputs`` (mapped from a file) of the ``depth`` batches after it."""
    advised: deque[torch.Tensor] = deque()
    todo = iter(batches)
    for b in itertools.islice(todo, depth):
        will_need(inputs, b)
        advised.append(b)
    while advised:
        for b in itertools.islice(todo, 1):
            will_need(inputs, b)
            advised.append(b)
        yield advised.popleft()


def _gathered_ahead(inputs: torch.Tensor, batches: Iterable[torch.Tensor], threads: int,
                    pin_memory: bool) -> Iterator[torch.Tensor]:
    """``inputs[b]`` (pinned with ``pin_memory``) gathered by ``threads`` threads, each up to
    ``_READ_AHEAD`` batches ahead of use. The gathers release the GIL: they run while the caller
    works, or waits for its GPU."""
    def gather(b: torch.Tensor) -> torch.Tensor:
        batch = inputs[b]
        return batch.pin_memory() if pin_memory else batch

    # pinned memory is allocated on a thread's current GPU: the caller's (as DataLoader's pinning thread
    # does), not GPU 0, where every process of a host would otherwise make a context
    device = torch.cuda.current_device() if pin_memory and torch.cuda.is_available() else None
    setup = (lambda: torch.cuda.set_device(device)) if device is not None else None
    pending: deque[Future[torch.Tensor]] = deque()
    todo = iter(batches)
    with ThreadPoolExecutor(threads, thread_name_prefix="opqn-read-ahead", initializer=setup) as pool:
        try:
            for b in itertools.islice(todo, threads * _READ_AHEAD):
                pending.append(pool.submit(gather, b))
            while pending:
                batch = pending.popleft().result()
                for b in itertools.islice(todo, 1):
                    pending.append(pool.submit(gather, b))
                yield batch
        finally:  # a caller that stops early waits for no gather it will not use
            for future in pending:
                future.cancel()


def input_batches(inputs: torch.Tensor | ImageFiles, batches: Sequence[torch.Tensor], workers: int = 0,
                  pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """``inputs[b]`` for each int64 index tensor ``b`` of ``batches``, in order.

    A tensor is indexed in this thread with ``workers=0``, else by ``workers`` threads up to four
    batches each ahead of use (a tensor mapped from a file larger than memory is read from disk
    meanwhile).
    ``ImageFiles`` are decoded by ``workers`` DataLoader processes, up to four batches each ahead of
    use (0: in this process, when asked). With ``pin_memory``, batches read ahead come in pinned
    memory (for copies to a GPU that do not wait)."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if isinstance(inputs, torch.Tensor):
        tensor, ordered = inputs, iter(batches)
        if is_mapped(tensor):  # the reads from disk start a few batches ahead of the gathers
            ordered = _advised_ahead(tensor, batches, _READ_AHEAD * (workers + 1))
        if workers == 0:
            return (tensor[b] for b in ordered)
        return _gathered_ahead(tensor, ordered, workers, pin_memory)
    if not isinstance(inputs, ImageFiles):
        raise TypeError(f"inputs must be a tensor or ImageFiles, got {type(inputs).__name__}")
    if not len(batches):
        return iter(())
    # its own generator: the loader draws its workers' seeds from it, not from torch's global one,
    # which training uses (dropout) and checkpoints
    loader = DataLoader(_BatchReader(inputs), batch_sampler=_IndexLists(batches), num_workers=workers,
                        collate_fn=_whole_batch, pin_memory=pin_memory,
                        prefetch_factor=_READ_AHEAD if workers else None,
                        generator=torch.Generator())
    return _raise_unreadable(iter(loader))

