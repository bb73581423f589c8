"""The images of items by id, for pictures of search results: read from the files and image
folders that an index's sources name, or taken from a built-in data set
(:mod:`~opqn_ext.item_sources`), in color, at their own size or shrunk to fit a tile."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .data.builtin import load_builtin
from .data.image_files import read_image
from .item_sources import item_files, source_finder

TILE_SIDE = 160  # pixels: larger images are shrunk (aspect kept) so that a montage stays small in memory


def _fit(image: torch.Tensor, side: int = TILE_SIDE) -> torch.Tensor:
    """uint8 ``[C, H, W]`` shrunk (antialiased, aspect kept) so that its longer side is at most ``side``."""
    height, width = image.shape[1:]
    if max(height, width) <= side:
        return image
    size = (max(1, round(height * side / max(height, width))), max(1, round(width * side / max(height, width))))
    shrunk = F.interpolate(image[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return shrunk[0].round_().clamp_(0, 255).to(torch.uint8)


def image_file(path: str) -> torch.Tensor:
    """An image file as uint8 ``[3, H, W]``, fit to a tile; ValueError naming an unreadable one."""
    return _fit(torch.from_numpy(read_image(path, None, grayscale=False)))


def item_images(sources: Sequence[dict], ids: torch.Tensor) -> tuple[list[list[torch.Tensor | None]], list[str]]:
    """(the image uint8 ``[C, H, W]`` of each id (any 2-d shape), None where no source shows it; why
    some could not be shown). Negative ids stand for no item. A built-in data set is loaded once,
    and only when asked for."""
    files, why = item_files(sources, ids)
    find = source_finder(sources)
    datasets: dict[int, torch.Tensor | None] = {}

    def from_dataset(item: int) -> torch.Tensor | None:
        found = find(item)
        if found is None or "dataset" not in found[1]:
            return None
        at, source = found
        if at not in datasets:
            loaded = torch.as_tensor(load_builtin(source["dataset"]).images)
            datasets[at] = loaded if len(loaded) == source["count"] else None
            if datasets[at] is None:
                why.append(f"the data set {source['dataset']} has {len(loaded)} images, not the {source['count']} "
                           f"it had when its items were indexed")
        images = datasets[at]
        return None if images is None else _fit(images[item - source["first_id"]])

    def image_of(item: int, file: str | None) -> torch.Tensor | None:
        if file is None:
            return from_dataset(item)
        try:
            return image_file(file)
        except ValueError as err:
            why.append(str(err))
            return None

    images = [[image_of(item, file) for item, file in zip(row, file_row)] for row, file_row in zip(ids.tolist(), files)]
    unsourced = sum(item >= 0 and find(item) is None for row in ids.tolist() for item in row)
    if unsourced:
        why.append(f"{unsourced} of the items come from no source the index records (added from Python, or indexed "
                   f"before opqn recorded built-in data sets)")
    return images, why
