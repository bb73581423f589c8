"""Run by bench_index.py under torchrun: each rank loads its shard (mmap) and times the sharded
search; rank 0 writes the timings and the nq = 1 result ids as JSON."""
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist

from opqn_ext.index import ShardedIndex

from bench_index import D

path, out, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
dist.init_process_group("gloo")
index = ShardedIndex.load(path, mmap=True, verify=False)
q1000 = torch.randn(1000, D, generator=torch.Generator().manual_seed(1))
q1 = q1000[:1]


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


t1, (s1, i1) = timed(lambda: index.search(q1, k), 20)
tn, _ = timed(lambda: index.search(q1000, k), 3)
if dist.get_rank() == 0:
    with open(out, "w") as f:
        json.dump({"nq1_ms": t1 * 1e3, "nq1000_qps": 1000 / tn, "ids_nq1": i1.tolist()}, f)
dist.destroy_process_group()
