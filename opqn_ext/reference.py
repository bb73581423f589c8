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


def encode(x, assign_weight, normalize=True):
    """Reference of :func:`opqn_ext.encode`: argmax of the logits (torch.argmax: first maximum)."""
    M, d, K = assign_weight.shape
    xs = x.reshape(x.shape[0], M, d).double()
    if normalize:
        xs = F.normalize(xs, dim=-1, eps=1e-12)
    logits = torch.einsum("bmd,mdk->bmk", xs, assign_weight.double())
    return logits.argmax(-1).to(torch.uint8)


def adc_scores(lut, codes):
    """All ADC scores ``[nq, N]``: ``sum_m lut[q, m, codes[i, m]]`` added in book order (float32)."""
    nq, M, K = lut.shape
    padded = torch.zeros(nq, M, 256, dtype=lut.dtype, device=lut.device)
    padded[:, :, :K] = lut
    scores = torch.zeros(nq, codes.shape[0], dtype=lut.dtype, device=lut.device)
    for m in range(M):
        scores += padded[:, m, codes[:, m].long()]
    return scores


def adc_topk(lut, codes, k):
    """Reference of :func:`opqn_ext.adc_topk`: full scores, then a stable sort (ties by index)."""
    scores = adc_scores(lut, codes)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order
