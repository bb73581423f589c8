"""torch.distributed on 2 local CPU processes (gloo, loopback): sharded search equals one index,
and DDP training equals one process up to floating-point reduction order."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opqn_ext.index import OPQNIndex
from opqn_ext.nn import OrthoPQHead
from opqn_ext.train import TrainConfig, load_checkpoint, train
from test_index import D, K, M, features

HERE = Path(__file__).parent


def torchrun(args, tmp_path, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    # its logs go under tmp_path: by default torchrun leaves a torchelastic_* folder in /tmp per run
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--log-dir", str(tmp_path / "torchrun_logs"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_sharded_search_equals_one_index(tmp_path):
    head = OrthoPQHead(D, 5, M, K, seed=0)
    single = OPQNIndex.from_head(head)
    ids = torch.randperm(4000, generator=torch.Generator().manual_seed(0)) * 3
    single.add(features(4000, 1), ids=ids, labels=ids % 5)
    single.save(tmp_path / "one.opqn")
    for rank in range(3):  # the shards 3 ranks would have saved
        shard = OPQNIndex.from_head(head)
        shard.merge_from(single.restricted(single.ids[single.ids % 3 == rank]))
        shard.save(tmp_path / f"three.opqn.shard{rank:05d}-of-00003")
    torchrun([str(HERE / "sharded_search_worker.py"), str(tmp_path / "out.pt"), str(tmp_path / "db.opqn"),
              str(tmp_path / "one.opqn"), str(tmp_path / "three.opqn")], tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    q = features(30, 2)
    want = single.search(q, 40)
    assert got["size"] == 4000 and sum(got["shard_sizes"]) == 4000 and 1500 < got["shard_size"] < 2500
    assert got["owned"]
    assert got["newer_file"] == (f"{tmp_path / 'db.opqn'} was written after its shard files (of 2 ranks): remove them "
                                 f"to load it, or it to load them")
    assert got["load_missing"] == (f"{tmp_path / 'three.opqn.none'}: neither an index file nor the shard files of 2 "
                                   f"or any other number of ranks exist")
    for key in ("first", "loaded", "from_one_file", "from_three_shards", "from_index"):
        assert torch.equal(got[key][0], want[0]) and torch.equal(got[key][1], want[1]), key
    fast = single.search(q, 40, fast_scan=True, rerank=4)
    assert torch.equal(got["fast_scan"][0], fast[0]) and torch.equal(got["fast_scan"][1], fast[1])
    lims, scores, found = single.range_search(q, 0.8)
    assert 30 < len(found) < 30 * 4000 and bool((lims.diff() > 0).any() and (lims.diff() == 0).any())
    for mine, theirs in zip(got["range"], (lims, scores, found)):
        assert torch.equal(mine, theirs)
    among = torch.arange(0, 12000, 7)
    subset = single.search(q, 40, subset=among)
    assert torch.equal(got["subset"][0], subset[0]) and torch.equal(got["subset"][1], subset[1])
    assert all(torch.equal(a, b) for a, b in zip(got["range_subset"], single.range_search(q, 0.8, subset=among)))
    assert torch.equal(got["restricted"][0], subset[0]) and torch.equal(got["restricted"][1], subset[1])
    few = single.search(q, 40, subset=[0, 3, 6, 7, 9, 12, 15])
    assert torch.equal(got["few"][0], few[0]) and torch.equal(got["few"][1], few[1])
    assert sorted(got["few"][1][0, :6].tolist()) == [0, 3, 6, 9, 12, 15] and bool((got["few"][1][:, 6:] == -1).all())
    assert got["minus_one"] == "ids must not hold -1: search returns that id where fewer than k items exist (as FAISS)"
    assert got["contains"].tolist() == [[True, False], [True, False]]
    assert got["labels"].tolist() == [[3 % 5, -1], [-1, 6 % 5]]
    assert torch.equal(got["vectors"], single.reconstruct(ids[:50]))
    assert got["reconstruct_missing"] == "ids not in the index: [4]"
    assert sorted(p.name for p in tmp_path.glob("db.opqn.shard*")) == ["db.opqn.shard00000-of-00002",
                                                                     "db.opqn.shard00001-of-00002"]
    assert got["removed"] == single.remove(torch.arange(0, 12000, 9))
    want = single.search(q, 40)
    assert torch.equal(got["after_remove"][0], want[0]) and torch.equal(got["after_remove"][1], want[1])


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 7),
                    reason="torch 2.6's FSDP2 does not run on the CPU ('Stream' object has no attribute 'record_event')")
def test_a_head_sharded_by_fsdp2_initializes_and_trains_as_one_head(tmp_path):
    """Built on the meta device, sharded over 2 ranks, to_empty + reset_parameters: the values of a
    head made directly; one step on half a batch per rank: one step of one head on the batch."""
    torchrun([str(HERE / "fsdp_head_worker.py"), str(tmp_path / "out.pt")], tmp_path)
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert got["sharded"] == ["assign_weight", "class_weight"]  # parameters; the codebook is a buffer
    head = OrthoPQHead(64, 7, 4, 16, seed=3)
    for name, value in head.state_dict().items():
        assert torch.equal(got["initial"][name], value), name
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    head(got["features"], got["labels"]).loss.backward()
    optimizer.step()
    for name, value in head.state_dict().items():
        torch.testing.assert_close(got["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(got["after"]["class_weight"], got["initial"]["class_weight"])


TINY = ["--dataset", "orl", "--width", "4", "--epochs", "2", "--batch-size", "64", "--lr-step", "20", "--seed", "0",
        "--device", "cpu", "--no-progress"]


@pytest.fixture
def one_rank_group():
    """A process group of this process alone (gloo, an in-process store), destroyed afterwards."""
    import torch.distributed as dist

    from opqn_ext.distributed import destroy_process_group

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    destroy_process_group()


def test_a_sharded_index_loads_onto_a_device_and_searches_as_one_index_does(tmp_path, device, one_rank_group):
    from opqn_ext.index import ShardedIndex

    index = OPQNIndex.from_head(OrthoPQHead(D, 5, M, K, seed=0))
    index.add(features(2000, 1), labels=torch.arange(2000) % 5)
    index.save(tmp_path / "one.opqn")
    index.to(device)  # a query's tables on CUDA may differ in their last bits from those on the CPU
    q = features(9, 2)
    want = index.search(q, 25)
    for sharded in (ShardedIndex.load(tmp_path / "one.opqn", device=device),
                    ShardedIndex.from_index(OPQNIndex.load(tmp_path / "one.opqn", device=device))):
        assert sharded.shard.device.type == device.type and len(sharded) == 2000
        for kwargs in (dict(), dict(fast_scan=True, rerank=4), dict(subset=torch.arange(0, 2000, 3))):
            got, expected = sharded.search(q, 25, **kwargs), index.search(q, 25, **kwargs)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), kwargs
        assert torch.equal(sharded.search(q, 25)[1], want[1])
        assert torch.equal(sharded.labels_of(torch.tensor([7, 2000])), torch.tensor([2, -1]))
        assert sharded.to("cpu") is sharded and sharded.shard.device.type == "cpu"


@pytest.mark.parametrize("read", ["memory", "streamed", "cached"])
def test_ddp_training_equals_one_process_in_float64(tmp_path, read, orl_folder):
    # float64 makes reduction-order differences negligible, so any difference in the data-parallel
    # logic (batch slices, augmentation, loss scaling, global batch norm) would show; streamed: each
    # rank decodes its slices of the batches from ORL's bytes written as a folder, in a loader process;
    # cached: LOCAL_RANK 0 decodes that folder into a cache file while rank 1 waits, both map it
    worker = str(HERE / "ddp_train_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="2")
    one = subprocess.run([sys.executable, worker, *TINY, "--out-dir", str(tmp_path / "one")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    data = {"memory": [], "streamed": ["--stream", "--workers", "1"], "cached": ["--cache-dir", str(tmp_path / "c")]}
    folder = ["--dataset", "folder", "--data-path", str(orl_folder), "--grayscale"] if data[read] else []
    torchrun([worker, *TINY, *folder, *data[read], "--out-dir", str(tmp_path / "ddp")], tmp_path)
    if read == "cached":
        assert [p.suffix for p in sorted((tmp_path / "c").iterdir())] == [".lock", ".json", ".npy"]  # the lock stays
    a, b = load_checkpoint(tmp_path / "one"), load_checkpoint(tmp_path / "ddp")
    assert a["world_size"] == 1 and b["world_size"] == 2
    assert a["model"]["backbone.body.0.0.weight"].dtype == torch.float64
    for name, value in a["model"].items():
        assert torch.allclose(b["model"][name], value, rtol=1e-9, atol=1e-11), name
    assert [h["loss"] for h in b["history"]] == pytest.approx([h["loss"] for h in a["history"]], rel=1e-10)


def test_torchrun_entry_point_trains_with_rank0_outputs(tmp_path):
    single = train(TrainConfig(dataset="orl", width=4, epochs=2, batch_size=64, lr_step=20, seed=0, device="cpu",
                               out_dir=str(tmp_path / "one"), progress=False), evaluate_at_end=False)
    proc = torchrun(["-m", "opqn_ext.train", *TINY, "--out-dir", str(tmp_path / "ddp")], tmp_path)
    assert proc.stdout.count("trained 2 epochs") == 1 and proc.stdout.count("OPQN codes (32 bits)") == 1
    ddp = load_checkpoint(tmp_path / "ddp")
    assert ddp["world_size"] == 2 and ddp["epoch"] == 1
    lines = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 3  # two epochs and the final evaluation, written once
    # float32: the same trajectory up to reduction-order noise (amplified by training)
    assert [h["loss"] for h in ddp["history"]] == pytest.approx([h["loss"] for h in single.history], rel=1e-2)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_global_batch_norm_alone_is_batch_norm(momentum):
    from opqn_ext.distributed import GlobalBatchNorm, convert_batchnorm

    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=momentum))
    converted = convert_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, momentum=momentum)), torch.device("cpu"))
    assert isinstance(converted[0], GlobalBatchNorm)
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        assert torch.allclose(bn(x), converted(x))
    assert torch.allclose(bn[0].running_var, converted[0].running_var)
    bn.eval(), converted.eval()
    assert torch.allclose(bn(x), converted(x))
