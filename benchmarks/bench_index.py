"""OPQNIndex at N = 1M and 10M codes (issue 5): add throughput (building the index in batches of
1M, then 200 more batches of 1000 precomputed codes into the full index), search latency (nq = 1)
and throughput (nq = 1000) with the codes in memory and memory-mapped, memory used, and a sharded
search over 2 torchrun processes (gloo, 1 thread each) against one process with 2 threads. With
``--cpp PREFIX`` (an opqn_ext C++ library installed there with its index files), the file
operations of OPQNIndex and of opqn_ext::Index from C++ (benchmarks/cpp) on the saved index, each
timed once: loading it (with CRC-32 checks, without, mapped), adding FILE_FEATURES features and
SMALL_ADDS batches of SMALL_BATCH codes, saving; the C++ result is checked equal to Python's.

The index holds 32-bit codes (8 books x 16 words, d = 64) of random 512-d features from a random
OPQN head; search results are checked equal across in-memory, mmap and sharded before timing.

    python benchmarks/bench_index.py [--sizes 1000000 10000000] [--cpp PREFIX] [--json PATH]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cpp_programs
from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead

HERE = Path(__file__).parent
D, M, K = 512, 8, 16
ADD_BATCH = 1_000_000
SMALL_BATCH, SMALL_ADDS = 1000, 200
FILE_FEATURES = 200_000
FILE_STEPS = ("load_verified", "load", "load_mapped", "add_features", "add_code_batches", "save")


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def search_timings(index, q1, q1000, k):
    t1, r1 = timed(lambda: index.search(q1, k), 20)
    tn, rn = timed(lambda: index.search(q1000, k), 3)
    return {"nq1_ms": t1 * 1e3, "nq1000_qps": len(q1000) / tn}, (r1, rn)


def file_timings(programs: Path, path: Path, g: torch.Generator, tmp: Path) -> dict:
    """Seconds of each of FILE_STEPS in Python and from C++, on the index file ``path``."""
    feats = torch.randn(FILE_FEATURES, D, generator=g)
    codes = torch.randint(0, K, (SMALL_ADDS, SMALL_BATCH, M), dtype=torch.uint8, generator=g)
    torch.save(feats, tmp / "features.pt")
    torch.save(codes, tmp / "codes.pt")
    py = {}
    py["load_verified"], index = timed(lambda: OPQNIndex.load(path, mmap=False), 1)
    py["load"], _ = timed(lambda: OPQNIndex.load(path, mmap=False, verify=False), 1)
    py["load_mapped"], _ = timed(lambda: OPQNIndex.load(path, mmap=True, verify=False), 1)
    py["add_features"], _ = timed(lambda: index.add(feats), 1)
    py["add_code_batches"], _ = timed(lambda: [index.add_codes(batch) for batch in codes], 1)
    py["save"], _ = timed(lambda: index.save(tmp / "python.opqn"), 1)
    done = subprocess.run([str(programs / "time_index_files"), str(path), str(tmp / "features.pt"), str(tmp / "codes.pt"),
                           str(tmp / "cpp.opqn")], capture_output=True, text=True, check=True)
    cpp = {name: float(value) for name, value in (line.split() for line in done.stdout.splitlines())}
    written = OPQNIndex.load(tmp / "cpp.opqn")
    assert all(torch.equal(getattr(written, a), getattr(index, a)) for a in ("codes", "ids", "labels")), \
        "the C++ index differs from Python's"
    return {"python_s": py, "cpp_s": cpp}


def sharded(path: Path, n: int, k: int, tmp: Path) -> dict:
    out = tmp / "sharded.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "--log-dir", str(tmp / "torchrun_logs"), str(HERE / "bench_index_shard_worker.py"), str(path),
                    str(out), str(k)],
                   check=True, env=env, timeout=1800)
    return json.loads(out.read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--cpp", metavar="PREFIX", help="also time the file operations from C++ (benchmarks/cpp)")
    parser.add_argument("--json", default="benchmarks/results/index.json")
    args = parser.parse_args()
    programs = cpp_programs.build(args.cpp) if args.cpp else None
    head = OrthoPQHead(D, 10, M, K, seed=0)
    g = torch.Generator().manual_seed(1)
    q1000 = torch.randn(1000, D, generator=g)
    q1 = q1000[:1]
    rows = []
    with tempfile.TemporaryDirectory(dir=".") as tmp_name:
        tmp = Path(tmp_name)
        for n in args.sizes:
            index = OPQNIndex.from_head(head)
            rss0 = rss_mib()
            add_s = 0.0
            for start in range(0, n, ADD_BATCH):
                feats = torch.randn(min(ADD_BATCH, n - start), D, generator=g)
                t = time.perf_counter()
                index.add(feats)
                add_s += time.perf_counter() - t
                del feats
            row = {"N": n, "add_items_per_s": n / add_s, "codes_mib": index.codes.numel() / 2**20,
                   "rss_growth_mib": rss_mib() - rss0}
            row["memory"], (mem1, memn) = search_timings(index, q1, q1000, args.k)
            path = tmp / f"index_{n}.opqn"
            t = time.perf_counter()
            index.save(path)
            row["save_s"] = time.perf_counter() - t
            row["file_mib"] = path.stat().st_size / 2**20
            # shards for the 2-process search: ids split by parity, as ShardedIndex does
            for rank in range(2):
                part = OPQNIndex.from_head(head)
                mine = index.ids % 2 == rank
                part.add_codes(index.codes[mine], index.ids[mine])
                part.save(path.with_name(f"{path.name}.shard{rank:05d}-of-00002"))
            small = torch.randint(0, K, (SMALL_ADDS, SMALL_BATCH, M), dtype=torch.uint8, generator=g)
            t = time.perf_counter()
            for batch in small:
                index.add_codes(batch)
            row["small_add_items_per_s"] = SMALL_ADDS * SMALL_BATCH / (time.perf_counter() - t)
            del index
            for mmap in (True, False):
                rss_before = rss_mib()
                t = time.perf_counter()
                loaded = OPQNIndex.load(path, mmap=mmap, verify=False)
                load_s = time.perf_counter() - t
                timings, (r1, rn) = search_timings(loaded, q1, q1000, args.k)
                assert all(torch.equal(a, b) for a, b in zip(r1 + rn, mem1 + memn)), "loaded index differs"
                timings.update(load_s=load_s, rss_growth_mib=rss_mib() - rss_before)
                row["mmap" if mmap else "loaded"] = timings
                del loaded
            if programs:
                row["files"] = file_timings(programs, path, g, tmp)
            shard = sharded(path, n, args.k, tmp)
            assert torch.equal(torch.tensor(shard["ids_nq1"]), mem1[1]), "sharded search differs"
            row["sharded_2proc"] = {"nq1_ms": shard["nq1_ms"], "nq1000_qps": shard["nq1000_qps"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'N':>10s} {'add items/s':>12s} {'+1k items/s':>12s} {'where':>14s} {'nq=1 ms':>9s} {'nq=1000 q/s':>12s}"
          f" {'RSS +MiB':>9s}")
    for row in rows:
        first = True
        for where in ("memory", "mmap", "loaded", "sharded_2proc"):
            t = row[where]
            label = {"memory": "in memory", "mmap": "mmap load", "loaded": "full load", "sharded_2proc": "2 shards"}[where]
            rss = t.get("rss_growth_mib", row["rss_growth_mib"] if where == "memory" else float("nan"))
            add = f"{row['add_items_per_s']:12.0f} {row['small_add_items_per_s']:12.0f}" if first else " " * 25
            print(f"{row['N'] if first else '':>10} {add} {label:>14s} {t['nq1_ms']:9.2f} {t['nq1000_qps']:12.0f} {rss:9.1f}")
            first = False
    for row in rows:
        if "files" in row:
            py, cpp = row["files"]["python_s"], row["files"]["cpp_s"]
            print(f"\nindex files, N = {row['N']}: seconds (adds: {FILE_FEATURES} features, then {SMALL_ADDS} x "
                  f"{SMALL_BATCH} codes)\n{'':>18s} {'Python':>9s} {'C++':>9s} {'Python/C++':>11s}")
            for step in FILE_STEPS:
                print(f"{step:>18s} {py[step]:9.3f} {cpp[step]:9.3f} {py[step] / cpp[step]:11.2f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
