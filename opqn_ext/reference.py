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
    padded = F.pad(lut, (0, 256 - K))  # [nq, M, 256]: a code >= K reads a 0
    scores = lut.new_zeros(nq, codes.shape[0])
    for m in range(M):
        scores = scores + padded[:, m, codes[:, m].long()]
    return scores


def adc_topk(lut, codes, k):
    """Reference of :func:`opqn_ext.adc_topk`: full scores, then a stable sort (ties by index)."""
    scores = adc_scores(lut, codes)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    return scores.gather(1, order), order


def rank_stats(scores, query_labels, db_labels, cutoffs=()):
    """Reference of :func:`opqn_ext.rank_stats`, one query at a time: a stable sort of its scores,
    the relevance of the ranked items, and the precision at every relevant rank."""
    nq, N = scores.shape
    ap = torch.zeros(nq, dtype=torch.float64)
    hits = torch.zeros(nq, len(cutoffs), dtype=torch.int64)
    psums = torch.zeros(nq, len(cutoffs), dtype=torch.float64)
    num_relevant = torch.zeros(nq, dtype=torch.int64)
    ranks = torch.arange(1, N + 1, dtype=torch.float64)
    for q in range(nq):
        order = torch.sort(scores[q], descending=True, stable=True).indices
        relevant = db_labels[order] == query_labels[q]
        found = relevant.cumsum(0)
        precision_at_hits = torch.where(relevant, found / ranks, 0.0)
        num_relevant[q] = int(relevant.sum())
        ap[q] = precision_at_hits.sum() / num_relevant[q] if num_relevant[q] > 0 else 0.0
        for p, c in enumerate(cutoffs):
            hits[q, p] = found[c - 1]
            psums[q, p] = precision_at_hits[:c].sum()
    return ap, hits, psums, num_relevant
