"""Fused Triton dual-key cross-attention with a pure PyTorch reference."""
