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
