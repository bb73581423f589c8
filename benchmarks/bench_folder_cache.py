"""What the decoded-image cache (`opqn train --cache-dir`) saves: time before training starts, and
memory on a torchrun host.

The folder is bench_folder_loader.py's (2000 JPEG face crops of VGGFace2's size, 280 x 230). Per
input size, timed: reading the folder into memory (what every run and every rank does without a
cache, 2 loader processes), decoding it into the cache (the first run), and a later run's
`load_image_folder(cache_dir=...)` (scan, fingerprint of every file, map); then an epoch of random
batches of 256 gathered from memory and from the mapped cache, images/s (checked equal first).
Memory: `torchrun --nproc_per_node 2` processes preparing the data at 112 x 112 RGB in memory and
from the cache; each reports the memory it added (/proc/self/smaps_rollup): anonymous memory
(its own, not reclaimable) and Pss (its proportional share of every page it maps), summed over the
host.

    python benchmarks/bench_folder_cache.py [--files-dir /tmp/opqn_face_jpegs] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from opqn_ext import data
from opqn_ext.data import mapped_files

sys.path.insert(0, str(Path(__file__).parent))
from bench_folder_loader import write_folder  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def gather_rate(images: torch.Tensor, batches) -> float:
    start = time.perf_counter()
    count = sum(len(b) for b in data.input_batches(images, batches))
    return count / (time.perf_counter() - start)


def memory_kib() -> dict:
    """This process's smaps_rollup fields, KiB."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


def rank_worker(root: str, cache_dir: str, out: str) -> None:
    """One torchrun process: prepares the data as `opqn train` would, and once every process holds
    it (a barrier), reports its memory."""
    import torch.distributed as dist

    from opqn_ext.train import TrainConfig, prepare_data

    before = memory_kib()
    cfg = TrainConfig(dataset="folder", data_path=root, input_size=112, cache_dir=cache_dir, workers=1,
                      progress=False)
    prepared = prepare_data(cfg)
    prepared.inputs.sum(dtype=torch.int64)  # every page touched, as an epoch would
    dist.init_process_group("gloo")
    dist.barrier()
    after = memory_kib()
    dist.barrier()
    dist.destroy_process_group()
    Path(out, f"rank{os.environ['LOCAL_RANK']}.json").write_text(json.dumps(
        {k: (after[k] - before[k]) / 1024 for k in ("Anonymous", "Pss")}))


def host_memory(root: Path, cache_dir: str, scratch: Path) -> dict:
    out = scratch / ("cached" if cache_dir else "memory")
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir",
           str(scratch / "logs"), __file__, "--rank-worker", str(root), cache_dir, str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {"anonymous_mib": sum(r["Anonymous"] for r in ranks), "pss_mib": sum(r["Pss"] for r in ranks),
            "ranks": len(ranks)}


def evict(path: Path) -> None:
    """Drops the file's pages from the page cache (no mapping of it may be open)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_ahead_epochs(scratch: Path, batch: int, step_ms: float) -> list[dict]:
    """An epoch of random batches from a mapped file of 112 x 112 RGB images (1.5 GB), each followed
    by a simulated step (sleep: the time a training step waits for a GPU), with the file's pages on
    disk (cold) and in memory (warm); gathered in the loop (workers 0) or by 1 or 2 read-ahead
    threads. `advised`: mapped as the cache maps it (`map_npy`: the kernel is told which rows the
    next batches need); `plain`: mapped by `np.load(mmap_mode="c")`, no advice."""
    path = scratch / "big.npy"
    count = 40000
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, 3, 112, 112))
    array[:] = np.random.default_rng(0).integers(0, 256, array.shape[1:], dtype=np.uint8)
    array.flush()
    del array
    batches = list(torch.randperm(count, generator=torch.Generator().manual_seed(1))[:40 * batch].split(batch))
    want = torch.from_numpy(np.load(path, mmap_mode="r")[batches[0].numpy()])
    rows = []
    for state in ("cold", "warm"):
        for mapping in ("plain", "advised"):
            for workers in (0, 1, 2):
                if state == "cold":
                    evict(path)
                if mapping == "advised":
                    images = mapped_files.map_npy(path)
                else:
                    images = torch.from_numpy(np.load(path, mmap_mode="c"))
                waited, start = 0.0, time.perf_counter()
                it = data.input_batches(images, batches, workers)
                for i in range(len(batches)):
                    t = time.perf_counter()
                    got = next(it)
                    waited += time.perf_counter() - t
                    assert i or torch.equal(got, want), "a gathered batch differs from the file's rows"
                    time.sleep(step_ms / 1000)
                seconds = time.perf_counter() - start
                rows.append({"pages": state, "mapping": mapping, "workers": workers, "seconds": seconds,
                             "waited": waited, "steps_only": len(batches) * step_ms / 1000})
                del it, images, got
                gc.collect()
    path.unlink()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files-dir", default="/tmp/opqn_face_jpegs")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--step-ms", type=float, default=10.0, help="simulated training step (read-ahead epochs)")
    parser.add_argument("--json", default="benchmarks/results/folder_cache.json")
    parser.add_argument("--rank-worker", nargs=3, metavar=("ROOT", "CACHE_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        rank_worker(*args.rank_worker)
        return
    root = write_folder(Path(args.files_dir))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for size in (112, 32):
            cache = scratch / f"cache{size}"
            loaded, t_memory = timed(lambda: data.load_image_folder(root, (size, size), workers=2))
            _, t_build = timed(lambda: data.load_image_folder(root, (size, size), workers=2, cache_dir=cache))
            cached, t_open = timed(lambda: data.load_image_folder(root, (size, size), workers=2, cache_dir=cache))
            assert torch.equal(cached.images, loaded.images), "the cache holds other bytes than the folder read"
            batches = list(torch.randperm(len(loaded), generator=torch.Generator().manual_seed(0)).split(args.batch))
            rows.append({"size": size, "images": len(loaded), "memory_s": t_memory, "build_s": t_build,
                         "open_s": t_open, "gather_memory": max(gather_rate(loaded.images, batches) for _ in range(3)),
                         "gather_cached": max(gather_rate(cached.images, batches) for _ in range(3))})
        memory = {"memory": host_memory(root, "", scratch), "cached": host_memory(root, str(scratch / "cache112"),
                                                                                  scratch)}
        ahead = read_ahead_epochs(scratch, args.batch, args.step_ms)
    print(f"seconds before training can start, {rows[0]['images']} JPEGs, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}")
    head = (f"{'size':>5s} | {'in memory':>9s} {'cache: 1st':>10s} {'later':>7s} {'x memory':>8s} | "
            f"{'gather memory':>13s} {'gather cached':>13s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['size']:5d} | {r['memory_s']:9.3f} {r['build_s']:10.3f} {r['open_s']:7.3f} "
              f"{r['memory_s'] / r['open_s']:8.1f} | {r['gather_memory']:13.0f} {r['gather_cached']:13.0f}")
    print("\n2 torchrun processes, 112 x 112 RGB: memory each added, MiB summed over the host")
    for name, m in memory.items():
        print(f"{name:>8s}: anonymous {m['anonymous_mib']:7.1f}   Pss {m['pss_mib']:7.1f}")
    print(f"\n40 random batches of {args.batch} from a mapped 1.5 GB file, each followed by a "
          f"{args.step_ms:g} ms step: seconds")
    print(f"{'pages':>6s} {'mapping':>8s} {'workers':>7s} | {'epoch':>6s} {'waited':>6s} {'steps':>6s}")
    for r in ahead:
        print(f"{r['pages']:>6s} {r['mapping']:>8s} {r['workers']:7d} | {r['seconds']:6.3f} {r['waited']:6.3f} "
              f"{r['steps_only']:6.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"batch": args.batch, "cpus": os.cpu_count(), "rows": rows,
                                          "torchrun_2_ranks": memory, "read_ahead": ahead}, indent=2))


if __name__ == "__main__":
    main()
