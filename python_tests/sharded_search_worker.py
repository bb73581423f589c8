"""Run by test_distributed.py under torchrun (2 gloo processes): builds a ShardedIndex from the
same data on every rank, searches (exact and 4-bit scans, top-k and range), looks up labels and
vectors by id, saves and reloads the shards, removes ids, and rank 0 writes every result to the
file named by argv[1]; every rank checks that it got what rank 0 got. It also loads, as shards,
one index file holding every item (argv[3]) and the shards of 3 ranks (argv[4])."""
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from opqn_ext.distributed import destroy_process_group
from opqn_ext.index import IndexFileError, OPQNIndex, ShardedIndex
from opqn_ext.nn import OrthoPQHead

from test_index import D, K, M, features

dist.init_process_group("gloo")
head = OrthoPQHead(D, 5, M, K, seed=0)
index = ShardedIndex(OPQNIndex.from_head(head))
ids = torch.randperm(4000, generator=torch.Generator().manual_seed(0)) * 3
index.add(features(4000, 1), ids=ids, labels=ids % 5)
q = features(30, 2)
results = {"size": len(index), "first": index.search(q, 40), "shard_size": len(index.shard)}
results["fast_scan"] = index.search(q, 40, fast_scan=True, rerank=4)
results["range"] = index.range_search(q, 0.8)
among = torch.arange(0, 12000, 7)  # some ids of each shard, and ids of none
results["subset"] = index.search(q, 40, subset=among)
results["range_subset"] = index.range_search(q, 0.8, subset=among)
results["restricted"] = index.restricted(among).search(q, 40)
results["few"] = index.search(q, 40, subset=[0, 3, 6, 7, 9, 12, 15])  # 6 items, 3 on each rank; 7 is none
try:
    index.add(features(2, 3), ids=[12001, -1])
except ValueError as e:  # on both ranks, though only rank 1 would hold the id -1
    results["minus_one"] = str(e)
results["contains"] = index.contains(torch.tensor([[0, 1], [11997, 12000]]))
asked = torch.tensor([[3, 4], [12000, 6]])  # 4 and 12000 are no item's id
results["labels"] = index.labels_of(asked)
results["vectors"] = index.reconstruct(ids[:50])
try:
    index.reconstruct(torch.tensor([0, 4, 9]))
except ValueError as e:
    results["reconstruct_missing"] = str(e)
index.save(sys.argv[2])
dist.barrier()
loaded = ShardedIndex.load(sys.argv[2], mmap=True)
results["loaded"] = loaded.search(q, 40)
all_sizes = [None, None]
dist.all_gather_object(all_sizes, len(loaded.shard))
results["owned"] = bool((loaded.shard.ids % 2 == dist.get_rank()).all())
for name, path in (("from_one_file", sys.argv[3]), ("from_three_shards", sys.argv[4])):
    other = ShardedIndex.load(path)
    results[name] = other.search(q, 40)
    assert torch.equal(other.shard.ids, loaded.shard.ids) and torch.equal(other.shard.codes, loaded.shard.codes)
    assert torch.equal(other.shard.labels, loaded.shard.labels) and other.shard.settings == loaded.shard.settings
try:
    ShardedIndex.load(sys.argv[4] + ".none")
except IndexFileError as e:
    results["load_missing"] = str(e)
if dist.get_rank() == 0:  # the index file changed after the shards were saved: which is meant?
    shutil.copy(sys.argv[3], sys.argv[2])
    os.utime(sys.argv[2], ns=(time.time_ns() + 10**9,) * 2)
dist.barrier()
try:
    ShardedIndex.load(sys.argv[2])
except IndexFileError as e:
    results["newer_file"] = str(e)
dist.barrier()
if dist.get_rank() == 0:
    os.unlink(sys.argv[2])
results["from_index"] = ShardedIndex.from_index(OPQNIndex.load(sys.argv[3])).search(q, 40)
results["removed"] = loaded.remove(torch.arange(0, 12000, 9))
results["after_remove"] = loaded.search(q, 40)
same = [None, None]
dist.all_gather_object(same, results)
for key, value in same[1].items():  # every result but the shard sizes is the same on both ranks
    if key != "shard_size":
        assert repr(value) == repr(same[0][key]), key
if dist.get_rank() == 0:
    results["shard_sizes"] = all_sizes
    torch.save(results, sys.argv[1])
destroy_process_group()  # not dist.destroy_process_group(): see its docstring (torch 2.6)
