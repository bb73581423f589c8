"""Run by test_distributed.py under torchrun (2 ranks, gloo): an OrthoPQHead built on the meta
device, sharded with FSDP2, materialized with to_empty and reset_parameters, then one SGD step on
each rank's half of a batch. Rank 0 saves the head's full values before and after the step."""
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from opqn_ext.distributed import destroy_process_group
from opqn_ext.nn import OrthoPQHead


def full_values(module):
    return {name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().clone()
            for name, value in module.state_dict().items()}


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    with torch.device("meta"):
        head = OrthoPQHead(64, 7, 4, 16, seed=3)
    fully_shard(head, mesh=init_device_mesh("cpu", (world,)))
    head.to_empty(device="cpu")
    head.reset_parameters()
    sharded = sorted(name for name, value in head.state_dict().items() if isinstance(value, DTensor))
    initial = full_values(head)
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(16, 64, generator=g), torch.randint(0, 7, (16,), generator=g)
    mine = slice(rank * 16 // world, (rank + 1) * 16 // world)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    head(features[mine], labels[mine]).loss.backward()
    optimizer.step()
    after = full_values(head)
    if rank == 0:
        torch.save({"sharded": sharded, "initial": initial, "after": after, "features": features, "labels": labels},
                   out_path)
    destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
