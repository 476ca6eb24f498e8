"""Trainable language heads (MLP adapter, mixer translator, LoRA) and inference for diffusers pipelines."""
