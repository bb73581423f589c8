"""Where the items of an index or code file come from, so that a search can name what it finds.

An index built or grown from data keeps in its settings the identity names of its labels
(``classes``: label ``l`` is identity ``classes[l]``; -1, no identity) and a list of ``sources``:
- an image folder: its path, image count and fingerprint; item ``first_id + i`` is the folder's
  ``i``-th image in :func:`~opqn_ext.data.scan_image_folder` order. Its items are named only while
  the folder still matches the fingerprint (an image added or removed shifts the positions).
- files named one by one: item ``first_id + i`` is the ``i``-th image file (for a model on
  features, the ``i``-th feature row, named ``file[row]``).
- a built-in data set (:func:`~opqn_ext.data.load_builtin`): item ``first_id + i`` is its
  ``i``-th image; no file names it, but a montage can show it.
"""
from __future__ import annotations

import bisect
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from .data.decoded_cache import folder_fingerprint
from .data.folders import scan_image_folder


_listings: dict[str, tuple[list[str], str]] | None = None  # root -> (paths, fingerprint) in a folder_listings scope


@contextlib.contextmanager
def folder_listings() -> Iterator[None]:
    """A scope (one command) in which each folder is scanned and fingerprinted once, however often
    its items are named, shown or described: about 0.4 s per 100k images each time saved. Folders
    are taken not to change within it."""
    global _listings
    outer = _listings
    _listings = {} if outer is None else outer
    try:
        yield
    finally:
        _listings = outer


def _listing(root: str | Path) -> tuple[list[str], str]:
    """(the image files of the folder ``root``, as paths below its absolute path, in
    :func:`scan_image_folder` order; their fingerprint, which does not depend on that path)."""
    key = str(Path(root).resolve())
    if _listings is not None and key in _listings:
        return _listings[key]
    paths, _, _ = scan_image_folder(key)
    listing = paths, folder_fingerprint(key, paths)
    if _listings is not None:
        _listings[key] = listing
    return listing


def folder_source(root: str | Path, first_id: int = 0) -> dict:
    """The source of items ``first_id + i``, the ``i``-th image of the folder ``root``."""
    paths, fingerprint = _listing(root)
    return {"root": str(Path(root).resolve()), "count": len(paths), "fingerprint": fingerprint, "first_id": first_id}


def files_source(paths: Sequence[str], first_id: int) -> dict:
    """The source of items ``first_id + i``, the file (or feature row) ``paths[i]``, kept as absolute paths."""
    return {"files": [str(Path(p).resolve()) for p in paths], "first_id": first_id}


def dataset_source(name: str, count: int, first_id: int = 0) -> dict:
    """The source of items ``first_id + i``, the ``i``-th image of the built-in data set ``name``
    (which has ``count`` images)."""
    return {"dataset": name, "count": count, "first_id": first_id}


def source_end(source: dict) -> int:
    """One past the last id a source can name."""
    return source["first_id"] + (len(source["files"]) if "files" in source else source["count"])


def repeated_items(sources: Sequence[dict], new: dict, present: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """What adding the items of source ``new`` would add a second time ('' if nothing): the same
    folder unchanged, the same built-in data set, or files named before, whose items (by id) are
    still ``present`` (a function of ids giving a bool mask)."""
    if "files" in new:
        named = {path: s["first_id"] + i for s in sources if "files" in s for i, path in enumerate(s["files"])}
        again = [path for path in new["files"] if path in named]
        ids = torch.tensor([named[path] for path in again], dtype=torch.int64)
        kept = [f"{path} (id {int(i)})" for path, i, held in zip(again, ids, present(ids)) if held]
        more = f" and {len(kept) - 3} more" if len(kept) > 3 else ""
        return f"already in the index: {', '.join(kept[:3])}{more}" if kept else ""
    for old in sources:
        same_folder = "root" in new and old.get("root") == new["root"] and old.get("fingerprint") == new["fingerprint"]
        same_dataset = "dataset" in new and old.get("dataset") == new["dataset"] and old["count"] == new["count"]
        if (same_folder or same_dataset) and bool(present(torch.arange(old["first_id"], source_end(old))).any()):
            what = f"the folder {new['root']}, unchanged since," if same_folder else f"the data set {new['dataset']}"
            return f"{what} is in the index already (items of ids {old['first_id']}-{source_end(old) - 1})"
    return ""


def next_free_id(ids: torch.Tensor, settings: dict) -> int:
    """The first id above every item of an index (``ids`` increasing) and every id its sources name:
    where the items of a new source start."""
    ends = [source_end(s) for s in settings.get("sources", [])]
    return max([int(ids[-1]) + 1 if len(ids) else 0, *ends])


def merged_classes(classes: Sequence[str], new: Sequence[str]) -> tuple[list[str], Callable[[torch.Tensor], torch.Tensor]]:
    """(``classes`` followed by the names of ``new`` not among them, the map of labels of ``new`` to
    labels of that list, -1 staying -1): a known identity keeps its label."""
    merged, at = list(classes), {name: i for i, name in enumerate(classes)}
    for name in new:
        if name not in at:
            at[name] = len(merged)
            merged.append(name)
    table = torch.tensor([at[name] for name in new] + [-1], dtype=torch.int64)  # [len(new) + 1]: -1 maps to -1

    def to_merged(labels: torch.Tensor) -> torch.Tensor:
        return table[torch.where(labels >= 0, labels, len(new))]

    return merged, to_merged


def identity_names(classes: Sequence[str], labels: torch.Tensor) -> list[list[str | None]]:
    """The identity of each label (any 2-d shape), None for -1 and labels without a name."""
    return [[classes[lab] if 0 <= lab < len(classes) else None for lab in row] for row in labels.tolist()]


def folder_paths(source: dict) -> tuple[list[str] | None, str]:
    """(the image files of a folder source by position, None if they cannot be named; why not)."""
    root = source["root"]
    try:
        paths, fingerprint = _listing(root)
    except (OSError, ValueError) as err:
        return None, f"the image folder {root} cannot be read ({err})"
    if len(paths) != source["count"] or fingerprint != source["fingerprint"]:
        return None, f"{root} changed since its images were indexed"
    return paths, ""


def source_finder(sources: Sequence[dict]) -> Callable[[int], tuple[int, dict] | None]:
    """A function giving the (position in ``sources``, source) that names an id, or None."""
    starts = [s["first_id"] for s in sources]
    order = sorted(range(len(sources)), key=starts.__getitem__)
    sorted_starts = [starts[i] for i in order]

    def find(item: int) -> tuple[int, dict] | None:
        at = bisect.bisect_right(sorted_starts, item) - 1
        if at < 0 or item >= source_end(sources[order[at]]):
            return None
        return order[at], sources[order[at]]

    return find


def item_files(sources: Sequence[dict], ids: torch.Tensor) -> tuple[list[list[str | None]], list[str]]:
    """(the image file of each id (any 2-d shape), None where no source names it, or a built-in data
    set does; why the sources that could not name their items could not). A folder is scanned once,
    and only when asked for."""
    find = source_finder(sources)
    resolved: dict[int, list[str] | None] = {}
    why: list[str] = []

    def file_of(item: int) -> str | None:
        found = find(item)
        if found is None:
            return None
        at, source = found
        if at not in resolved:
            if "dataset" in source:
                resolved[at] = None
            elif "files" in source:
                resolved[at] = source["files"]
            else:
                resolved[at], reason = folder_paths(source)
                why.extend([reason] if reason else [])
        paths = resolved[at]
        return None if paths is None else os.fspath(paths[item - source["first_id"]])

    return [[file_of(item) for item in row] for row in ids.tolist()], why
