"""Fake (meta) kernels: output shapes and argument checks for tracing and torch.compile."""
import math

import torch


def _check_args(x, assign_weight, codebook, scale):
    """The shape/dtype/device checks of csrc/soft_quantize_common.cpp; returns (B, M, d, K)."""
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, t in (("assign_weight", assign_weight), ("codebook", codebook)):
        if t.dim() != 3:
            raise RuntimeError(f"{name} must have shape [M, d, K] (3 dims), got {t.dim()} dims with shape {list(t.shape)}")
        if t.dtype != x.dtype:
            raise RuntimeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{name} must be on the device of x ({x.device}), got {t.device}")
    if codebook.shape != assign_weight.shape:
        raise RuntimeError(
            f"codebook (it must match assign_weight) must have shape {list(assign_weight.shape)}, "
            f"got {list(codebook.shape)}"
        )
    M, d, K = assign_weight.shape
    torch._check(K <= d, lambda: f"codebook has K={K} words of dimension d={d}; orthonormal codewords need K <= d")
    weights = f"to match assign_weight {list(assign_weight.shape)}"
    if x.dim() == 2:
        torch._check(x.shape[1] == M * d,
                     lambda: f"x must have M*d = {M}*{d} = {M * d} columns {weights}, got shape {list(x.shape)}")
    elif x.dim() == 3:
        torch._check(x.shape[1] == M and x.shape[2] == d,
                     lambda: f"x must have shape [B, {M}, {d}] {weights}, got {list(x.shape)}")
    else:
        raise RuntimeError(f"x must have shape [B, M*d] or [B, M, d], got {x.dim()} dims with shape {list(x.shape)}")
    if not math.isfinite(scale):
        raise RuntimeError(f"scale must be finite, got {scale}")
    return x.shape[0], M, d, K


@torch.library.register_fake("opqn_ext::soft_quantize")
def _soft_quantize_fake(x, assign_weight, codebook, scale, normalize):
    B, M, d, K = _check_args(x, assign_weight, codebook, scale)
    return x.new_empty(B, M, K), x.new_empty(B, M, d), x.new_empty(B, M)


@torch.library.register_fake("opqn_ext::soft_quantize_backward")
def _soft_quantize_backward_fake(
    grad_probs, grad_quantized, grad_entropy, x, assign_weight, codebook, probs, scale, normalize, output_mask
):
    _check_args(x, assign_weight, codebook, scale)
    need_x, need_a, need_c = output_mask
    return (
        x.new_empty(x.shape) if need_x else x.new_empty(0),
        assign_weight.new_empty(assign_weight.shape) if need_a else x.new_empty(0),
        codebook.new_empty(codebook.shape) if need_c else x.new_empty(0),
    )


@torch.library.register_fake("opqn_ext::encode")
def _encode_fake(x, assign_weight, normalize):
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"x must be a floating-point tensor, got {x.dtype}")
    if assign_weight.dim() != 3:
        raise RuntimeError(f"assign_weight must have shape [M, d, K] (3 dims), got {assign_weight.dim()} dims")
    M, d, K = assign_weight.shape
    torch._check(K <= 256, lambda: f"assign_weight has K={K} words per book; codes are uint8, so K must be <= 256")
    return x.new_empty(x.shape[0], M, dtype=torch.uint8)


def _check_lut_and_codes(lut, codes, max_words=256, words="uint8 codes"):
    """The checks of csrc/adc_common.cpp's check_lut_and_codes but NaN (that needs the values)."""
    if lut.dim() != 3 or codes.dim() != 2:
        raise RuntimeError("lut must have shape [nq, M, K] and codes [N, M]")
    if lut.dtype != torch.float32:
        raise RuntimeError(f"lut must be float32, got {lut.dtype}")
    M, K = lut.shape[1], lut.shape[2]
    torch._check(1 <= M <= 256, lambda: f"lut must have 1 <= M <= 256 books, got shape {list(lut.shape)}")
    torch._check(1 <= K <= max_words,
                 lambda: f"lut must have 1 <= K <= {max_words} words per book ({words}), got shape {list(lut.shape)}")
    if codes.dtype != torch.uint8:
        raise RuntimeError(f"codes must be uint8, got {codes.dtype}")
    if codes.device != lut.device:
        raise RuntimeError(f"codes must be on the device of lut ({lut.device}), got {codes.device}")
    torch._check(codes.shape[1] == M,
                 lambda: f"codes must have M={M} columns to match lut {list(lut.shape)}, got shape {list(codes.shape)}")


def _check_topk_args(lut, codes, k, max_words=256, words="uint8 codes"):
    _check_lut_and_codes(lut, codes, max_words, words)
    torch._check(k >= 1, lambda: f"k must be >= 1, got {k}")
    torch._check(k <= codes.shape[0], lambda: f"k ({k}) must be <= the number of codes N ({codes.shape[0]})")


@torch.library.register_fake("opqn_ext::adc_topk")
def _adc_topk_fake(lut, codes, k):
    _check_topk_args(lut, codes, k)
    return lut.new_empty(lut.shape[0], k), lut.new_empty(lut.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("opqn_ext::pack_codes4")
def _pack_codes4_fake(codes):
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise RuntimeError("codes must be a uint8 tensor of shape [N, M]")
    N, M = codes.shape
    return codes.new_empty((N + 31) // 32, (M + 1) // 2, 32)


@torch.library.register_fake("opqn_ext::adc_topk4")
def _adc_topk4_fake(lut, packed, num_codes, k, rerank):
    torch._check(k >= 1 and k <= num_codes, lambda: f"k ({k}) must be in [1, N={num_codes}]")
    return lut.new_empty(lut.shape[0], k), lut.new_empty(lut.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("opqn_ext::adc_scores")
def _adc_scores_fake(lut, codes):
    _check_lut_and_codes(lut, codes)
    return lut.new_empty(lut.shape[0], codes.shape[0])


@torch.library.register_fake("opqn_ext::rank_stats")
def _rank_stats_fake(scores, query_labels, db_labels, cutoffs):
    if scores.dim() != 2 or scores.dtype != torch.float32:
        raise RuntimeError("scores must be a float32 tensor of shape [nq, N]")
    nq, P = scores.shape[0], len(cutoffs)
    return (scores.new_empty(nq, dtype=torch.float64), scores.new_empty(nq, P, dtype=torch.int64),
            scores.new_empty(nq, P, dtype=torch.float64), scores.new_empty(nq, dtype=torch.int64))
