"""Autograd formulas of the custom ops: soft_quantize's backward calls its fused backward op (or,
to be differentiated again, runs through the reference); the ADC scans' scores pass their
gradients back to the table entries they summed."""
import torch

from . import reference
from .ops import codes4_at


def _soft_quantize_setup_context(ctx, inputs, output):
    x, assign_weight, codebook, scale, normalize = inputs
    ctx.save_for_backward(x, assign_weight, codebook, output[0])
    ctx.set_materialize_grads(False)  # unused outputs give None, not zero tensors to work through
    ctx.scale = scale
    ctx.normalize = normalize


def _differentiable_soft_quantize_backward(ctx, inputs, mask, grads):
    """The gradients as a graph of ordinary torch ops through the reference, so that they can be
    differentiated again (``create_graph=True``: gradient penalties, Hessian-vector products).
    inputs: (x, assign_weight, codebook), those in mask requiring grad."""
    with torch.enable_grad():
        outputs = reference.soft_quantize(*inputs, ctx.scale, ctx.normalize)
        given = [(o, g) for o, g in zip(outputs, grads) if g is not None]
        wanted = [t for t, need in zip(inputs, mask) if need]
        found = iter(torch.autograd.grad([o for o, _ in given], wanted, [g for _, g in given],
                                         create_graph=True, allow_unused=True, materialize_grads=True))
    return tuple(next(found) if need else None for need in mask) + (None, None)


def _soft_quantize_backward(ctx, grad_probs, grad_quantized, grad_entropy):
    x, assign_weight, codebook, probs = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    if torch.is_grad_enabled():  # backward with create_graph=True
        return _differentiable_soft_quantize_backward(ctx, (x, assign_weight, codebook), mask,
                                                      (grad_probs, grad_quantized, grad_entropy))
    grad_x, grad_a, grad_c = torch.ops.opqn_ext.soft_quantize_backward(
        grad_probs, grad_quantized, grad_entropy, x, assign_weight, codebook, probs,
        ctx.scale, ctx.normalize, mask,
    )
    return (grad_x if mask[0] else None, grad_a if mask[1] else None, grad_c if mask[2] else None,
            None, None)


torch.library.register_autograd(
    "opqn_ext::soft_quantize", _soft_quantize_backward, setup_context=_soft_quantize_setup_context
)


# The ADC scores are sums of table entries, score[q, i] = sum_m lut[q, m, codes[i, m]]: each
# entry's gradient is the sum of the score gradients of the codes that pick it. A code value >= K
# adds 0 to its score (the kernels pad the table), so it passes no gradient on. Indices have none.

def _table_grad_from_shared_codes(grad_scores, codes, K):
    """grad_scores [nq, N], codes [N, M] (the same codes for every query) -> grad_lut [nq, M, K]."""
    nq, M = grad_scores.shape[0], codes.shape[1]
    grad_lut = grad_scores.new_zeros(nq, M, K + 1)  # the last entry collects the codes >= K
    words = codes.long().clamp(max=K)
    for m in range(M):
        grad_lut[:, m].index_add_(1, words[:, m], grad_scores)
    return grad_lut[:, :, :K]


def _table_grad_from_selected_codes(grad_scores, selected, K):
    """grad_scores [nq, n], selected [nq, n, M] (the codes behind each score) -> grad_lut [nq, M, K]."""
    nq, n, M = selected.shape
    words = selected.long().clamp(max=K) + torch.arange(M, device=selected.device) * (K + 1)
    grad_lut = grad_scores.new_zeros(nq, M * (K + 1))
    grad_lut.scatter_add_(1, words.reshape(nq, n * M), grad_scores.unsqueeze(2).expand(nq, n, M).reshape(nq, n * M))
    return grad_lut.view(nq, M, K + 1)[:, :, :K]


def _adc_scores_setup_context(ctx, inputs, output):
    lut, codes = inputs
    ctx.save_for_backward(codes)
    ctx.num_words = lut.shape[2]


def _adc_scores_backward(ctx, grad_scores):
    (codes,) = ctx.saved_tensors
    return _table_grad_from_shared_codes(grad_scores, codes, ctx.num_words), None


def _adc_topk_setup_context(ctx, inputs, output):
    lut, codes, _ = inputs
    ctx.save_for_backward(codes, output[1])
    ctx.num_words = lut.shape[2]


def _adc_topk_backward(ctx, grad_scores, _grad_indices):
    codes, indices = ctx.saved_tensors
    return _table_grad_from_selected_codes(grad_scores, codes[indices], ctx.num_words), None, None


def _adc_topk4_setup_context(ctx, inputs, output):
    lut, packed, _, _, _ = inputs
    ctx.save_for_backward(packed, output[1])
    ctx.num_books, ctx.num_words = lut.shape[1], lut.shape[2]


def _adc_topk4_backward(ctx, grad_scores, _grad_indices):
    packed, indices = ctx.saved_tensors
    selected = codes4_at(packed, indices, ctx.num_books)
    return _table_grad_from_selected_codes(grad_scores, selected, ctx.num_words), None, None, None, None


torch.library.register_autograd(
    "opqn_ext::adc_scores", _adc_scores_backward, setup_context=_adc_scores_setup_context
)
torch.library.register_autograd(
    "opqn_ext::adc_topk", _adc_topk_backward, setup_context=_adc_topk_setup_context
)
torch.library.register_autograd(
    "opqn_ext::adc_topk4", _adc_topk4_backward, setup_context=_adc_topk4_setup_context
)
