"""The frozen diffusers teacher, the student-encoder protocol and UNet taps for cross-lingual distillation."""
