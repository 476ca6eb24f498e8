"""Fused Triton dual-key cross-attention with a pure PyTorch reference.

`dual_attention` / `dual_attention_mse` dispatch to Triton on CUDA tensors (or under `TRITON_INTERPRET=1`) and
to the two-SDPA reference otherwise; importing this package never needs Triton.
"""

from xling.kernels.ops import HAS_TRITON, dual_attention, dual_attention_mse, use_triton
from xling.kernels.reference import dual_attention_mse_reference, dual_attention_reference

__all__ = [
    "HAS_TRITON",
    "dual_attention",
    "dual_attention_mse",
    "dual_attention_mse_reference",
    "dual_attention_reference",
    "use_triton",
]
