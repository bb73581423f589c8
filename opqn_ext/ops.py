"""Typed wrappers over torch.ops.opqn_ext.*, with the shapes they take and give."""
from typing import NamedTuple

import torch


class SoftQuantizeResult(NamedTuple):
    probs: torch.Tensor  # [B, M, K] soft-assignment probabilities (the ADC table of a query)
    quantized: torch.Tensor  # [B, M, d] soft-quantized sub-vectors  C_m @ p_m
    entropy: torch.Tensor  # [B, M] entropy of each book's assignment


def soft_quantize(
    x: torch.Tensor,
    assign_weight: torch.Tensor,
    codebook: torch.Tensor,
    scale: float = 1.0,
    normalize: bool = False,
) -> SoftQuantizeResult:
    """Fused soft product quantization of ``x`` (DESIGN.md section 1).

    For every sample b and book m, with ``xhat = x[b, m]`` (or ``x[b, m] / max(||x[b, m]||, 1e-12)``
    when ``normalize``): ``logits = scale * xhat @ assign_weight[m]``, ``probs = softmax(logits)``,
    ``quantized = codebook[m] @ probs``, ``entropy = -sum probs * log(probs)``.

    Args:
        x: ``[B, M*d]`` or ``[B, M, d]``, floating point (float32/float64; on CUDA also
            float16/bfloat16, computed in float32). May be non-contiguous.
        assign_weight: ``[M, d, K]`` assignment weights, same dtype and device as ``x``.
        codebook: ``[M, d, K]`` codewords (columns orthonormal per book, ``K <= d``).
        scale: softmax temperature multiplier (finite).
        normalize: L2-normalize each sub-vector before the similarity.

    Returns:
        ``SoftQuantizeResult(probs [B, M, K], quantized [B, M, d], entropy [B, M])``, in the dtype
        of ``x``, differentiable with respect to ``x``, ``assign_weight`` and ``codebook``.

    NaN or infinite values in ``x`` or the weights are not checked (that would cost a device
    sync): they make the outputs of the affected (sample, book) rows NaN and leave the others
    untouched.
    """
    probs, quantized, entropy = torch.ops.opqn_ext.soft_quantize(
        x, assign_weight, codebook, float(scale), bool(normalize)
    )
    return SoftQuantizeResult(probs, quantized, entropy)


def encode(x: torch.Tensor, assign_weight: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """Database codes: ``codes[b, m] = argmax_k xhat[b, m] @ assign_weight[m]`` (ties to the smaller k).

    Args:
        x: ``[B, M*d]`` or ``[B, M, d]`` features, finite (a NaN has no argmax: error).
        assign_weight: ``[M, d, K]`` with ``K <= 256``, same dtype and device as ``x``.
        normalize: L2-normalize sub-vectors first; a positive scale per row, so it never changes
            the codes (kept for symmetry with :func:`soft_quantize`).

    Returns:
        ``codes [B, M]`` uint8.
    """
    return torch.ops.opqn_ext.encode(x, assign_weight, bool(normalize))


def adc_topk(lut: torch.Tensor, codes: torch.Tensor, k: int):
    """Asymmetric-distance top-k scan: ``score[q, i] = sum_m lut[q, m, codes[i, m]]``, larger is better.

    Args:
        lut: ``[nq, M, K]`` float32 per-query tables (for OPQN, the query's soft-assignment probs),
            finite (NaN or Inf: error).
        codes: ``[N, M]`` uint8 database codes. A code value ``>= K`` adds 0 (it never reads
            outside the table).
        k: how many results per query, ``1 <= k <= N``.

    Returns:
        ``(scores [nq, k] float32, indices [nq, k] int64)``: scores descending, equal scores in
        increasing index order; identical on every code path, CPU instruction set and thread count.
    """
    scores, indices = torch.ops.opqn_ext.adc_topk(lut, codes, int(k))
    return scores, indices
