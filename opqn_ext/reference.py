"""Pure-PyTorch oracles of every op: what tests and benchmarks compare the kernels against.

Written the plain way (einsum, softmax, autograd through ordinary ops), in float32 at least.
"""
import torch
import torch.nn.functional as F


def soft_quantize(x, assign_weight, codebook, scale=1.0, normalize=False):
    """Reference of :func:`opqn_ext.soft_quantize`: ``(probs [B,M,K], quantized [B,M,d], entropy [B,M])``."""
    M, d, K = assign_weight.shape
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    xs = x.reshape(x.shape[0], M, d).to(compute)
    if normalize:
        xs = F.normalize(xs, dim=-1, eps=1e-12)
    logits = scale * torch.einsum("bmd,mdk->bmk", xs, assign_weight.to(compute))
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    quantized = torch.einsum("bmk,mdk->bmd", probs, codebook.to(compute))
    entropy = -(probs * log_probs).sum(-1)
    return probs.to(dtype), quantized.to(dtype), entropy.to(dtype)
