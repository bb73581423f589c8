"""Autocast rules: inside ``torch.autocast`` regions (CPU or CUDA), the ops' floating-point inputs
are cast to float32 before the kernels run, as torch does for softmax and log: the assignments,
their entropy, the argmax codes and the scanned tables keep float32 precision, and a backbone's
bfloat16/float16 features mix with float32 weights. float64 inputs are left as they are."""
import torch

_FLOAT32_OPS = ("soft_quantize", "encode", "adc_topk", "adc_scores", "adc_topk4", "rank_stats")

for _device_type in ("cpu", "cuda"):
    if torch.amp.is_autocast_available(_device_type):
        for _name in _FLOAT32_OPS:
            torch.library.register_autocast(f"opqn_ext::{_name}", _device_type, torch.float32)
