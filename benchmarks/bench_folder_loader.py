"""Images per second that a streamed image folder (`opqn train --stream`) delivers to training.

The folder: ORL's 400 faces written as face crops of VGGFace2's size (upscaled bicubically to
280 x 230, RGB JPEG, quality 90), five variants each (shifts and brightness), 2000 files under 40
identities. Timed: one epoch of batches of 256 in random order through `input_batches` with 0, 1
and 2 loader processes, against the loader a user would write (the same DataLoader, each image
decoded in full then resized with PIL), and reading the folder into memory (`load_image_folder`
with 0 and 2 loader processes), at the input sizes 112 and 32. The first streamed batch is checked
against the in-memory images first.

    python benchmarks/bench_folder_loader.py [--files-dir /tmp/opqn_face_jpegs] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageEnhance

from opqn_ext import data

CROP_SIZE = (230, 280)  # PIL (width, height)


def write_folder(root: Path) -> Path:
    """The face folder described above (kept between runs)."""
    if (root / "done").exists():
        return root
    orl = data.load_orl()
    for i, (image, label) in enumerate(zip(orl.images, orl.labels.tolist())):
        folder = root / f"s{label + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        face = Image.fromarray(image[0].numpy()).convert("RGB").resize(CROP_SIZE, Image.BICUBIC)
        for v in range(5):
            variant = ImageEnhance.Brightness(face.rotate(0, translate=(3 * v - 6, 2 * v - 4))).enhance(0.8 + 0.1 * v)
            variant.save(folder / f"{i % 10:02d}_{v}.jpg", quality=90)
    (root / "done").touch()
    return root


class FullDecode(data.ImageFiles):
    """The peer: every image decoded at full size, then resized (what a plain PIL loader does)."""

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.path(i)) as img:
            array = np.asarray(img.convert("RGB").resize(self.size[::-1], Image.BILINEAR))
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def epoch_rate(files, batches, workers: int) -> float:
    start = time.perf_counter()
    count = sum(len(b) for b in data.input_batches(files, batches, workers))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files-dir", default="/tmp/opqn_face_jpegs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="epochs timed per loader (the best is kept)")
    parser.add_argument("--json", default="benchmarks/results/folder_loader.json")
    args = parser.parse_args()
    root = write_folder(Path(args.files_dir))
    rows = []
    for size in (112, 32):
        streamed = data.load_image_folder(root, size=(size, size), stream=True)
        files = streamed.images
        order = torch.randperm(len(files), generator=torch.Generator().manual_seed(0))
        batches = list(order.split(args.batch))
        row = {"size": size, "images": len(files)}
        for workers in (0, 2):
            start = time.perf_counter()
            loaded = data.load_image_folder(root, size=(size, size), workers=workers)
            row[f"memory_w{workers}"] = len(files) / (time.perf_counter() - start)
        first = next(data.input_batches(files, batches[:1], 2))
        assert torch.equal(first, loaded.images[batches[0]]), "streamed batch differs from the loaded images"
        peer = FullDecode([files.path(i) for i in range(len(files))], files.size)
        peer_first = next(data.input_batches(peer, batches[:1], 0)).float()
        assert (peer_first - first.float()).abs().mean() < 3, "the full decode is not the same picture"
        for workers in (0, 1, 2):
            row[f"stream_w{workers}"] = max(epoch_rate(files, batches, workers) for _ in range(args.repeats))
        row["full_decode_w2"] = max(epoch_rate(peer, batches, 2) for _ in range(args.repeats))
        rows.append(row)
    head = (f"{'size':>5s} {'images':>7s} | {'memory w0':>9s} {'memory w2':>9s} {'stream w0':>10s} {'stream w1':>10s} "
            f"{'stream w2':>10s} | {'full w2':>8s} {'x full':>7s}")
    print(f"images/s, batches of {args.batch}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:5d} {r['images']:7d} | {r['memory_w0']:9.0f} {r['memory_w2']:9.0f} {r['stream_w0']:10.0f} "
              f"{r['stream_w1']:10.0f} {r['stream_w2']:10.0f} | {r['full_decode_w2']:8.0f} "
              f"{r['stream_w2'] / r['full_decode_w2']:7.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"batch": args.batch, "cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
