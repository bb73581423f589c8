"""torch.distributed plumbing for OPQN: process-group setup from torchrun's environment, batch
norm over the whole global batch on any backend, and the top-k merge used by sharded search.

Multi-machine runs use torchrun's rendezvous as usual, e.g. on each of two hosts:
``torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST0:29400 -m opqn_ext.train ...``
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
from torch import nn


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (NCCL for CUDA, gloo otherwise); False when the
    process runs alone."""
    if world_size_from_env() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def destroy_process_group() -> None:
    """``dist.destroy_process_group()`` once no gloo thread still holds a collective's tensor.

    With torch 2.6 (seen one run in a few, under load), a gloo worker thread that drops the last
    reference to a tensor made in Python waits for the GIL, while destroying the group joins that
    thread holding the GIL: a deadlock. After a barrier every earlier collective has finished, and
    sleeping releases the GIL so that such a thread can let go before the join.
    """
    dist.barrier()
    time.sleep(0.1)
    dist.destroy_process_group()


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover the whole global batch of all ranks (like
    ``nn.SyncBatchNorm``, which is GPU-only), through a differentiable all-reduce; any backend."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        C = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        shape = [1, C] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() // C], dtype=x.dtype, device=x.device)
        # two passes (mean, then squared deviations) keep the variance exact where mean^2 >> var
        totals = all_reduce(torch.cat([x.sum(dims), count]))
        n = totals[-1]
        mean = totals[:C] / n
        centered = x - mean.view(shape)
        var = all_reduce(centered.square().sum(dims)) / n
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if tracked is not None and running_mean is not None and running_var is not None:  # track_running_stats
            with torch.no_grad():
                tracked += 1
                # momentum None: the cumulative average, as in nn.BatchNorm
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
                running_mean.lerp_(mean.detach(), m)
                running_var.lerp_(var.detach() * n / (n - 1).clamp(min=1), m)
        y = centered * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Batch norms over the global batch: ``nn.SyncBatchNorm`` on CUDA, :class:`GlobalBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_batchnorm(child, device))
    return module


def collective_device(group=None) -> torch.device:
    """Where tensors of a collective must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum of ``t`` over the ranks (a new tensor on t's device), on any backend."""
    out = t.to(collective_device(group)).clone()
    dist.all_reduce(out, group=group)
    return out.to(t.device)


def merge_topk(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k of candidate lists ``[nq, C]``: scores descending, equal scores by smaller id."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def all_gather_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, group=None):
    """Every rank's ``[nq, k]`` candidates gathered and merged into the global top-k (on every rank)."""
    world, device, home = dist.get_world_size(group), collective_device(group), scores.device
    scores, ids = scores.to(device).contiguous(), ids.to(device).contiguous()
    all_scores = [torch.empty_like(scores) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_scores, scores, group=group)
    dist.all_gather(all_ids, ids, group=group)
    merged_scores, merged_ids = merge_topk(torch.cat(all_scores, 1), torch.cat(all_ids, 1), k)
    return merged_scores.to(home), merged_ids.to(home)


def all_gather_rows(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t [n_r, ...]`` (``n_r`` may differ between ranks) concatenated in rank order,
    on every rank, on t's device: rows padded to the longest, gathered, and the padding dropped."""
    world, device, home = dist.get_world_size(group), collective_device(group), t.device
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).to(home)
