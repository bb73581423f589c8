"""Autograd formulas of the custom ops: backward passes call their fused backward ops."""
import torch


def _soft_quantize_setup_context(ctx, inputs, output):
    x, assign_weight, codebook, scale, normalize = inputs
    ctx.save_for_backward(x, assign_weight, codebook, output[0])
    ctx.set_materialize_grads(False)  # unused outputs give None, not zero tensors to work through
    ctx.scale = scale
    ctx.normalize = normalize


def _soft_quantize_backward(ctx, grad_probs, grad_quantized, grad_entropy):
    x, assign_weight, codebook, probs = ctx.saved_tensors
    mask = [bool(n) for n in ctx.needs_input_grad[:3]]
    grad_x, grad_a, grad_c = torch.ops.opqn_ext.soft_quantize_backward(
        grad_probs, grad_quantized, grad_entropy, x, assign_weight, codebook, probs,
        ctx.scale, ctx.normalize, mask,
    )
    return (grad_x if mask[0] else None, grad_a if mask[1] else None, grad_c if mask[2] else None,
            None, None)


torch.library.register_autograd(
    "opqn_ext::soft_quantize", _soft_quantize_backward, setup_context=_soft_quantize_setup_context
)
