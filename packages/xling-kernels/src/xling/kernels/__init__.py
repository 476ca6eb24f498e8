"""Fused Triton dual-key cross-attention with a pure PyTorch reference, and the MMDiT joint dual attention.

`dual_attention` / `dual_attention_mse` dispatch to Triton on CUDA tensors (or under `TRITON_INTERPRET=1`) and
to the two-SDPA reference otherwise; importing this package never needs Triton. `joint_dual_attention` /
`joint_dual_attention_mse` (one query against [image keys; text keys] for two text sets, the image part computed
once) are pure PyTorch on every device.
"""

from xling.kernels.joint_attention import joint_dual_attention, joint_dual_attention_mse
from xling.kernels.ops import HAS_TRITON, dual_attention, dual_attention_mse, use_triton
from xling.kernels.reference import (
    dual_attention_mse_reference,
    dual_attention_reference,
    joint_dual_attention_mse_reference,
    joint_dual_attention_reference,
)

__all__ = [
    "HAS_TRITON",
    "dual_attention",
    "dual_attention_mse",
    "dual_attention_mse_reference",
    "dual_attention_reference",
    "joint_dual_attention",
    "joint_dual_attention_mse",
    "joint_dual_attention_mse_reference",
    "joint_dual_attention_reference",
    "use_triton",
]
